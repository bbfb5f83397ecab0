"""Tests of `deepseek_edu.grpo` and `GRPOConfig`: pitfalls kinds G (normalisation / aggregation),
H (objective sign / gradient flow) and I (reward parsing and safety), wholesale.

What is checked:
- G: hand-computed advantage tables (prompt-major, interleaved and non-contiguous group ids, equal
  rewards -> exactly 0, singletons, mean-centred only); per-variant aggregation on a hand table;
  padding with garbage (NaN, inf, 1e30) never changes any variant's loss or gradients; Dr. GRPO's
  normaliser is a constant; DAPO's dropped groups leave every normaliser;
- H: loss value and gradient for every (ratio, advantage) case around both clip edges -- the
  clipped side has zero gradient, the other side -r·A; the on-policy loss is -mean(A) ≈ 0 while its
  gradient is not zero; one step on a positive-advantage response raises its probability and on a
  negative one lowers it (a real Transformer); k3 values by hand, its gradient, its Monte-Carlo
  mean equals the exact KL, finite values and gradients at log-ratios of ±1e4;
- I: the R1 layout on single- and multi-line reasoning, nested / unclosed / repeated / reordered
  tags; accuracy for arithmetic and Countdown; adversarial answers (9**9**9 as text, 10k characters,
  Unicode digits, division by zero, expressions instead of numbers); an unparseable reference never
  scores 1; eval/exec/compile are never called; each reward call returns within a fixed time;
- sampling: stored log-probs equal a fresh forward at the same temperature (ρ = 1 on-policy),
  masks stop after the eos, prompts of several lengths; the loop and the CLI run end to end.
"""

from __future__ import annotations

import builtins
import json
import math
import time

import pytest
import torch

from deepseek_edu.config import GRPOConfig, ModelConfig
from deepseek_edu.grpo import (
    KL_LOG_RATIO_MAX,
    accuracy_reward,
    equal_reward_groups,
    format_reward,
    group_advantages,
    grpo_train,
    kl_k3,
    parse_r1_layout,
    policy_loss,
    response_logprobs,
    sample_responses,
    score_responses,
)
from deepseek_edu.model import Transformer
from deepseek_edu.tasks import ArithmeticTask, CharTokenizer, CountdownTask, Problem

REWARD_TIME_LIMIT_S = 0.05  # every reward call returns within this, whatever the input
S3 = math.sqrt(3.0)


# --- G: advantages -----------------------------------------------------------------------------------

def test_advantages_hand_table_prompt_major() -> None:
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: mean 1/4, centred (3/4, -1/4 x3), population std sqrt(3)/4 -> (sqrt3, -1/sqrt3 x3)
    # group 1: mean 1/2, centred ±1/2, std 1/2 -> ±1
    expected = torch.tensor([S3, -1 / S3, -1 / S3, -1 / S3, 1, 1, -1, -1])
    torch.testing.assert_close(group_advantages(r, ids), expected)
    torch.testing.assert_close(group_advantages(r, ids, scale=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]))


def test_advantages_interleaved_and_noncontiguous_ids() -> None:
    r = torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0])
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # two prompts interleaved: a reshape(2, 4) would be wrong
    expected = torch.tensor([S3, 1, -1 / S3, 1, -1 / S3, -1, -1 / S3, -1])
    torch.testing.assert_close(group_advantages(r, ids), expected)
    torch.testing.assert_close(group_advantages(r, ids * 7 + 3), expected)  # ids 3 and 10
    wrong = (r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)).flatten()  # the batch-layout bug
    assert not torch.allclose(group_advantages(r, ids, scale=False), wrong)


def test_advantages_equal_groups_exactly_zero() -> None:
    r = torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 0.1, 0.1, 0.1, 5.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # group 0 and 2 equal (0.7 has no exact mean), 3 a singleton
    for scale in (True, False):
        adv = group_advantages(r, ids, scale=scale)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[[0, 1, 2, 5, 6, 7, 8]], torch.zeros(7))
        torch.testing.assert_close(adv[3:5], torch.tensor([-1.0, 1.0]) * (1.0 if scale else 0.5))
    assert equal_reward_groups(r, ids).tolist() == [True] * 3 + [False] * 2 + [True] * 4
    assert torch.equal(group_advantages(torch.full((4,), 1.0), torch.zeros(4, dtype=torch.long)), torch.zeros(4))


def test_advantages_per_group_mean_zero_std_one() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.rand(48, generator=g)
    ids = torch.randperm(48, generator=g) % 6  # 6 groups of 8, shuffled
    adv = group_advantages(r, ids)
    for k in range(6):
        a = adv[ids == k]
        assert abs(float(a.mean())) < 1e-5 and abs(float(a.pow(2).mean()) - 1) < 1e-4
    # per prompt, not per batch: adding 10 to one group's rewards changes nothing
    shifted = torch.where(ids == 2, r + 10, r)
    torch.testing.assert_close(group_advantages(shifted, ids), adv)


def test_advantages_errors() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        group_advantages(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(2, 2), torch.zeros(4, dtype=torch.long))


# --- H: the clipped surrogate around the clip edges ------------------------------------------------------

EPS = 0.2
DELTA = 0.01
CASES = [  # (ratio, advantage, clipped side active?)
    (1 + EPS + DELTA, 1.0, True), (1 + EPS - DELTA, 1.0, False), (1 - EPS - DELTA, 1.0, False),
    (1 - EPS + DELTA, 1.0, False), (1 - EPS - DELTA, -1.0, True), (1 - EPS + DELTA, -1.0, False),
    (1 + EPS + DELTA, -1.0, False), (1 + EPS - DELTA, -1.0, False), (1.0, 2.0, False), (1.0, -2.0, False),
    (3.0, 0.5, True), (0.1, -0.5, True), (3.0, -0.5, False), (0.1, 0.5, False),
]


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("ratio, adv, clipped", CASES)
def test_clip_edges_value_and_gradient(variant: str, ratio: float, adv: float, clipped: bool) -> None:
    old = torch.tensor([[-1.3]], dtype=torch.float64)
    logp = (old + math.log(ratio)).clone().requires_grad_(True)
    out = policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                      variant=variant, clip_eps_low=EPS, clip_eps_high=EPS, max_tokens=1)
    out.loss.backward()
    clip_r = min(max(ratio, 1 - EPS), 1 + EPS)
    expected = -min(ratio * adv, clip_r * adv)
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-9, abs_tol=1e-12)
    grad = float(logp.grad)
    if clipped:
        assert grad == 0.0, f"clipped side must pass no gradient, got {grad}"
        assert float(out.clip_frac) == 1.0
    else:
        assert math.isclose(grad, -ratio * adv, rel_tol=1e-9), (grad, -ratio * adv)  # d(-rA)/dlogp = -rA
        assert float(out.clip_frac) == 0.0


@pytest.mark.parametrize("ratio, adv, clipped", [
    (1.25, 1.0, False), (1.29, 1.0, True), (0.79, -1.0, True), (0.81, -1.0, False), (1.29, -1.0, False),
])
def test_clip_higher_asymmetric(ratio: float, adv: float, clipped: bool) -> None:
    """DAPO: ε_low 0.2, ε_high 0.28: a positive advantage may push the ratio up to 1.28."""
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(ratio), dtype=torch.float64, requires_grad=True)
    out = policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                      variant="dapo", clip_eps_low=0.2, clip_eps_high=0.28)
    out.loss.backward()
    assert (float(logp.grad) == 0.0) == clipped
    assert math.isclose(out.loss.item(), -min(ratio * adv, min(max(ratio, 0.8), 1.28) * adv), rel_tol=1e-9)


def test_on_policy_loss_is_minus_mean_advantage_but_gradient_is_not_zero() -> None:
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    logp = old.clone().requires_grad_(True)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long)).double()
    mask = torch.ones(4, 5, dtype=torch.bool)
    out = policy_loss(logp, old, adv, mask, variant="grpo")
    assert abs(out.loss.item()) < 1e-12  # = -mean(A) = 0 for a normalised group
    out.loss.backward()
    # ρ = 1: d loss / d logp_it = -A_i / (|o_i| G): the policy gradient, non-zero
    torch.testing.assert_close(logp.grad, (-adv[:, None] / 5 / 4).expand(4, 5))
    assert logp.grad.abs().sum() > 0


# --- G: aggregation and padding -----------------------------------------------------------------------------

def _two_outputs():
    """Output 0 has 1 token, output 1 has 3; on-policy, A = (+1, -1): per-token losses -1 and +1."""
    logp = torch.tensor([[-0.5, 0, 0], [-0.7, -0.2, -1.1]], dtype=torch.float64)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    return logp, mask, torch.tensor([1.0, -1.0], dtype=torch.float64)


@pytest.mark.parametrize("variant, expected", [
    ("grpo", 0.0),  # mean per output: (-1, +1) -> mean 0
    ("dr_grpo", 0.25),  # sum per output / 4: (-1/4, 3/4) -> mean 1/4
    ("dapo", 0.5),  # all tokens: (-1 + 3) / 4 tokens
])
def test_aggregation_hand_table(variant: str, expected: float) -> None:
    logp, mask, adv = _two_outputs()
    out = policy_loss(logp, logp, adv, mask, variant=variant, max_tokens=4)
    assert math.isclose(out.loss.item(), expected, abs_tol=1e-12)
    assert int(out.n_tokens) == 4


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30, -1e4])
def test_padding_never_changes_loss_or_gradients(variant: str, garbage: float) -> None:
    g = torch.Generator().manual_seed(1)
    B, T, extra = 4, 5, 3
    lengths = torch.tensor([5, 2, 3, 1])
    mask = torch.arange(T)[None] < lengths[:, None]
    base_lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    base_old = base_lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    base_ref = base_lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)

    def run(T_pad: int, fill: float):
        def pad(t):
            out = torch.full((B, T_pad), fill, dtype=torch.float64)
            out[:, :T] = torch.where(mask, t, torch.full_like(t, fill))
            return out
        m = torch.zeros(B, T_pad, dtype=torch.bool)
        m[:, :T] = mask
        lp = pad(base_lp).requires_grad_(True)
        out = policy_loss(lp, pad(base_old), adv, m, ref_logp=pad(base_ref), variant=variant, beta=0.04,
                          clip_eps_low=0.2, clip_eps_high=0.28, max_tokens=8)
        out.loss.backward()
        return out, lp.grad

    clean, grad_clean = run(T, 0.0)
    dirty, grad_dirty = run(T + extra, garbage)
    assert torch.isfinite(dirty.loss) and torch.isfinite(grad_dirty).all()
    torch.testing.assert_close(dirty.loss, clean.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_dirty[:, :T], grad_clean, rtol=0, atol=1e-12)
    assert torch.equal(grad_dirty[:, :T][~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert torch.equal(grad_dirty[:, T:], torch.zeros(B, extra, dtype=torch.float64))
    for name in ("kl", "clip_frac", "ratio_mean", "n_tokens"):
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), rtol=0, atol=1e-12)


def test_dapo_drops_groups_from_every_normaliser() -> None:
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(6, 4, generator=g, dtype=torch.float64)
    old = lp + 0.1 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])  # group 0 all equal -> dropped
    adv = group_advantages(rewards, ids).double()
    keep = ~equal_reward_groups(rewards, ids)
    full = policy_loss(lp, old, adv, mask, variant="dapo", keep=keep)
    sub = policy_loss(lp[3:], old[3:], adv[3:], mask[3:], variant="dapo")
    torch.testing.assert_close(full.loss, sub.loss)
    assert int(full.n_tokens) == int(mask[3:].sum())
    # without dropping, the zero-advantage tokens dilute the mean
    diluted = policy_loss(lp, old, adv, mask, variant="dapo")
    assert abs(diluted.loss.item()) < abs(full.loss.item())


def test_loss_errors() -> None:
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="variant"):
        policy_loss(x, x, torch.zeros(2), m, variant="ppo")
    with pytest.raises(ValueError, match="max_tokens"):
        policy_loss(x, x, torch.zeros(2), m, variant="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), m)


# --- H: KL -----------------------------------------------------------------------------------------------

def test_kl_k3_by_hand_and_gradient() -> None:
    d = torch.tensor([0.0, math.log(2), -math.log(2), 5.0], dtype=torch.float64)  # d = log(π_ref/π_θ)
    logp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    kl = kl_k3(logp, d)
    expected = torch.tensor([0.0, 2 - math.log(2) - 1, 0.5 + math.log(2) - 1, math.exp(5) - 6], dtype=torch.float64)
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, 1 - d.exp())  # d k3 / d logp = 1 - exp(d)
    assert (kl >= 0).all()


def test_kl_k3_monte_carlo_is_the_kl() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = kl_k3(p.log()[x], q.log()[x]).mean()
    exact = (p * (p / q).log()).sum()
    assert abs(float(est - exact)) < 0.01, (float(est), float(exact))


@pytest.mark.parametrize("d", [1e4, -1e4, 88.0, 200.0, -200.0, KL_LOG_RATIO_MAX, 1e30, -1e30, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kl_k3_finite_at_extreme_log_ratios(d: float, dtype: torch.dtype) -> None:
    logp = torch.zeros(1, dtype=dtype, requires_grad=True)
    kl = kl_k3(logp, torch.full((1,), d, dtype=dtype))
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all(), (d, kl, logp.grad)
    assert kl.item() >= 0
    if KL_LOG_RATIO_MAX < d < 1e6:
        assert float(logp.grad) < 0  # still pulls θ towards the reference
    if -1e6 < d < -50:
        assert math.isclose(float(logp.grad), 1.0, rel_tol=1e-2)


def test_kl_k3_continuous_and_increasing_at_the_bound() -> None:
    d = torch.tensor([KL_LOG_RATIO_MAX - 1e-6, KL_LOG_RATIO_MAX, KL_LOG_RATIO_MAX + 1e-6, KL_LOG_RATIO_MAX + 1],
                     dtype=torch.float64)
    kl = kl_k3(torch.zeros(4, dtype=torch.float64), d)
    assert (kl.diff() > 0).all()
    assert abs(float(kl[2] - kl[1])) < 1e-6 * math.exp(KL_LOG_RATIO_MAX) * 1.01


@pytest.mark.parametrize("extreme", [1e4, -1e4])
def test_policy_loss_finite_at_extreme_log_ratios(extreme: float) -> None:
    logp = torch.tensor([[extreme, -1.0]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2, dtype=torch.bool),
                      ref_logp=torch.tensor([[-extreme, 0.0]]), beta=0.04)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()


# --- H: one step moves probability the right way, on a real model ---------------------------------------

def _tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=CharTokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, inter_dim=64,
                      max_seq_len=48, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16,
                      score_func="sigmoid", n_mtp_depth=0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_probability_with_the_advantage(variant: str, sign: float) -> None:
    model = _tiny_model()
    tok = CharTokenizer()
    prompts = [tok.encode("12+34=")]
    resp = torch.tensor([tok.encode("<think>4+2=6</think><answer>46</answer>") + [tok.eos_id]])
    mask = torch.ones_like(resp, dtype=torch.bool)
    with torch.no_grad():
        before = response_logprobs(model, prompts, resp).sum()
    lp = response_logprobs(model, prompts, resp)
    out = policy_loss(lp, lp.detach(), torch.tensor([sign]), mask, variant=variant, max_tokens=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        after = response_logprobs(model, prompts, resp).sum()
    assert (after - before) * sign > 0, (variant, sign, float(before), float(after))


# --- sampling -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_stored_logprobs_are_the_sampling_distribution(temperature: float) -> None:
    model = _tiny_model(1)
    tok = CharTokenizer()
    prompts = [tok.encode(p) for p in ["1+2=", "12+34=", "1+2=", "99-9=", "12+34="]]
    gen = torch.Generator().manual_seed(0)
    ro = sample_responses(model, tok, prompts, max_new_tokens=12, temperature=temperature, generator=gen)
    recomputed = response_logprobs(model, ro.prompts, ro.responses, temperature)
    torch.testing.assert_close(torch.where(ro.mask, recomputed, 0.0), ro.logp, atol=2e-5, rtol=1e-4)
    # a different temperature gives other log-probs: the loss must use the sampling temperature
    other = response_logprobs(model, ro.prompts, ro.responses, temperature * 2)
    assert not torch.allclose(torch.where(ro.mask, other, 0.0), ro.logp, atol=1e-3)
    for row, m, text in zip(ro.responses, ro.mask, ro.texts):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # contiguous from the start
        assert (row[n:] == tok.pad_id).all()
        if tok.eos_id in row[:n].tolist():
            assert row[n - 1] == tok.eos_id and tok.eos_id not in row[:n - 1].tolist()
        assert text == tok.decode(row.tolist())
    out = policy_loss(recomputed, ro.logp, torch.ones(5), ro.mask)
    assert abs(float(out.ratio_mean) - 1) < 1e-4


def test_sampling_seeded() -> None:
    model = _tiny_model(2)
    tok = CharTokenizer()
    prompts = [tok.encode("3+4=")] * 4
    a = sample_responses(model, tok, prompts, 10, 1.0, torch.Generator().manual_seed(5))
    b = sample_responses(model, tok, prompts, 10, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a.responses, b.responses) and torch.equal(a.logp, b.logp)
    with pytest.raises(ValueError, match="max_seq_len"):
        sample_responses(model, tok, prompts, 100, 1.0)


# --- I: rewards --------------------------------------------------------------------------------------------

ADD = Problem("arithmetic", "47+38=", "85")
CD = Problem("countdown", "3 6 4 to 8:", "8", (3, 6, 4))


@pytest.mark.parametrize("text, fmt", [
    ("<think>7+8=15,4+3+1=8</think><answer>85</answer>", 1.0),
    ("<think>first 7+8=15\ncarry 1\n4+3+1=8\n</think>\n<answer>85</answer>\n", 1.0),  # multi-line reasoning
    ("\n  <think>\n\n</think>  <answer>85</answer>", 1.0),
    ("<think><think>x</think></think><answer>85</answer>", 0.0),  # nested
    ("<think>x</think><answer><answer>85</answer></answer>", 0.0),
    ("<think>x<answer>85</answer>", 0.0),  # unclosed think
    ("<think>x</think><answer>85", 0.0),  # unclosed answer
    ("<answer>85</answer><think>x</think>", 0.0),  # reordered
    ("<think>x</think>junk<answer>85</answer>", 0.0),
    ("hello <think>x</think><answer>85</answer>", 0.0),
    ("<think>x</think><answer>85</answer> trailing", 0.0),
    ("<think>x</think><answer>85</answer><answer>85</answer>", 0.0),
    ("85", 0.0), ("", 0.0), ("</think><think><answer></answer>", 0.0),
    ("<think>" + "x" * 10_000 + "</think><answer>85</answer>", 0.0),  # over MAX_RESPONSE_CHARS
])
def test_format_reward(text: str, fmt: float) -> None:
    t0 = time.perf_counter()
    assert format_reward(text) == fmt
    assert time.perf_counter() - t0 < REWARD_TIME_LIMIT_S


def test_layout_parts() -> None:
    assert parse_r1_layout("<think>a\nb</think>\n<answer> 85 </answer>") == ("a\nb", " 85 ")
    assert parse_r1_layout(None) is None  # type: ignore[arg-type]


W = "<think>r</think><answer>{}</answer>"


@pytest.mark.parametrize("answer, problem, acc", [
    ("85", ADD, 1.0), (" 85\n", ADD, 1.0), ("84", ADD, 0.0), ("47+38", ADD, 0.0), ("85.0", ADD, 0.0),
    ("٨٥", ADD, 0.0), ("８５", ADD, 0.0), ("9**9**9", ADD, 0.0), ("9" * 3000, ADD, 0.0), ("", ADD, 0.0),
    ("6/3*4", CD, 1.0), ("4*6/3", CD, 1.0), ("(6-4)*3+2", CD, 0.0), ("6+3-4+3", CD, 0.0), ("8", CD, 0.0),
    ("6/3*4+0", CD, 0.0), ("3+6-4", CD, 0.0), ("6*4/3/(3-3)", CD, 0.0), ("6/(3-3)*4", CD, 0.0), ("-3+6+4", CD, 0.0),
    ("9**9**9", CD, 0.0), ("(" * 100 + "6/3*4" + ")" * 100, CD, 0.0), ("6/3*4 " + " " * 5000, CD, 0.0),
    ("__import__('os').system('x')", CD, 0.0), ("٦/٣*٤", CD, 0.0),
])
def test_accuracy_reward(answer: str, problem: Problem, acc: float) -> None:
    t0 = time.perf_counter()
    assert accuracy_reward(W.format(answer), problem) == acc
    assert time.perf_counter() - t0 < REWARD_TIME_LIMIT_S


def test_accuracy_needs_the_layout() -> None:
    assert accuracy_reward("85", ADD) == 0.0
    assert accuracy_reward("<think>x</think><answer>85", ADD) == 0.0


@pytest.mark.parametrize("problem", [
    Problem("arithmetic", "?", "abc"), Problem("arithmetic", "?", ""), Problem("arithmetic", "?", "1/0"),
    Problem("arithmetic", "?", "9**9**9"), Problem("arithmetic", "?", "47+38"),
    Problem("countdown", "?", "x", (1, 2)), Problem("countdown", "?", "3", ()), Problem("other", "?", "3"),
])
def test_unparseable_reference_never_scores(problem: Problem) -> None:
    for answer in ["abc", "", "1/0", "9**9**9", "47+38", "85", "3", "1+2", "x", problem.answer]:
        assert accuracy_reward(W.format(answer), problem) == 0.0, (problem, answer)


def test_rewards_never_execute_model_text(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("a reward executed text")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, boom)
    import ast
    monkeypatch.setattr(ast, "literal_eval", boom)
    texts = [W.format(a) for a in ["85", "__import__('os')", "6/3*4", "(lambda: 1)()", "9**9**9"]]
    score_responses(texts, [ADD, CD, CD, ADD, CD])


def test_pathological_inputs_each_within_time() -> None:
    bad = [
        "<think>" * 5000, "</answer>" * 2000, "<think>" + "\n" * 4000 + "</think><answer>1</answer>",
        W.format("9" * 4000), W.format("(" * 2000), W.format("1+" * 1900 + "1"), W.format("-" * 3000 + "1"),
        "x" * 10_000, "<think>a</think><answer>" + "٣" * 4000 + "</answer>", "\x00" * 10_000,
    ]
    for text in bad:
        for problem in (ADD, CD):
            t0 = time.perf_counter()
            accuracy_reward(text, problem)
            format_reward(text)
            assert time.perf_counter() - t0 < REWARD_TIME_LIMIT_S, text[:40]


def test_score_responses() -> None:
    r, acc, fmt = score_responses([W.format("85"), W.format("84"), "85"], [ADD] * 3, format_weight=0.1)
    torch.testing.assert_close(r, torch.tensor([1.1, 0.1, 0.0]))
    assert acc.tolist() == [1.0, 0.0, 0.0] and fmt.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="responses"):
        score_responses(["a"], [ADD, ADD])


def test_generated_solutions_score_one() -> None:
    for task in (ArithmeticTask(), CountdownTask()):
        for p in task.problems(100, "train", seed=0):
            assert accuracy_reward(p.solution, p) == 1.0 and format_reward(p.solution) == 1.0


# --- config, loop and CLI -------------------------------------------------------------------------------------

def test_grpo_config_validation() -> None:
    with pytest.raises(ValueError, match=r"group_size=1 must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match=r"clip_eps_low=1.0 must be in \(0, 1\)"):
        GRPOConfig(clip_eps_low=1.0)
    with pytest.raises(ValueError, match=r"variant='ppo'"):
        GRPOConfig(variant="ppo")
    with pytest.raises(ValueError, match=r"temperature=nan"):
        GRPOConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"beta=-0.1"):
        GRPOConfig(beta=-0.1)
    with pytest.raises(ValueError, match="unknown GRPOConfig field"):
        GRPOConfig.from_dict({"G": 8})
    d = GRPOConfig.for_variant("dapo")
    assert (d.clip_eps_low, d.clip_eps_high, d.beta) == (0.2, 0.28, 0.0)
    assert GRPOConfig.for_variant("dapo", beta=0.01).beta == 0.01
    assert GRPOConfig.from_dict(GRPOConfig().to_dict()) == GRPOConfig()


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loop_runs(variant: str) -> None:
    model = _tiny_model(3)
    tok = CharTokenizer()
    task = ArithmeticTask(n_digits=1)
    cfg = GRPOConfig.for_variant(variant, steps=2, group_size=4, prompts_per_step=2, max_new_tokens=8,
                                 eval_every=1, n_eval=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = grpo_train(model, tok, task, cfg, task.problems(4, "test", seed=0, distinct=True), progress=False)
    assert len(res.history) == 2 and len(res.evals) == 2
    for row in res.history:
        assert {"reward", "accuracy", "kl", "length", "clip_frac", "format"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a random model rarely earns a reward: no change is allowed only when every group was equal
    assert changed or all(r["zero_var_groups"] == 1.0 for r in res.history)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("gate.bias"))


def test_cli_grpo_end_to_end(tmp_path, capsys) -> None:
    from deepseek_edu.__main__ import main

    out = tmp_path / "metrics.json"
    code = main(["grpo", "--steps", "1", "--sft-steps", "2", "--group-size", "2", "--prompts-per-step", "2",
                 "--n-eval", "2", "--max-new-tokens", "8", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text
    res = json.loads(out.read_text())
    assert {"accuracy_sft", "accuracy_grpo", "history", "config"} <= set(res)
    assert main(["grpo", "--group-size", "1", "--no-progress"]) == 2
    assert "group_size=1" in capsys.readouterr().err


def test_sft_batch_masks_the_response_only() -> None:
    from deepseek_edu.grpo import sft_batch

    tok = CharTokenizer()
    probs = [ArithmeticTask().make(47, "+", 38), ArithmeticTask().make(5, "+", 7)]
    x, y, m = sft_batch(tok, probs)
    for i, p in enumerate(probs):
        target = tok.encode(p.solution) + [tok.eos_id]
        assert y[i][m[i]].tolist() == target  # exactly the response and its eos are learned
        assert x[i, : len(tok.encode(p.prompt))].tolist() == tok.encode(p.prompt)
    assert not m[1, len(tok.encode(probs[1].prompt + probs[1].solution)):].any()  # no loss on padding


def test_sft_lowers_the_loss_and_stops_part_way() -> None:
    from deepseek_edu.grpo import supervised_finetune

    model = _tiny_model(4)
    task = ArithmeticTask(n_digits=1, ops="+")
    losses = supervised_finetune(model, CharTokenizer(), task, steps=30, batch_size=8, lr=3e-3, progress=False)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    seen = []
    supervised_finetune(_tiny_model(4), CharTokenizer(), task, steps=3, batch_size=4, progress=False,
                        on_step=lambda s, l: seen.append(s), schedule_steps=100)
    assert seen == [1, 2, 3]


def test_group_advantages_of_nearly_equal_rewards_are_exact() -> None:
    # Rewards that differ in their last bits: the group mean must not be off by a rounding step.
    adv = group_advantages(torch.tensor([100.0, 100.00001, 100.0]), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(adv, torch.tensor([-0.5**0.5, 2**0.5, -0.5**0.5]), atol=1e-3, rtol=0)
    adv64 = group_advantages(torch.tensor([1.0, 1 + 1e-6, 1.0], dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(adv64, torch.tensor([-0.5**0.5, 2**0.5, -0.5**0.5]), atol=1e-5, rtol=0)
    assert abs(float(adv64.double().sum())) < 1e-6


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_padding_width_never_changes_the_loss_bitwise(variant) -> None:
    torch.manual_seed(0)
    B, T = 8, 13
    logp = torch.randn(B, T)
    old = logp + 0.1 * torch.randn(B, T)
    adv, mask = torch.randn(B), torch.rand(B, T) > 0.3
    base = policy_loss(logp, old, adv, mask, variant=variant, max_tokens=80).loss
    for extra in (1, 5, 17, 64):
        def pad(t, v):
            return torch.cat([t, torch.full((B, extra), v, dtype=t.dtype)], 1)
        padded = policy_loss(pad(logp, 3.0), pad(old, -2.0), adv, pad(mask, False), variant=variant, max_tokens=80)
        assert torch.equal(padded.loss, base), (variant, extra)


def _sample_responses_ref(model, tokenizer, prompts, max_new_tokens, temperature, generator):
    """The sampling loop GRPO had before it shared `generate.decode` (a reference for the test below)."""
    model.eval()
    N = len(prompts)
    responses = torch.full((N, max_new_tokens), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(N, max_new_tokens, dtype=torch.bool)
    logps = torch.zeros(N, max_new_tokens)
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    for L, rows in buckets.items():
        idx = torch.tensor(rows)
        tokens = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long)
        cache = model.new_cache(len(rows), max_len=L + max_new_tokens)
        logits = model(tokens, cache).logits[:, -1]
        done = torch.zeros(len(rows), dtype=torch.bool)
        for t in range(max_new_tokens):
            lp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
            nxt = (torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1) if temperature > 0
                   else lp.argmax(dim=-1))
            live = ~done
            responses[idx[live], t] = nxt[live]
            mask[idx[live], t] = True
            logps[idx[live], t] = lp.gather(1, nxt[:, None]).squeeze(1)[live]
            done = done | (nxt == tokenizer.eos_id)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache).logits[:, -1]
    T = max(int(mask.sum(dim=1).max()), 1)
    return responses[:, :T], mask[:, :T], logps[:, :T]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_sample_responses_runs_the_one_decode_loop_with_the_same_outputs(temperature: float) -> None:
    model = _tiny_model(5)
    tok = CharTokenizer()
    task = ArithmeticTask(n_digits=1)
    prompts = [tok.encode(p.prompt) for p in task.problems(3, "test", seed=1) for _ in range(2)]
    prompts += [tok.encode("12+34=")] * 2  # a second prompt length: another bucket
    ro = sample_responses(model, tok, prompts, 10, temperature, torch.Generator().manual_seed(7))
    resp, mask, logp = _sample_responses_ref(model, tok, prompts, 10, temperature, torch.Generator().manual_seed(7))
    assert torch.equal(ro.responses, resp) and torch.equal(ro.mask, mask)
    torch.testing.assert_close(ro.logp, logp, atol=1e-5, rtol=0)
