"""Tests of deepseek_edu.generate: `sample_next` and `generate` with the KV cache.

Checks:
- greedy generation equals the argmax of a full forward recomputed from scratch (no cache) at
  every step, token for token (pitfalls kind E), for mha, gqa and mla; the prompt comes back unchanged
  as the prefix (nothing prepended, no duplicate BOS);
- a batch of prompts equals the prompts generated one by one (greedy);
- sampling: reproducible with a seed, different with another seed; the empirical distribution is
  softmax(logits / temperature); temperature -> 0 and top_k = 1 equal greedy;
- top-k keeps the k largest; top-p keeps the smallest set whose probability reaches top_p (the
  documented rule), checked on hand-made distributions including the exact boundary (0.25 each:
  top_p 0.5 keeps exactly two); top-p applies to what top-k left (as `transformers`' warpers do);
- eos: a row stops at eos and is padded with eos; generation ends when every row has stopped;
- edge values equal their limits exactly: top_k = 1 and top_p -> 0 are argmax (ties included), a tiny
  temperature is greedy and never NaN, a huge one finite and uniform;
- errors: bad temperature / top_k / top_p / max_new_tokens, empty or 3-D prompts, and requests
  longer than max_seq_len raise ValueError;
- speculative decoding (pitfalls kind E): token for token the greedy output for every attention kind, dense
  and MoE FFNs, MTP depth 1 and 2 (untrained MTP drafts: mostly rejected), and for always-right,
  always-wrong and alternating drafts on a model without MTP modules; the main cache ends with every
  token but the last; the mode is restored. Trained-model cases are in tests/test_mtp.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_edu.config import ModelConfig
from deepseek_edu.generate import generate, sample_logprobs, sample_next, speculative_generate
from deepseek_edu.model import Transformer

V = 61
KINDS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mla": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
}
N_SAMPLES = 20_000  # rows per sampling-frequency check: std of a frequency <= 0.0036
FREQ_TOL = 0.02  # > 5 standard deviations


def _model(kind="mha", seed=0, **kw):
    # init_std 0.2: peaked, varied next-token distributions (greedy paths that do not just repeat)
    cfg = ModelConfig(**(dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, inter_dim=48, max_seq_len=32,
                              init_std=0.2) | KINDS[kind] | kw))
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _prompt(B, S, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_no_cache(model, prompt, n):
    tokens = prompt.clone()
    for _ in range(n):
        nxt = model(tokens).logits[:, -1].argmax(-1)  # full forward from scratch each step
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens


def _support_and_freq(logits_row, n=N_SAMPLES, seed=0, **kw):
    logits = logits_row.expand(n, -1)
    draws = sample_next(logits, generator=torch.Generator().manual_seed(seed), **kw)
    freq = torch.bincount(draws, minlength=logits_row.shape[-1]).double() / n
    return set(torch.nonzero(freq).flatten().tolist()), freq


# --- greedy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_equals_full_forward_argmax(kind):
    model = _model(kind)
    prompt = _prompt(1, 5)
    out = generate(model, prompt[0], max_new_tokens=12)
    ref = _greedy_no_cache(model, prompt, 12)
    assert out.shape == (1, 17) and out.dtype == torch.int64
    assert torch.equal(out[:, :5], prompt), "the prompt must come back unchanged"
    assert out.tolist() == ref.tolist()
    assert len(set(out[0, 5:].tolist())) > 2, "degenerate greedy path: the test would prove little"


def test_batch_equals_one_by_one():
    model = _model("gqa")
    prompts = _prompt(3, 6, seed=4)
    batch = generate(model, prompts, max_new_tokens=10)
    for b in range(3):
        single = generate(model, prompts[b].tolist(), max_new_tokens=10)
        assert batch[b].tolist() == single[0].tolist(), f"row {b}"


def test_zero_new_tokens_returns_prompt():
    model = _model()
    prompt = _prompt(2, 4)
    assert torch.equal(generate(model, prompt, max_new_tokens=0), prompt)


def test_leaves_the_mode_as_it_found_it():
    model = _model().eval()
    generate(model, [1, 2, 3], max_new_tokens=2)
    assert not model.training


# --- sampling ------------------------------------------------------------------------------------

def test_sampling_reproducible_with_seed():
    model = _model()
    prompt = _prompt(2, 4)
    kw = dict(max_new_tokens=20, temperature=1.5)
    a = generate(model, prompt, seed=123, **kw)
    b = generate(model, prompt, seed=123, **kw)
    c = generate(model, prompt, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "another seed gave the same 40 sampled tokens"
    assert not torch.equal(a, generate(model, prompt, max_new_tokens=20)), "sampling equals greedy"


def test_sampling_frequencies_follow_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for T in (0.5, 1.0, 2.0):
        _, freq = _support_and_freq(logits, temperature=T)
        expected = torch.softmax(logits.double() / T, -1)
        assert (freq - expected).abs().max() < FREQ_TOL, f"T={T}: {freq.tolist()} vs {expected.tolist()}"


def test_temperature_to_zero_and_top_k_1_equal_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, V) * 3
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0.0), greedy)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1e-4, generator=gen), greedy)
    assert torch.equal(sample_next(logits, temperature=5.0, top_k=1, generator=gen), greedy)
    model = _model()
    prompt = _prompt(2, 4)
    greedy_text = generate(model, prompt, max_new_tokens=10)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=1.0, top_k=1, seed=5), greedy_text)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=1e-4, seed=5), greedy_text)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.5, 0.0])
    support, freq = _support_and_freq(logits, top_k=3)
    assert support == {1, 3, 4}
    expected = torch.softmax(torch.tensor([3.0, 2.0, 2.5]).double(), -1)
    assert (freq[[1, 3, 4]] - expected).abs().max() < FREQ_TOL
    assert _support_and_freq(logits, top_k=100)[0] == set(range(6))  # k >= V: everything


@pytest.mark.parametrize("top_p, kept", [
    (0.3, {0}),  # 0.5 alone reaches 0.3
    (0.79, {0, 1}),  # 0.5 + 0.3 = 0.8 reaches 0.79
    (0.81, {0, 1, 2}),  # needs 0.95
    (0.96, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    support, freq = _support_and_freq(probs.log(), top_p=top_p)
    assert support == kept, f"top_p={top_p}: kept {sorted(support)}, expected {sorted(kept)}"
    renorm = probs[sorted(kept)].double() / probs[sorted(kept)].sum()
    assert (freq[sorted(kept)] - renorm).abs().max() < FREQ_TOL


@pytest.mark.parametrize("top_p, n_kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.7500001, 4), (0.2499999, 1)])
def test_top_p_exact_boundary(top_p, n_kept):
    # Four equal logits: every probability is exactly 0.25 and the cumulative sums are exact, so
    # "reaches" (>=) is tested exactly: top_p = 0.5 keeps two tokens, not three.
    support, _ = _support_and_freq(torch.zeros(4), top_p=top_p)
    assert len(support) == n_kept, f"top_p={top_p}: kept {sorted(support)}"


def test_top_p_applies_to_what_top_k_left():
    # top_k=2 leaves [0.5, 0.3] -> renormalised [0.625, 0.375]: 0.625 reaches top_p = 0.6 alone.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    support, _ = _support_and_freq(probs.log(), top_k=2, top_p=0.6)
    assert support == {0}


def test_sample_next_rejects_bad_arguments():
    logits = torch.zeros(2, 5)
    for kw in (dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2)):
        with pytest.raises(ValueError):
            sample_next(logits, **kw)


# --- eos -----------------------------------------------------------------------------------------

def test_eos_stops_a_single_row():
    model = _model()
    prompt = _prompt(1, 4)
    free = generate(model, prompt, max_new_tokens=12)[0, 4:].tolist()
    k = 3
    eos = free[k]
    first = free.index(eos)  # eos may also occur earlier on this path
    out = generate(model, prompt, max_new_tokens=12, eos_id=eos)
    assert out.shape == (1, 4 + first + 1), f"stopped at {out.shape[1] - 4} new tokens, expected {first + 1}"
    assert out[0, 4:].tolist() == free[:first + 1]


def test_eos_pads_finished_rows_and_stops_when_all_done():
    model = _model()
    prompts = _prompt(3, 4, seed=9)
    n = 12
    free = generate(model, prompts, max_new_tokens=n)[:, 4:]
    eos = free[0, 2].item()
    out = generate(model, prompts, max_new_tokens=n, eos_id=eos)
    expected, stops = [], []
    for row in free.tolist():
        stop = row.index(eos) if eos in row else None
        stops.append(stop)
        expected.append(row if stop is None else row[:stop + 1] + [eos] * (n - stop - 1))
    length = n if None in stops else max(stops) + 1  # ends early only when every row has stopped
    assert out.shape == (3, 4 + length)
    assert out[:, 4:].tolist() == [r[:length] for r in expected]
    assert torch.equal(out[:, :4], prompts)


# --- errors --------------------------------------------------------------------------------------

def test_generate_rejects_bad_requests():
    model = _model()  # max_seq_len 32
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(model, _prompt(1, 30)[0], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(model, _prompt(1, 33)[0], max_new_tokens=0)
    generate(model, _prompt(1, 30)[0], max_new_tokens=2)  # exactly max_seq_len: fine
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError):
        generate(model, torch.zeros(1, 2, 3, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], max_new_tokens=-1)
    with pytest.raises(ValueError):
        generate(model, [1, V], max_new_tokens=2)  # token id out of range
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_k=-2), dict(temperature=1.0, top_p=0.0),
               dict(temperature=1.0, top_p=2.0)):
        with pytest.raises(ValueError):
            generate(model, [1, 2], max_new_tokens=3, **kw)
        with pytest.raises(ValueError):  # checked even when nothing is sampled
            generate(model, [1, 2], max_new_tokens=0, **kw)


def test_sampling_entropy_sanity():
    # the random model used above is not one-hot: sampling at T=1 really samples
    model = _model()
    probs = torch.softmax(model(_prompt(1, 4)).logits[0, -1].double(), -1)
    entropy = -(probs * probs.log()).sum().item()
    assert 0.2 < entropy < math.log(V)


def test_float_prompt_is_rejected() -> None:
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, inter_dim=64, max_seq_len=16))
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, torch.tensor([1.7, 2.2]), 3)


def test_generate_restores_the_training_mode_and_rejects_nan_temperature() -> None:
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, inter_dim=64, max_seq_len=16))
    model.train()
    generate(model, [1, 2], 3)
    assert model.training  # MoE load (aux-loss-free balancing) only accumulates in training mode
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1, 2], 3, temperature=float("nan"))


# --- speculative decoding --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_with_mtp_equals_greedy(kind, moe, depth):
    extra = dict(n_mtp_depth=depth)
    if moe:
        extra |= dict(n_dense_layers=1, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=16)
    model = _model(kind, **extra)
    prompt = _prompt(1, 5, seed=3)[0]
    ref = generate(model, prompt, max_new_tokens=20)
    out = speculative_generate(model, prompt, max_new_tokens=20)
    assert out.tokens.tolist() == ref.tolist()
    assert out.cache.length == 5 + 20 - 1
    assert all(c.length <= 5 + 20 - 1 - k for k, c in enumerate(out.mtp_caches, start=1))
    assert not model.training


@pytest.mark.parametrize("n_draft", [1, 3])
def test_speculative_with_custom_drafts_equals_greedy(n_draft):
    model = _model("mla")  # no MTP modules: the draft is given
    prompt = _prompt(1, 4, seed=5)[0]
    ref = generate(model, prompt, max_new_tokens=18)[0].tolist()
    drafts = {
        "right": lambda t, n: ref[len(t):len(t) + n],
        "wrong": lambda t, n: [(x + 1) % V for x in ref[len(t):len(t) + n]],
        # right, then wrong: partial acceptance in the middle of a draft
        "half": lambda t, n: [x if i == 0 else (x + 1) % V for i, x in enumerate(ref[len(t):len(t) + n])],
    }
    for name, fn in drafts.items():
        out = speculative_generate(model, prompt, 18, n_draft=n_draft, draft=fn)
        assert out.tokens[0].tolist() == ref, name
        assert out.cache.length == 4 + 18 - 1, name
    half = speculative_generate(model, prompt, 18, n_draft=n_draft, draft=drafts["half"])
    assert half.accepted[0] == half.drafted[0] and sum(half.accepted[1:]) == 0


def test_speculative_with_deep_mtp_and_a_short_prompt_equals_greedy():
    # Depth 3 with a one-token prompt: depth k's first positions read drafts of shallower depths only
    # (a prompt of N + 1 <= n_draft - 1 tokens); found by review, it used to raise inside the draft.
    from deepseek_edu.config import ModelConfig
    from deepseek_edu.generate import generate, speculative_generate
    from deepseek_edu.model import Transformer

    cfg = ModelConfig(vocab_size=23, dim=32, n_layers=3, n_heads=2, inter_dim=64, max_seq_len=40, attention="mla",
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                      n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16, n_expert_groups=4,
                      n_limited_groups=2, score_func="sigmoid", n_mtp_depth=3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for prompt in ([5], [5, 7], [5, 7, 1], [5, 7, 1, 2]):
        for n in (1, 2, 5, 9):
            out = speculative_generate(model, prompt, n, n_draft=3)
            assert torch.equal(out.tokens, generate(model, prompt, n)), (prompt, n)


# --- sampling at its edge values equals its limit exactly -----------------------------------------------


def _tied_logits() -> torch.Tensor:
    # rows with a tie at the maximum (indices 2 and 5), a tie below it, and a row without ties
    return torch.tensor([[0.0, 1.0, 3.0, -2.0, 1.0, 3.0, 0.5],
                         [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])


def test_top_k_1_is_argmax_exactly_even_on_ties():
    logits = _tied_logits()
    greedy = logits.argmax(dim=-1)  # the first maximum: [2, 0, 6]
    assert greedy.tolist() == [2, 0, 6]
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, temperature=3.0, top_k=1, generator=gen), greedy)
        assert torch.equal(sample_next(logits, temperature=3.0, top_k=1, top_p=0.3, generator=gen), greedy)


def test_top_k_keeps_exactly_k_tokens_with_ties():
    logp = sample_logprobs(_tied_logits(), temperature=1.0, top_k=2)
    assert (torch.isfinite(logp).sum(dim=-1) == 2).all()
    assert torch.isfinite(logp[0, [2, 5]]).all() and torch.isfinite(logp[1, [0, 1]]).all()  # ties by index
    big = sample_logprobs(_tied_logits(), temperature=1.0, top_k=100)
    assert torch.equal(big, sample_logprobs(_tied_logits(), temperature=1.0))  # k >= V: no filter


@pytest.mark.parametrize("T", [1e-3, 1e-8, 1e-30, 1e-45])
def test_tiny_temperature_is_greedy_and_never_nan(T):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    logp = sample_logprobs(logits, temperature=T)
    assert not torch.isnan(logp).any()
    for seed in range(5):
        assert torch.equal(sample_next(logits, temperature=T, generator=torch.Generator().manual_seed(seed)),
                           logits.argmax(dim=-1))
    # with tied maxima the limit is uniform over them: only tied maxima are ever drawn
    tied = _tied_logits()
    draws = torch.stack([sample_next(tied, temperature=1e-30, generator=torch.Generator().manual_seed(s))
                         for s in range(50)])
    assert set(draws[:, 0].tolist()) <= {2, 5} and draws[:, 2].eq(6).all()


def test_temperature_0_logprobs_are_a_one_point_distribution_at_argmax():
    logp = sample_logprobs(_tied_logits(), temperature=0.0)
    assert torch.equal(logp.exp(), torch.nn.functional.one_hot(_tied_logits().argmax(-1), 7).float())


def test_huge_temperature_is_finite_and_uniform():
    logits = torch.tensor([[50.0, -50.0, 0.0, 10.0]])
    logp = sample_logprobs(logits, temperature=1e30)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp(), torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=float("inf"))


def test_top_p_edges():
    logits = _tied_logits()
    # top_p -> 0: only the most likely token, argmax's choice on ties (the sort is stable)
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        tiny_p = sample_next(logits, temperature=1.0, top_p=1e-9, generator=gen)
        assert torch.equal(tiny_p, logits.argmax(dim=-1))
    # top_p = 1: no filtering at all
    torch.testing.assert_close(sample_logprobs(logits, 1.0, top_p=1.0), logits.log_softmax(-1))
