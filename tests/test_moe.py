"""Tests of deepseek_edu.moe: the DeepSeekMoE gate, its balancing, and the MoE layer in the model.

Checks:
- routing semantics (pitfalls kind A), on small hand-computed cases:
  - the pitfalls example (scores [0.9, 0.1, 0.5, 0.2], bias [-1, +1, 0, 0] -> experts {1, 2} with
    weights 1/6, 5/6 times route_scale) and other biased cases: the bias chooses, it never weighs;
  - masked groups are -inf, not 0: negative biased scores where a 0-fill would pick an expert of a
    dropped group (sigmoid + top2_sum and softmax + max);
  - the group score is the sum of the two largest *biased* scores (V3) or their max (V2): hand cases
    where top2_sum, max and a whole-group sum keep different groups;
  - normalisation and `route_scale` exactly once (sigmoid + norm sums to route_scale; softmax V2
    without norm is probs x route_scale), and never on the shared expert;
  - exactly K distinct experts per token, all inside the kept groups;
  - impossible group layouts raise ValueError naming the fields (ModelConfig);
  - the router works in fp32 (pitfalls kind F): logits that tie in bf16 but not in fp32 route as fp32 says;
  - an independent per-token reference of the papers' equations (`_route_ref`, float64 python)
    agrees with `Gate` for sigmoid/softmax, groups on/off, top2_sum/max, norm on/off, nonzero bias;
  - `MoE` output = a per-token loop (shared + sum_k w_k expert_{i_k}(x)) to 1e-5 in fp32; the
    grouped `dispatch` calls each expert at most once per forward, only on the tokens routed to it;
  - the same weights in `transformers`' DeepseekV3MoE / DeepseekV3TopkRouter give the same experts,
    weights and outputs (sigmoid + top2_sum + norm only: that is all `transformers` implements).
- balancing bookkeeping (pitfalls kind B):
  - `update_bias` hand cases (loads [10, 2, 2, 2], gamma 1e-3 -> [-g, +g, +g, +g]; ties to the mean
    do not move; equal loads do not move; overloaded goes down) and its errors;
  - the bias is fp32 and stays fp32 after `.to(torch.bfloat16)`; 1000 steps of 1e-3 reach 1.0;
  - the bias is a buffer: not a parameter, not in the optimizer, no gradient; the gate weight gets a
    gradient through the combine weights and (alphas > 0) through the aux losses, equal to autograd
    of a reference loss;
  - `MoE.update_bias` / `Transformer.update_router_biases` use the load summed over all training
    forwards since the last update (two micro-batches), then reset; eval forwards and speed 0 do
    not move the bias; the accumulated load stays exact after `.to(torch.bfloat16)`;
  - `sequence_balance_loss` / `expert_balance_loss` hand values (per sequence, not per batch;
    balanced -> 1), `max_violation` hand values;
  - `ModelOutput.aux_loss` = sum over MoE layers of alpha x reference loss (0 when alphas are 0);
    `ModelOutput.expert_load` has one (E,) tensor per MoE layer summing to tokens x K;
- a Transformer with a dense first layer then MoE gives the same logits from a full forward and
  from a prefill + token-by-token decoding (pitfalls kind E) within 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_edu.config import ModelConfig
from deepseek_edu.model import Transformer
from deepseek_edu.moe import (
    Gate,
    MoE,
    expert_balance_loss,
    max_violation,
    sequence_balance_loss,
    update_bias,
)

# fp32 weights out of sigmoid(logit(s)) and a normalisation: a few ulps of values O(1..2.5).
WEIGHT_TOL = dict(atol=1e-6, rtol=1e-6)
# fp32 MoE outputs O(1) against a per-token loop doing the same fp32 math in another order.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
GAMMA = 1e-3


def _max_diff(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


def _close(a, b, tol=FP32_TOL, what=""):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} max diff {_max_diff(a, b)}\n{m}")


def _cfg(**kw) -> ModelConfig:
    """A tiny valid MoE config: 8 experts in 4 groups of 2, 2 groups kept, top-2, one shared expert.

    head_dim is set so that `dim` can be anything (the hand-made gates use dim = tokens or 2).
    """
    base = dict(vocab_size=61, dim=16, n_layers=3, n_heads=2, head_dim=8, max_seq_len=32, inter_dim=24,
                n_dense_layers=1, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1,
                moe_inter_dim=8, n_expert_groups=4, n_limited_groups=2, score_func="sigmoid",
                group_score="top2_sum", route_scale=2.5, norm_topk_prob=True, bias_update_speed=GAMMA,
                seq_aux_loss_alpha=0.0, expert_aux_loss_alpha=0.0)
    return ModelConfig(**(base | kw))


def _gate_from_scores(scores, bias=None, **kw) -> tuple[Gate, torch.Tensor]:
    """A Gate whose affinities on the returned tokens are exactly the given (N, E) `scores`.

    Token n is the one-hot e_n (D = N), so logits[n, i] = weight[i, n]; the weight column is
    logit(s) = log(s / (1 - s)) for sigmoid and log(p) for softmax (rows of p sum to 1).
    """
    scores = torch.tensor(scores, dtype=torch.float64)
    N, E = scores.shape
    cfg = _cfg(dim=N, n_routed_experts=E, **kw)
    gate = Gate(cfg)
    logits = torch.log(scores / (1 - scores)) if cfg.score_func == "sigmoid" else torch.log(scores)
    with torch.no_grad():
        gate.weight.copy_(logits.T.float())  # (E, D=N)
        if bias is not None:
            gate.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return gate, torch.eye(N)


def _chosen(routing, n=0) -> dict[int, float]:
    """{expert: weight} of token n (order of the K slots does not matter)."""
    return {int(i): float(w) for i, w in zip(routing.indices[n], routing.weights[n].detach())}


def _assert_chosen(routing, n, expected: dict[int, float], what=""):
    got = _chosen(routing, n)
    assert set(got) == set(expected), f"{what}: token {n} chose {sorted(got)}, expected {sorted(expected)}"
    for i, w in expected.items():
        assert math.isclose(got[i], w, rel_tol=1e-6, abs_tol=1e-6), \
            f"{what}: expert {i} weight {got[i]} != {w}"


# --- pitfalls kind A: the bias chooses, the unbiased scores weigh ---------------------------------------

def test_faults_example_bias_chooses_scores_weigh():
    gate, x = _gate_from_scores([[0.9, 0.1, 0.5, 0.2]], bias=[-1.0, 1.0, 0.0, 0.0],
                                n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
    routing = gate(x)
    _close(routing.scores, torch.tensor([[0.9, 0.1, 0.5, 0.2]]), WEIGHT_TOL, "scores")
    # biased: [-0.1, 1.1, 0.5, 0.2] -> {1, 2}; weights 0.1 / 0.6 and 0.5 / 0.6, times route_scale 2.5
    _assert_chosen(routing, 0, {1: 2.5 / 6, 2: 2.5 * 5 / 6}, "pitfalls example")
    assert routing.weights.sum().item() == pytest.approx(2.5, abs=1e-6)


def test_bias_changes_choice_but_not_weights_hand_cases():
    scores = [[0.9, 0.1, 0.5, 0.2],
              [0.3, 0.8, 0.6, 0.7],
              [0.4, 0.45, 0.5, 0.55]]
    bias = [0.0, -0.5, 0.0, 0.25]
    common = dict(n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
    gate, x = _gate_from_scores(scores, bias=bias, norm_topk_prob=False, route_scale=1.0, **common)
    r = gate(x)
    # token 0: biased [0.9, -0.4, 0.5, 0.45] -> {0, 2}; weights 0.9, 0.5
    _assert_chosen(r, 0, {0: 0.9, 2: 0.5}, "token 0")
    # token 1: biased [0.3, 0.3, 0.6, 0.95] -> {3, 2}; unbiased weights 0.7, 0.6 (not 0.95, 0.6)
    _assert_chosen(r, 1, {3: 0.7, 2: 0.6}, "token 1")
    # token 2: biased [0.4, -0.05, 0.5, 0.8] -> {3, 2}; weights 0.55, 0.5
    _assert_chosen(r, 2, {3: 0.55, 2: 0.5}, "token 2")
    # the same tokens without bias choose by the scores alone
    gate0, _ = _gate_from_scores(scores, bias=None, norm_topk_prob=False, route_scale=1.0, **common)
    r0 = gate0(x)
    _assert_chosen(r0, 0, {0: 0.9, 2: 0.5}, "no bias token 0")
    _assert_chosen(r0, 1, {1: 0.8, 3: 0.7}, "no bias token 1")
    # normalised and scaled: route_scale 2.5 * [0.7, 0.6] / 1.3
    gate_n, _ = _gate_from_scores(scores, bias=bias, norm_topk_prob=True, route_scale=2.5, **common)
    _assert_chosen(gate_n(x), 1, {3: 2.5 * 0.7 / 1.3, 2: 2.5 * 0.6 / 1.3}, "normalised token 1")


def test_bias_never_leaks_into_weights_random():
    # Weights must equal the unbiased scores gathered at the chosen experts (normalised, scaled),
    # whatever the bias; a large random bias makes a leak visible in every row.
    for score_func, norm in [("sigmoid", True), ("sigmoid", False), ("softmax", False), ("softmax", True)]:
        cfg = _cfg(score_func=score_func, norm_topk_prob=norm, group_score="max" if score_func == "softmax"
                   else "top2_sum")
        torch.manual_seed(0)
        gate = Gate(cfg)
        with torch.no_grad():
            gate.weight.normal_(0, 0.5)
            gate.bias.copy_(torch.randn(cfg.n_routed_experts))
        x = torch.randn(50, cfg.dim)
        r = gate(x)
        logits = x @ gate.weight.T
        s = torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, -1)
        w = s.gather(1, r.indices)
        if norm:
            w = w / w.sum(-1, keepdim=True)
        _close(r.weights, w * cfg.route_scale, WEIGHT_TOL, f"{score_func} norm={norm}: weights")
        _close(r.scores, s, WEIGHT_TOL, f"{score_func}: scores")
        assert r.weights.dtype == r.scores.dtype == torch.float32 and r.indices.dtype == torch.int64


# --- pitfalls kind A: group-limited routing --------------------------------------------------------------

def test_masked_groups_are_minus_inf_sigmoid_top2_sum():
    # 2 groups of 2, keep 1, top-2. All biased scores negative (bias -2): group sums A=-2.7, B=-3.1
    # keep A -> {0, 1}. A 0-fill of group B would pick {2, 3} (0 > -1.3).
    gate, x = _gate_from_scores([[0.7, 0.6, 0.5, 0.4]], bias=[-2.0] * 4, n_activated_experts=2,
                                n_expert_groups=2, n_limited_groups=1)
    _assert_chosen(gate(x), 0, {0: 2.5 * 0.7 / 1.3, 1: 2.5 * 0.6 / 1.3}, "sigmoid top2_sum")
    # 3 groups of 2, keep 2, top-3, bias -1: biased [-.1, -.2, -.7, -.8, -.3, -.4]; group sums
    # A -0.3, B -1.5, C -0.7 -> keep A, C -> {0, 1, 4}. A 0-fill would take 2 and 3.
    gate, x = _gate_from_scores([[0.9, 0.8, 0.3, 0.2, 0.7, 0.6]], bias=[-1.0] * 6, n_activated_experts=3,
                                n_expert_groups=3, n_limited_groups=2, norm_topk_prob=False, route_scale=1.0)
    _assert_chosen(gate(x), 0, {0: 0.9, 1: 0.8, 4: 0.7}, "sigmoid 3 groups")


def test_masked_groups_are_minus_inf_softmax_max():
    # V2-style softmax + max group score, no normalisation, route_scale 16. Probabilities
    # [0.3, 0.25, 0.2, 0.25], bias -1 -> biased [-0.7, -0.75, -0.8, -0.75]; group max A=-0.7 >
    # B=-0.75 -> keep A -> {0, 1}, weights 16 * [0.3, 0.25]. A 0-fill would pick {2, 3}.
    gate, x = _gate_from_scores([[0.3, 0.25, 0.2, 0.25]], bias=[-1.0] * 4, score_func="softmax",
                                group_score="max", n_activated_experts=2, n_expert_groups=2,
                                n_limited_groups=1, norm_topk_prob=False, route_scale=16.0)
    _assert_chosen(gate(x), 0, {0: 16 * 0.3, 1: 16 * 0.25}, "softmax max")


def test_group_score_top2_sum_versus_max():
    common = dict(n_activated_experts=1, n_expert_groups=2, n_limited_groups=1, norm_topk_prob=False,
                  route_scale=1.0)
    # groups of 2: A = [0.9, 0.1] (max 0.9, top2 1.0), B = [0.6, 0.55] (max 0.6, top2 1.15)
    scores = [[0.9, 0.1, 0.6, 0.55]]
    gate, x = _gate_from_scores(scores, group_score="top2_sum", **common)
    _assert_chosen(gate(x), 0, {2: 0.6}, "top2_sum keeps B")
    gate, x = _gate_from_scores(scores, group_score="max", **common)
    _assert_chosen(gate(x), 0, {0: 0.9}, "max keeps A")
    # groups of 3: A = [0.8, 0.7, 0.05] (top2 1.5, all 1.55), B = [0.75, 0.6, 0.5] (top2 1.35, all 1.85):
    # the top TWO are summed, not the whole group.
    scores = [[0.8, 0.7, 0.05, 0.75, 0.6, 0.5]]
    gate, x = _gate_from_scores(scores, group_score="top2_sum", **(common | dict(n_activated_experts=2)))
    _assert_chosen(gate(x), 0, {0: 0.8, 1: 0.7}, "top2_sum of groups of 3")


def test_group_score_uses_biased_scores():
    # A = [0.6, 0.58], B = [0.5, 0.45] unbiased (A wins); bias +0.2 on B -> B sums 1.35 > 1.18.
    common = dict(n_activated_experts=1, n_expert_groups=2, n_limited_groups=1, norm_topk_prob=False,
                  route_scale=1.0)
    for group_score in ("top2_sum", "max"):
        gate, x = _gate_from_scores([[0.6, 0.58, 0.5, 0.45]], bias=[0.0, 0.0, 0.2, 0.2],
                                    group_score=group_score, **common)
        _assert_chosen(gate(x), 0, {2: 0.5}, f"{group_score} with bias")


def test_exactly_k_distinct_experts_inside_kept_groups():
    for kw in [dict(),
               dict(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=5),
               dict(score_func="softmax", group_score="max", n_limited_groups=1),
               dict(n_expert_groups=1, n_limited_groups=1, n_activated_experts=3)]:
        cfg = _cfg(**kw)
        torch.manual_seed(1)
        gate = Gate(cfg)
        with torch.no_grad():
            gate.weight.normal_(0, 1.0)
            gate.bias.copy_(torch.randn(cfg.n_routed_experts) - 3.0)  # negative biased scores
        x = torch.randn(200, cfg.dim)
        r = gate(x)
        N, K = r.indices.shape
        assert (N, K) == (200, cfg.n_activated_experts)
        srt = r.indices.sort(-1).values
        assert (srt[:, 1:] != srt[:, :-1]).all(), f"{kw}: repeated expert in a row"
        assert ((r.indices >= 0) & (r.indices < cfg.n_routed_experts)).all()
        # the groups of the chosen experts are at most n_limited_groups and are the top ones
        size = cfg.n_routed_experts // cfg.n_expert_groups
        groups = r.indices // size
        biased = (r.scores + gate.bias).view(N, cfg.n_expert_groups, size)
        gs = biased.topk(2, -1).values.sum(-1) if cfg.group_score == "top2_sum" else biased.amax(-1)
        kept = gs.topk(cfg.n_limited_groups, -1).indices
        in_kept = (groups[:, :, None] == kept[:, None, :]).any(-1)
        assert in_kept.all(), f"{kw}: an expert outside the kept groups was chosen"


@pytest.mark.parametrize("changes, fields", [
    (dict(n_expert_groups=3, n_limited_groups=1), ["n_routed_experts=8", "n_expert_groups=3"]),
    (dict(n_limited_groups=5), ["n_limited_groups=5", "n_expert_groups=4"]),
    (dict(n_limited_groups=1, n_activated_experts=3), ["n_activated_experts=3", "n_limited_groups=1"]),
    (dict(n_expert_groups=8, n_limited_groups=4, group_score="top2_sum"),
     ["group_score", "n_expert_groups=8"]),
    (dict(n_activated_experts=9, n_expert_groups=1, n_limited_groups=1), ["n_activated_experts=9"]),
], ids=["not_divisible", "kept_gt_groups", "topk_gt_kept_experts", "top2_sum_one_per_group", "topk_gt_E"])
def test_impossible_group_layouts_rejected(changes, fields):
    with pytest.raises(ValueError) as info:
        _cfg(**changes)
    for f in fields:
        assert f in str(info.value), f"{f!r} not named in: {info.value}"


def test_router_in_fp32_bf16_ties():
    # x = [1, 1] in bf16 (exact). Logits 1 + [0.004, 0.001, 0.003, 0.002] are distinct in fp32 but all
    # round to 1.0 in bf16 (spacing 2^-7 at 1), as do their sigmoids. fp32 picks {0, 2}.
    cfg = _cfg(dim=2, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
               norm_topk_prob=False, route_scale=1.0)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, 0.004], [1.0, 0.001], [1.0, 0.003], [1.0, 0.002]]))
    x = torch.ones(3, 2, dtype=torch.bfloat16)
    for g in (gate, Gate(cfg).to(torch.bfloat16)):
        if g is not gate:
            with torch.no_grad():
                g.weight.copy_(gate.weight)  # bf16 copies of 0.001..0.004 stay distinct
        r = g(x)
        assert r.scores.dtype == torch.float32 and r.weights.dtype == torch.float32
        for n in range(3):
            chose = r.indices[n].tolist()
            assert set(chose) == {0, 2}, f"{g.weight.dtype} gate chose {chose}"
        assert r.scores[0, 0] > r.scores[0, 2] > r.scores[0, 3] > r.scores[0, 1]


# --- pitfalls kind A: an independent reference of the equations ----------------------------------------

def _route_ref(x, weight, bias, cfg):
    """Per-token routing straight from the papers, in float64 python. Returns ([set], [{i: w}])."""
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    G, M = cfg.n_expert_groups, cfg.n_limited_groups
    size = E // G
    W, b = weight.double().tolist(), bias.double().tolist()
    out = []
    for u in x.double().tolist():
        logits = [sum(wi * ui for wi, ui in zip(W[i], u)) for i in range(E)]
        if cfg.score_func == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-z)) for z in logits]
        else:
            m = max(logits)
            ez = [math.exp(z - m) for z in logits]
            s = [v / sum(ez) for v in ez]
        biased = [s[i] + b[i] for i in range(E)]
        kept = list(range(G))
        if G > 1:
            def group_score(g):
                vals = sorted(biased[g * size:(g + 1) * size], reverse=True)
                return vals[0] + vals[1] if cfg.group_score == "top2_sum" else vals[0]
            kept = sorted(range(G), key=group_score, reverse=True)[:M]
        candidates = [i for g in kept for i in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda i: biased[i], reverse=True)[:K]
        w = [s[i] for i in chosen]
        if cfg.norm_topk_prob:
            w = [v / sum(w) for v in w]
        out.append({i: v * cfg.route_scale for i, v in zip(chosen, w)})
    return out


REF_CONFIGS = {
    "v3_sigmoid_top2_sum": dict(),
    "v2_softmax_max": dict(score_func="softmax", group_score="max", norm_topk_prob=False, route_scale=16.0),
    "sigmoid_no_groups": dict(n_expert_groups=1, n_limited_groups=1, route_scale=1.0, n_activated_experts=3),
    "softmax_no_groups_norm": dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1),
    "sigmoid_max_one_group_kept": dict(group_score="max", n_limited_groups=1, norm_topk_prob=False),
    "softmax_top2_sum_groups_of_4": dict(score_func="softmax", n_expert_groups=2, n_limited_groups=1,
                                         n_activated_experts=3),
    "sigmoid_16_experts": dict(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2,
                               n_activated_experts=4),
}


@pytest.mark.parametrize("name", list(REF_CONFIGS))
def test_gate_matches_per_token_reference(name):
    cfg = _cfg(**REF_CONFIGS[name])
    torch.manual_seed(2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0, 0.7)
        gate.bias.copy_(0.3 * torch.randn(cfg.n_routed_experts))
    x = torch.randn(64, cfg.dim)
    r = gate(x)
    ref = _route_ref(x, gate.weight.detach(), gate.bias, cfg)
    for n, expected in enumerate(ref):
        _assert_chosen(r, n, expected, name)


# --- pitfalls kind A: the layer: output, shared expert, dispatch ----------------------------------------

def _moe(cfg, seed=3, std=0.3):
    """An MoE with weights large enough that outputs are O(1) (init_std 0.02 would make them ~1e-4)."""
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, std)
        moe.gate.bias.copy_(0.2 * torch.randn(cfg.n_routed_experts))
    return moe


def _moe_ref(moe, x, cfg):
    """y_n = shared(x_n) + sum_k w_k expert_{i_k}(x_n), token by token, routing from `_route_ref`."""
    flat = x.reshape(-1, x.shape[-1])
    routes = _route_ref(flat, moe.gate.weight.detach(), moe.gate.bias, cfg)
    rows = []
    for u, chosen in zip(flat, routes):
        y = moe.shared_experts(u) if moe.shared_experts is not None else torch.zeros_like(u)
        for i, w in chosen.items():
            y = y + w * moe.experts[i](u)
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("name", ["v3_sigmoid_top2_sum", "v2_softmax_max", "sigmoid_no_groups"])
@torch.no_grad()
def test_moe_equals_per_token_loop(name, impl):
    for shared in (1, 0, 2):
        cfg = _cfg(**(REF_CONFIGS[name] | dict(n_shared_experts=shared)))
        moe = _moe(cfg).eval()
        moe.dispatch_impl = impl
        x = torch.randn(2, 7, cfg.dim)
        out = moe(x)
        assert out.y.shape == x.shape and out.load.shape == (cfg.n_routed_experts,)
        ref = _moe_ref(moe, x, cfg)
        assert ref.abs().max() > 0.5, "outputs too small for the tolerance to mean anything"
        _close(out.y, ref, FP32_TOL, f"{name} shared={shared}:")


@torch.no_grad()
def test_route_scale_not_applied_to_shared_expert():
    # Same weights, route_scale 1 vs 3: y - shared(x) scales by exactly 3, shared(x) does not.
    cfg1 = _cfg(route_scale=1.0)
    moe1, moe3 = _moe(cfg1).eval(), MoE(cfg1.replace(route_scale=3.0)).eval()
    moe3.load_state_dict(moe1.state_dict())
    x = torch.randn(1, 9, cfg1.dim)
    shared = moe1.shared_experts(x)
    routed1, routed3 = moe1(x).y - shared, moe3(x).y - shared
    assert routed1.abs().max() > 0.1
    _close(routed3, 3.0 * routed1, FP32_TOL, "routed part scales with route_scale:")


def test_dispatch_runs_each_expert_once_on_its_tokens():
    cfg = _cfg(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    moe = _moe(cfg).eval()
    moe.dispatch_impl = "loop"  # the grouped GEMM calls no Expert module (it is checked against this below)
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(cfg.n_routed_experts)}
    hooks = [expert.register_forward_hook(lambda mod, inp, out, e=e: seen[e].append(inp[0].detach()))
             for e, expert in enumerate(moe.experts)]
    x = torch.randn(3, 11, cfg.dim)
    try:
        out = moe(x)
    finally:
        for h in hooks:
            h.remove()
    flat = x.reshape(-1, cfg.dim)
    routing = moe.gate(flat)
    assert out.load.sum().item() == 33 * 3
    for e in range(cfg.n_routed_experts):
        routed = (routing.indices == e).any(-1).nonzero().flatten()  # tokens routed to e
        assert len(seen[e]) <= 1, f"expert {e} ran {len(seen[e])} times in one forward"
        assert len(routed) == out.load[e].item()
        if len(routed) == 0:  # run on an empty block (so its weights get a zero gradient), nothing else
            assert all(rows.shape[0] == 0 for rows in seen[e]), f"expert {e} ran on tokens not routed to it"
            continue
        rows = seen[e][0]
        assert rows.shape[0] == out.load[e].item(), f"expert {e} saw {rows.shape[0]} rows, load {out.load[e]}"
        # which tokens did it see? (match rows to tokens exactly)
        which = torch.cdist(rows, flat).argmin(-1)
        assert torch.equal(which.sort().values, routed), \
            f"expert {e} saw tokens {which.tolist()}, routed {routed.tolist()}"
    assert sum(1 for e in seen if seen[e] and seen[e][0].shape[0]) == int((out.load > 0).sum())


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_dispatch_equals_loop_forward_and_gradients(dtype, splits):
    # The grouped GEMM path and the per-expert loop: same output, same gradients for x, every expert
    # matrix, the gate weight and the shared expert. One expert gets no token (an empty group).
    # splits = 3: each expert's weight gradient summed from 3 sub-blocks of its rows (some of them
    # empty: several experts get fewer than 3 rows) -- the same gradient.
    cfg = _cfg(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=3)
    loop = _moe(cfg).to(dtype).train()
    with torch.no_grad():
        loop.gate.bias[5] = -100.0  # expert 5 is never chosen: an empty block
    grouped = MoE(cfg).to(dtype).train()
    grouped.load_state_dict(loop.state_dict())
    loop.dispatch_impl, grouped.dispatch_impl = "loop", "grouped"
    grouped.wgrad_splits = splits
    x = torch.randn(2, 13, cfg.dim, dtype=dtype)
    g = torch.randn_like(x)
    outs, grads = [], []
    for moe in (loop, grouped):
        xi = x.clone().requires_grad_()
        out = moe(xi)
        out.y.backward(g)
        outs.append(out)
        # the loop never calls an expert without tokens (grad None); the grouped GEMM gives it zeros
        grads.append({"x": xi.grad} | {n: torch.zeros_like(p) if p.grad is None else p.grad
                                       for n, p in moe.named_parameters()})
    assert outs[0].load[5] == 0 and torch.equal(outs[0].load, outs[1].load)
    tol = FP32_TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bf16: rounding order
    _close(outs[1].y.float(), outs[0].y.float(), tol, "grouped vs loop output:")
    assert grads[0]["experts.5.w1.weight"].abs().max() == 0 and grads[1]["experts.5.w1.weight"].abs().max() == 0
    idle = [dict(loop.named_parameters())["experts.5.w1.weight"].grad, dict(grouped.named_parameters())["experts.5.w1.weight"].grad]
    assert all(g is not None for g in idle), "an idle expert's gradient is zeros on both paths (AdamW moves it alike)"
    for name, ref in grads[0].items():
        scale = float(ref.float().abs().max()) or 1.0  # relative to the gradient's own size
        _close(grads[1][name].float() / scale, ref.float() / scale, tol, f"gradient of {name}:")


def test_grouped_dispatch_under_autocast_matches_loop():
    # fp32 master weights, a bf16 autocast region, an input that is bf16 already (as inside an MTP
    # block) or fp32 (as in the main blocks): the grouped GEMM casts like nn.Linear does.
    cfg = _cfg(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    moe = _moe(cfg).train()
    for x in (torch.randn(2, 9, cfg.dim), torch.randn(2, 9, cfg.dim).bfloat16()):
        outs = []
        for impl in ("loop", "grouped"):
            moe.dispatch_impl = impl
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(moe(x).y.float())
        _close(outs[1], outs[0], dict(atol=3e-2, rtol=3e-2), f"autocast, input {x.dtype}:")


def test_dispatch_is_bitwise_repeatable_and_rejects_unknown_impl():
    cfg = _cfg(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=4)
    moe = _moe(cfg).to(torch.bfloat16).train()
    x = torch.randn(3, 9, cfg.dim, dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        moe(xi).y.float().square().sum().backward()
        results.append(xi.grad.clone())
    assert torch.equal(results[0], results[1])
    moe.dispatch_impl = "fast"
    with pytest.raises(ValueError, match="dispatch impl 'fast'"):
        moe(x)


def test_underflowed_sigmoid_scores_give_finite_weights():
    # Logits of -200 make every sigmoid score exactly 0 in fp32: the normalisation must not divide 0 by 0.
    cfg = _cfg(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    moe = _moe(cfg).eval()
    with torch.no_grad():
        moe.gate.weight.fill_(-1.0)
    x = torch.full((1, 3, cfg.dim), 200.0 / cfg.dim)  # logits = -200 for every expert
    routing = moe.gate(x.reshape(-1, cfg.dim))
    assert (routing.scores == 0).all()
    assert torch.isfinite(routing.weights).all() and (routing.weights == 0).all()
    assert torch.isfinite(moe(x).y).all()


# --- pitfalls kind A: transformers' DeepseekV3 as a second reference ------------------------------------

def _hf_moe(moe, cfg):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=cfg.dim, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts,
        n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.route_scale, moe_intermediate_size=cfg.moe_inter_dim,
        n_shared_experts=cfg.n_shared_experts, hidden_act="silu", vocab_size=cfg.vocab_size,
        num_hidden_layers=1, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads)
    hf_cfg._experts_implementation = "eager"  # the plain loop over experts (no hub kernels)
    hf = DeepseekV3MoE(hf_cfg).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(moe.gate.weight)
        hf.gate.e_score_correction_bias.copy_(moe.gate.bias)
        for e, expert in enumerate(moe.experts):  # gate_up_proj[e] = [w1; w3] (concatenated layout)
            hf.experts.gate_up_proj[e].copy_(torch.cat([expert.w1.weight, expert.w3.weight], 0))
            hf.experts.down_proj[e].copy_(expert.w2.weight)
        hf.shared_experts.gate_proj.weight.copy_(moe.shared_experts.w1.weight)
        hf.shared_experts.up_proj.weight.copy_(moe.shared_experts.w3.weight)
        hf.shared_experts.down_proj.weight.copy_(moe.shared_experts.w2.weight)
    return hf


@pytest.mark.parametrize("kw", [dict(), dict(n_expert_groups=1, n_limited_groups=1),
                                dict(n_routed_experts=16, n_limited_groups=1, n_activated_experts=3,
                                     route_scale=1.0)],
                         ids=["4_groups_keep_2", "no_groups", "16_experts_keep_1"])
@torch.no_grad()
def test_matches_transformers_deepseek_v3(kw):
    # transformers implements the V3 gate only: sigmoid scores, top2_sum groups (also with n_group=1,
    # where the group mask keeps everything), e_score_correction_bias for choice only, norm with a
    # +1e-20 in the denominator, routed_scaling_factor once; top-k unsorted (so compare as sets).
    cfg = _cfg(**kw)
    moe = _moe(cfg, seed=4).eval()
    hf = _hf_moe(moe, cfg)
    x = torch.randn(2, 9, cfg.dim)
    _, hf_w, hf_i = hf.gate(x)
    r = moe.gate(x.reshape(-1, cfg.dim))
    for n in range(x.shape[0] * x.shape[1]):
        expected = {int(i): float(w) for i, w in zip(hf_i[n], hf_w[n])}
        _assert_chosen(r, n, expected, "vs transformers router")
    _close(moe(x).y, hf(x), FP32_TOL, "vs transformers DeepseekV3MoE:")


# --- pitfalls kind B: the bias update --------------------------------------------------------------------

@pytest.mark.parametrize("load, signs", [
    ([10, 2, 2, 2], [-1, 1, 1, 1]),  # the pitfalls example: mean 4
    ([0, 4, 4, 8], [1, 0, 0, -1]),  # at the mean: no move
    ([5, 5, 5, 5], [0, 0, 0, 0]),  # balanced: no move
    ([1, 0, 0, 0, 0, 0, 0, 7], [0, 1, 1, 1, 1, 1, 1, -1]),  # mean 1: expert 0 at the mean -> 0
])
def test_update_bias_hand_cases(load, signs):
    start = torch.linspace(-0.5, 0.5, len(load))
    bias = start.clone()
    out = update_bias(bias, torch.tensor(load, dtype=torch.float32), GAMMA)
    assert out is bias and bias.dtype == torch.float32
    expected = start + GAMMA * torch.tensor(signs, dtype=torch.float32)
    assert torch.equal(bias, expected), f"bias moved by {(bias - start).tolist()}, expected {GAMMA} x {signs}"
    # from zero the move is exactly +-gamma in fp32
    zero = update_bias(torch.zeros(len(load)), torch.tensor(load), GAMMA)
    assert torch.equal(zero, GAMMA * torch.tensor(signs, dtype=torch.float32))


def test_update_bias_errors():
    with pytest.raises(ValueError, match="shape"):
        update_bias(torch.zeros(4), torch.zeros(3), GAMMA)
    with pytest.raises(ValueError, match="fp32"):
        update_bias(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4), GAMMA)


def test_bias_stays_fp32_and_small_steps_accumulate():
    model = Transformer(_cfg()).to(torch.bfloat16)
    for moe in model.moe_layers():
        assert moe.gate.bias.dtype == torch.float32, "bias cast to bf16: 1e-3 steps vanish"
        assert moe.gate.weight.dtype == torch.bfloat16
    model.load_state_dict(model.state_dict())  # a round trip keeps it fp32
    bias = model.moe_layers()[0].gate.bias
    assert bias.dtype == torch.float32
    load = torch.tensor([0.0] + [1.0] * 7)  # expert 0 underloaded: +gamma each step
    for _ in range(1000):
        update_bias(bias, load, GAMMA)
    # fp32: 1000 roundings of ~6e-8 each at most; bf16 would stall near 0.5 (spacing 2^-8 > 2 gamma)
    assert abs(bias[0].item() - 1.0) < 1e-4, bias[0].item()
    assert abs(bias[1].item() + 1.0) < 1e-4, bias[1].item()


def test_bias_is_a_buffer_without_gradient_and_gate_weight_learns():
    cfg = _cfg()
    model = Transformer(cfg)
    biases = [moe.gate.bias for moe in model.moe_layers()]
    params = list(model.parameters())
    assert not any(b is p for b in biases for p in params), "bias is a parameter"
    assert all("gate.bias" not in n for n, _ in model.named_parameters())
    assert sum(n.endswith("gate.bias") for n in model.state_dict()) == len(biases) == 2, "bias not saved"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert not any(b is p for b in biases for p in in_opt), "bias is in the optimizer"
    assert all(not b.requires_grad for b in biases)
    model.train()
    out = model(torch.randint(0, cfg.vocab_size, (2, 8)))
    assert out.aux_loss.item() == 0.0
    out.logits.square().mean().backward()  # no aux loss: gradient only through the combine weights
    for moe in model.moe_layers():
        assert moe.gate.bias.grad is None
        g = moe.gate.weight.grad
        assert g is not None and g.abs().max() > 0, "gate weight gets no gradient through the weights"
    before = [b.clone() for b in biases]
    opt.step()
    assert all(torch.equal(b, c) for b, c in zip(biases, before)), "optimizer moved the bias"


def _seq_loss_ref(scores, indices, E, K):
    """V3 §2.1.2 per sequence in python: sum_i f_i P_i, f_i = E/(K T) count_i,
    P_i = mean_t s_it / sum_j s_jt; averaged over sequences."""
    total = 0.0
    for s_seq, i_seq in zip(scores.double().tolist(), indices.tolist()):
        T = len(s_seq)
        counts = [sum(row.count(i) for row in i_seq) for i in range(E)]
        P = [sum(row[i] / sum(row) for row in s_seq) / T for i in range(E)]
        total += sum(E / (K * T) * counts[i] * P[i] for i in range(E))
    return total / len(scores)


def _expert_loss_ref(scores, indices, E, K):
    """DeepSeekMoE §4.1 over all N tokens: f_i = E/(K N) count_i, P_i = mean_t s_it / sum_j s_jt."""
    s, idx = scores.double().tolist(), indices.tolist()
    N = len(s)
    f = [E / (K * N) * sum(row.count(i) for row in idx) for i in range(E)]
    P = [sum(row[i] / sum(row) for row in s) / N for i in range(E)]
    return sum(fi * pi for fi, pi in zip(f, P))


def test_aux_gradient_reaches_gate_weight_and_matches_reference():
    # alpha > 0: d(aux)/d(gate.weight) equals autograd of the reference loss (f fixed, P through scores).
    cfg = _cfg(seq_aux_loss_alpha=0.01, expert_aux_loss_alpha=0.003)
    moe = _moe(cfg).train()
    x = torch.randn(2, 6, cfg.dim)
    out = moe(x)
    out.aux_loss.backward()
    g = moe.gate.weight.grad
    assert g is not None and g.abs().max() > 0, "aux loss has no gradient through the scores"
    W = moe.gate.weight.detach().clone().requires_grad_(True)
    flat = x.reshape(-1, cfg.dim)
    with torch.no_grad():
        indices = moe.gate(flat).indices
    s = torch.sigmoid(flat @ W.T)  # (N, E)
    counts = torch.stack([torch.bincount(i.flatten(), minlength=8) for i in indices.view(2, 6, -1)]).double()
    f = counts * 8 / (2 * 6)
    P = (s / s.sum(-1, keepdim=True)).view(2, 6, 8).mean(1)
    seq = (f * P).sum(-1).mean()
    fe = torch.bincount(indices.flatten(), minlength=8).double() * 8 / (2 * 12)
    exp = (fe * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    ref = 0.01 * seq + 0.003 * exp
    ref.backward()
    _close(out.aux_loss.double(), ref.detach(), dict(atol=1e-7, rtol=1e-6), "aux value:")
    _close(g, W.grad, dict(atol=1e-7, rtol=1e-5), "aux gradient:")


# --- pitfalls kind B: accumulated load and the update schedule -----------------------------------------

def _one_hot_moe(**kw):
    """4 experts, top-1, gate = 10 I: token e_i goes to expert i."""
    cfg = _cfg(dim=4, n_routed_experts=4, n_activated_experts=1, n_expert_groups=1, n_limited_groups=1, **kw)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.copy_(10 * torch.eye(4))
    return moe


def _tokens_to(experts):
    return torch.eye(4)[experts][None]  # (1, S, 4)


def test_update_uses_load_summed_over_micro_batches_then_resets():
    moe = _one_hot_moe().train()
    l1 = moe(_tokens_to([0, 0, 0])).load  # [3, 0, 0, 0]
    l2 = moe(_tokens_to([1, 2, 3, 3])).load  # [0, 1, 1, 2]
    assert l1.tolist() == [3, 0, 0, 0] and l2.tolist() == [0, 1, 1, 2]
    used = moe.update_bias()
    assert used.tolist() == [3, 1, 1, 2]
    # sum [3, 1, 1, 2], mean 1.75 -> [-, +, +, -]; the last micro-batch alone would give [+, 0, 0, -],
    # the first alone [-, +, +, +]
    assert torch.equal(moe.gate.bias, torch.tensor([-GAMMA, GAMMA, GAMMA, -GAMMA], dtype=torch.float32))
    assert moe.load_since_update.sum().item() == 0, "load not reset after the update"
    before = moe.gate.bias.clone()
    assert moe.update_bias().sum().item() == 0
    assert torch.equal(moe.gate.bias, before), "a second update without forwards moved the bias"


def test_no_accumulation_in_eval_and_speed_zero_is_off():
    moe = _one_hot_moe().eval()
    moe(_tokens_to([0, 0, 0, 1]))
    assert moe.update_bias().sum().item() == 0
    assert torch.equal(moe.gate.bias, torch.zeros(4)), "eval forward moved the bias"
    off = _one_hot_moe(bias_update_speed=0.0).train()
    off(_tokens_to([0, 0, 0, 1]))
    assert off.update_bias().tolist() == [3, 1, 0, 0]
    assert torch.equal(off.gate.bias, torch.zeros(4)), "speed 0 moved the bias"


def test_accumulated_load_exact_in_bf16_model():
    # Counts above 256 are not integers in bf16: the accumulated load must not be cast with the model.
    moe = _one_hot_moe().to(torch.bfloat16).train()
    total = torch.zeros(4)
    for experts in ([0] * 257 + [1] * 3, [0] * 3 + [2] * 5, [3] * 301):
        total += moe(_tokens_to(experts).bfloat16()).load
    assert total.tolist() == [260, 3, 5, 301]
    assert moe.update_bias().tolist() == [260, 3, 5, 301]
    assert moe.gate.bias.dtype == torch.float32


def test_transformer_update_router_biases_accumulates_micro_batches():
    cfg = _cfg(init_std=0.5)  # a spread router, so loads differ between experts
    torch.manual_seed(5)
    model = Transformer(cfg).train()
    tok = torch.randint(0, cfg.vocab_size, (4, 6))
    loads = [torch.zeros(cfg.n_routed_experts) for _ in model.moe_layers()]
    for mb in tok.split(2):  # two micro-batches of one optimizer step
        out = model(mb)
        assert len(out.expert_load) == cfg.n_layers - cfg.n_dense_layers == len(model.moe_layers())
        for acc, load in zip(loads, out.expert_load):
            assert load.shape == (cfg.n_routed_experts,)
            assert load.sum().item() == 2 * 6 * cfg.n_activated_experts
            acc += load
    model.eval()
    model(tok)  # an evaluation forward in between must not count
    before = [moe.gate.bias.clone() for moe in model.moe_layers()]
    used = model.update_router_biases()
    assert len(used) == len(loads)
    for u, acc, b, moe in zip(used, loads, before, model.moe_layers()):
        assert torch.equal(u, acc), f"update used {u.tolist()}, the micro-batches routed {acc.tolist()}"
        assert torch.equal(moe.gate.bias - b, GAMMA * torch.sign(acc.mean() - acc))
        assert (moe.gate.bias != b).any(), "no bias moved: the test needs an unbalanced load"
        assert moe.load_since_update.sum().item() == 0


# --- pitfalls kind B: balance losses and MaxVio ---------------------------------------------------------

def test_sequence_balance_loss_hand_values():
    # B=1, T=2, E=2: P = mean([.75, .25], [.5, .5]) = [.625, .375]
    s = torch.tensor([[[0.9, 0.3], [0.2, 0.2]]])
    both_0 = torch.tensor([[[0], [0]]])  # f = [2, 0]
    split = torch.tensor([[[0], [1]]])  # f = [1, 1]
    assert sequence_balance_loss(s, both_0, 2, 1).item() == pytest.approx(1.25, abs=1e-6)
    assert sequence_balance_loss(s, split, 2, 1).item() == pytest.approx(1.0, abs=1e-6)
    # B=2: per sequence (1.2 and 1.6 -> mean 1.4), not over the batch (f = [1, 1] -> 1.0)
    s2 = torch.tensor([[[0.6, 0.4], [0.6, 0.4]], [[0.2, 0.8], [0.2, 0.8]]])
    i2 = torch.tensor([[[0], [0]], [[1], [1]]])
    assert sequence_balance_loss(s2, i2, 2, 1).item() == pytest.approx(1.4, abs=1e-6)
    # K=2, E=4, T=1: f = 4/(2*1) * [1, 1, 0, 0] = [2, 2, 0, 0], P = [.5, .25, .125, .125] -> 1.5
    s3 = torch.tensor([[[0.5, 0.25, 0.125, 0.125]]])
    assert sequence_balance_loss(s3, torch.tensor([[[0, 1]]]), 4, 2).item() == pytest.approx(1.5, abs=1e-6)
    # perfectly balanced: f = 1 for every expert -> L = sum_i P_i = 1 for any positive scores
    s4 = torch.rand(3, 4, 4) + 0.1
    i4 = torch.stack([torch.randperm(4) for _ in range(3)])[..., None]
    assert sequence_balance_loss(s4, i4, 4, 1).item() == pytest.approx(1.0, abs=1e-6)
    # random vs the python reference
    torch.manual_seed(6)
    s5, i5 = torch.rand(3, 5, 6), torch.stack([torch.randperm(6)[:2] for _ in range(15)]).view(3, 5, 2)
    assert sequence_balance_loss(s5, i5, 6, 2).item() == pytest.approx(_seq_loss_ref(s5, i5, 6, 2), abs=1e-6)


def test_expert_balance_loss_hand_values():
    s = torch.tensor([[0.9, 0.3], [0.2, 0.2]])  # normalised rows [.75, .25], [.5, .5] -> P = [0.625, 0.375]
    assert expert_balance_loss(s, torch.tensor([[0], [0]]), 2, 1).item() == pytest.approx(1.25, abs=1e-6)
    assert expert_balance_loss(s, torch.tensor([[0], [1]]), 2, 1).item() == pytest.approx(1.0, abs=1e-6)
    # shrinking every sigmoid score without changing the routing must not lower the loss
    assert expert_balance_loss(s / 10, torch.tensor([[0], [0]]), 2, 1).item() == pytest.approx(1.25, abs=1e-6)
    s3 = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    assert expert_balance_loss(s3, torch.tensor([[0, 1]]), 4, 2).item() == pytest.approx(1.5, abs=1e-6)
    p = torch.softmax(torch.randn(4, 4), -1)  # balanced top-1 with softmax probabilities -> 1
    assert expert_balance_loss(p, torch.arange(4)[:, None], 4, 1).item() == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(7)
    s5, i5 = torch.rand(9, 6), torch.stack([torch.randperm(6)[:3] for _ in range(9)])
    assert expert_balance_loss(s5, i5, 6, 3).item() == pytest.approx(_expert_loss_ref(s5, i5, 6, 3), abs=1e-6)


def test_max_violation_hand_values():
    assert max_violation(torch.tensor([10, 2, 2, 2])) == pytest.approx(1.5)  # (10 - 4) / 4
    assert max_violation(torch.tensor([3.0, 3.0, 3.0])) == 0.0
    assert max_violation(torch.tensor([0, 0, 0, 8])) == pytest.approx(3.0)  # (8 - 2) / 2
    assert max_violation(torch.zeros(4)) == 0.0


def _capture_routing(model):
    """Forward hooks on every gate: list of (scores, indices) per call, in depth order."""
    seen = []
    hooks = [moe.gate.register_forward_hook(lambda m, i, r: seen.append((r.scores.detach(), r.indices)))
             for moe in model.moe_layers()]
    return seen, hooks


@pytest.mark.parametrize("seq_alpha, exp_alpha", [(0.0, 0.0), (1e-4, 0.0), (0.0, 0.01), (0.3, 0.02)])
def test_model_aux_loss_is_alpha_times_reference(seq_alpha, exp_alpha):
    cfg = _cfg(seq_aux_loss_alpha=seq_alpha, expert_aux_loss_alpha=exp_alpha, init_std=0.3)
    torch.manual_seed(8)
    model = Transformer(cfg).train()
    tok = torch.randint(0, cfg.vocab_size, (2, 7))
    seen, hooks = _capture_routing(model)
    out = model(tok)
    for h in hooks:
        h.remove()
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    ref = sum(seq_alpha * _seq_loss_ref(s.view(2, 7, E), i.view(2, 7, K), E, K)
              + exp_alpha * _expert_loss_ref(s, i, E, K) for s, i in seen)
    assert len(seen) == cfg.n_layers - cfg.n_dense_layers
    if seq_alpha == exp_alpha == 0:
        assert out.aux_loss.item() == 0.0
        return
    assert out.aux_loss.item() == pytest.approx(ref, rel=1e-5), "aux loss not (all) added with its alpha"
    out.aux_loss.backward()
    for moe in model.moe_layers():
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().max() > 0


# --- the model with MoE layers: cached decoding --------------------------------------------------

@pytest.mark.parametrize("attention", ["mha", "mla"])
@torch.no_grad()
def test_moe_transformer_full_equals_cached_decoding(attention):
    mla = dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    extra = mla if attention == "mla" else {}
    cfg = _cfg(attention=attention, init_std=0.2, **extra)
    torch.manual_seed(9)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))
    assert [type(layer.ffn).__name__ for layer in model.layers] == ["MLP", "MoE", "MoE"]
    tok = torch.randint(0, cfg.vocab_size, (2, 13))
    full = model(tok).logits
    assert full.std() > 0.5
    cache = model.new_cache(2)
    steps = [model(tok[:, :6], cache).logits] + [model(tok[:, t:t + 1], cache).logits for t in range(6, 13)]
    _close(torch.cat(steps, 1), full, FP32_TOL, f"{attention} MoE full vs prefill + decode:")


def test_router_stays_fp32_under_autocast():
    """The Trainer runs CUDA forwards under bf16 autocast; the router must still score in fp32."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, inter_dim=64, max_seq_len=16,
                      n_dense_layers=0, n_routed_experts=4, n_activated_experts=2, score_func="sigmoid")
    gate = Gate(cfg)
    x = torch.randn(64, 32)
    ref = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate(x)
    assert got.scores.dtype == torch.float32
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.weights, ref.weights, rtol=0, atol=0)
