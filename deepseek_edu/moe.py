"""DeepSeekMoE: fine-grained routed experts, shared experts, the V3 gate and its balancing.

DeepSeekMoE §3, DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2; the survey's §III-B.

    h' = u + sum_shared FFN_s(u) + sum_{i in top-K} g_i * FFN_i(u)

**Fine-grained segmentation**: many small experts (width `moe_inter_dim`), K of them active per
token, instead of a few large ones. **Shared experts** see every token and hold common knowledge.

**The gate** (`Gate`), where public implementations most often go wrong (docs/pitfalls.md kind A):

1. affinities s = sigmoid(u . e_i) (V3) or softmax (V2), computed in fp32;
2. a per-expert bias b, used **only to choose**: the top-K is taken over s + b;
3. group-limited routing: experts sit in `n_expert_groups` groups; a group's score is the sum of its
   two largest biased scores (V3) or their max (V2); only `n_limited_groups` groups stay, the others
   are set to -inf (not 0: with negative scores a 0 would win);
4. the weights come from the **unbiased** s of the chosen experts, normalised to sum 1 (sigmoid
   gate), then multiplied by `route_scale` exactly once.

**Balancing** (kind B). Auxiliary-loss-free: after each optimizer step, b_i <- b_i + gamma *
sign(mean load - load_i) from the whole batch's load (`update_bias`); the bias is an fp32 buffer,
never in the optimizer, never given a gradient. A complementary sequence-wise balance loss (alpha)
and, for comparison, DeepSeekMoE's expert-level auxiliary loss (alpha_1) are available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .dispatch import (  # noqa: F401 -- re-exported: these lived here before dispatch.py
    DISPATCH_IMPLS,
    ExpertOrder,
    combine,
    compute_dtype,
    expert_counts,
    gather_pairs,
    grouped_linear,
    grouped_mm_available,
    permute_rows,
    sort_by_expert,
    sum_slots,
    wgrad_splits,
)
from .ffn import MLP


class Expert(MLP):
    """One routed (or shared) expert: a SwiGLU FFN of width `moe_inter_dim`. (..., D) -> (..., D)."""


@dataclass
class Routing:
    """What the gate decided for N tokens.

    Attributes:
        weights: (N, K) combine weights, from the unbiased scores, normalised and scaled.
        indices: (N, K) int64 chosen experts.
        scores: (N, E) fp32 unbiased affinities (sigmoid or softmax) -- for the balance losses.
    """

    weights: Tensor
    indices: Tensor
    scores: Tensor


def stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries along the last axis, largest first: (values, int64 indices), each (..., k).

    The values `torch.topk` returns, and its indices wherever no two values tie; on a tie the lower
    index wins (torch.topk leaves that order unspecified, and it differs between CPU and CUDA).
    Exact ties do happen in fp32 routing: in notebook 07's run two group scores were equal at step
    21, a chance of about one in a million per comparison, met often enough over millions of them.
    Written as a stable sort: a routing row holds only a few dozen entries, and on the H200 the sort
    of such rows measured faster than torch's top-k kernel (`benchmarks/profile_train_step.py`).
    """
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


class Gate(nn.Module):
    """Router: affinity scores, biased group-limited top-K selection, unbiased weights.

    Args:
        cfg: uses dim, n_routed_experts (E), n_activated_experts (K), n_expert_groups,
            n_limited_groups, score_func, group_score, norm_topk_prob, route_scale.

    Weight `weight` (E, D); buffer `bias` (E,) fp32, persistent, no gradient.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.group_score = cfg.score_func, cfg.group_score
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Keep the selection bias in fp32 whatever `.to(dtype)` is asked: 1e-3 steps vanish in bf16.
        bias = self._buffers.pop("bias")
        super()._apply(fn, recurse)
        self.register_buffer("bias", bias.to(device=self.weight.device, dtype=torch.float32))
        return self

    def forward(self, x: Tensor) -> Routing:
        """Route N tokens.

        Args:
            x: (N, D) hidden states (any float dtype; scores are computed in fp32).
        Returns:
            `Routing` with weights (N, K) fp32, indices (N, K) int64, scores (N, E) fp32.
        """
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32: bf16 ties close logits
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores + self.bias  # (N, E) used ONLY to choose
        if self.n_groups > 1:
            grouped = biased.view(x.shape[0], self.n_groups, -1)  # (N, n_groups, G)
            if self.group_score == "max":
                group_scores = grouped.amax(dim=-1)  # (N, n_groups), V2
            else:
                group_scores = stable_topk(grouped, 2)[0].sum(dim=-1)  # (N, n_groups), V3
            kept = stable_topk(group_scores, self.topk_groups)[1]  # (N, topk_groups)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            biased = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)  # (N, E)
        indices = stable_topk(biased, self.topk)[1]  # (N, K)
        weights = scores.gather(1, indices)  # (N, K) from the UNBIASED scores
        if self.norm_topk_prob:
            # + 1e-20: sigmoid scores underflow to 0 for logits below about -104 (fp32); without it the
            # chosen weights of such a token would be 0 / 0 = NaN (transformers' DeepseekV3 does the same)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale  # exactly once
        return Routing(weights=weights, indices=indices, scores=scores)


# --- balancing ---------------------------------------------------------------------------------


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, speed: float) -> Tensor:
    """Auxiliary-loss-free balancing step (DeepSeek-V3 §2.1.2), in place.

    b_i <- b_i + speed * sign(mean(load) - load_i): overloaded experts become less likely to be chosen.

    Args:
        bias: (E,) fp32 selection bias (a buffer, not a parameter).
        load: (E,) tokens routed to each expert over the whole batch of one optimizer step.
        speed: gamma, the bias update speed (V3: 0.001).
    Returns:
        `bias`, updated in place.
    Raises:
        ValueError: if shapes differ or the bias is not fp32 (a bf16 bias loses 1e-3 steps).
    """
    if bias.shape != load.shape:
        raise ValueError(f"bias {tuple(bias.shape)} and load {tuple(load.shape)} must have the same shape")
    if bias.dtype != torch.float32:
        raise ValueError(f"the selection bias must be fp32, got {bias.dtype}")
    load = load.float()
    bias += speed * torch.sign(load.mean() - load)
    return bias


def max_violation(load: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 for a perfect balance (V3 §4.5.2)."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def sequence_balance_loss(scores: Tensor, indices: Tensor, n_experts: int, topk: int) -> Tensor:
    """Complementary sequence-wise balance loss of DeepSeek-V3 §2.1.2, *without* its alpha.

    L = sum_i f_i P_i per sequence, averaged over sequences, with
    f_i = E / (K T) * #{tokens of the sequence choosing i},  P_i = mean_t s_{i,t} / sum_j s_{j,t}.

    Args:
        scores: (B, T, E) unbiased affinities.
        indices: (B, T, K) chosen experts.
    Returns:
        () fp32; 1 for a perfectly balanced sequence, up to E for total collapse.
    """
    B, T, E = scores.shape
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, indices.reshape(B, -1), torch.ones(B, T * topk, device=scores.device))  # (B, E)
    f = counts * n_experts / (topk * T)  # (B, E), no gradient (counts are discrete)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * p).sum(dim=-1).mean()


def expert_balance_loss(scores: Tensor, indices: Tensor, n_experts: int, topk: int) -> Tensor:
    """DeepSeekMoE's expert-level balance loss (§4.1), *without* its alpha_1, over all N tokens.

    L = sum_i f_i P_i with f_i = E / (K N) * #{tokens choosing i}, P_i = mean_t s_{i,t} / sum_j s_{j,t}.

    DeepSeekMoE's gate is a softmax, whose scores already sum to 1 per token. For a sigmoid gate
    the scores are normalised first (as V3 does in its sequence-wise loss); with raw sigmoid scores
    the loss could be lowered by shrinking every score without changing the routing at all.

    Args:
        scores: (N, E) unbiased affinities.
        indices: (N, K) chosen experts.
    Returns:
        () fp32; 1 for a perfectly balanced load.
    """
    N = scores.shape[0]
    counts = expert_counts(indices, n_experts).float()  # (E,)
    f = counts * n_experts / (topk * N)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)  # (E,)
    return (f * p).sum()


# --- the layer ---------------------------------------------------------------------------------


@dataclass
class MoEOutput:
    """One MoE layer's result: y (B, S, D); aux_loss () weighted by its alphas; load (E,) token counts."""

    y: Tensor
    aux_loss: Tensor
    load: Tensor


MOE_IMPLS = DISPATCH_IMPLS  # ("auto", "grouped", "loop"): the values of MoE.impl


class MoE(nn.Module):
    """Shared experts + routed experts with grouped dispatch.

    Shapes: x (B, S, D) -> `MoEOutput` with y (B, S, D).

    Modules: `gate` (Gate), `experts` (E routed `Expert`s of width moe_inter_dim),
    `shared_experts` (one `Expert` of width n_shared_experts * moe_inter_dim, as DeepSeek stores it:
    k shared experts of width m are one SwiGLU of width k * m), absent when n_shared_experts == 0.

    Attribute `impl` (one of `MOE_IMPLS`; `dispatch_impl` is the same attribute under its older
    name): "loop" calls each `Expert` module on its block of tokens (one GEMM
    launch per expert and matrix, and a host sync for the block sizes); "grouped" runs all experts'
    GEMMs as one `torch._grouped_mm` per matrix, with the block sizes kept on the device; "auto"
    (default) picks "grouped" where `grouped_mm_available`, else "loop". Both give the same output.
    Attribute `wgrad_splits`: on the grouped path, how many sub-blocks each expert's rows are cut into
    for the weight gradient (`dispatch.grouped_linear`); 0 (default) = `wgrad_splits(device, E, m, D)`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.n_routed_experts == 0:
            raise ValueError("MoE needs n_routed_experts > 0")
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.bias_update_speed = cfg.bias_update_speed
        self.seq_aux_loss_alpha, self.expert_aux_loss_alpha = cfg.seq_aux_loss_alpha, cfg.expert_aux_loss_alpha
        self.impl = "auto"  # MOE_IMPLS: how the experts' GEMMs run (see the class docstring)
        self.wgrad_splits = 0  # grouped path: sub-blocks per expert in the weight gradient; 0 = `wgrad_splits`
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (Expert(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts else None)
        # Tokens per expert since the last bias update (summed over micro-batches of one step).
        # int64: `.to(torch.bfloat16)` leaves integer buffers alone (bf16 counts are inexact above 256).
        self.register_buffer("load_since_update", torch.zeros(cfg.n_routed_experts, dtype=torch.int64),
                             persistent=False)

    @property
    def dispatch_impl(self) -> str:
        """The older name of `impl` (kept for notebooks and scripts that set it)."""
        return self.impl

    @dispatch_impl.setter
    def dispatch_impl(self, value: str) -> None:
        self.impl = value

    def resolve_impl(self, x: Tensor, impl: str | None = None) -> str:
        """The path ("grouped" or "loop") a call with input x and `impl` (None = `self.impl`) takes.

        Raises:
            ValueError: `impl` not in `MOE_IMPLS`, or "grouped" where `grouped_mm_available` says no.
        """
        impl = self.impl if impl is None else impl
        if impl not in MOE_IMPLS:
            raise ValueError(f"dispatch impl {impl!r} must be one of MOE_IMPLS = {MOE_IMPLS}")
        widths = (x.shape[-1], self.experts[0].w1.out_features)
        dtype = compute_dtype(x)
        if impl == "auto":
            return "grouped" if grouped_mm_available(x.device, dtype, *widths) else "loop"
        if impl == "grouped" and not grouped_mm_available(x.device, dtype, *widths):
            raise ValueError(f"dispatch impl 'grouped' needs torch._grouped_mm for {x.device.type} {dtype} "
                             f"with dim and moe_inter_dim {widths} multiples of 16 bytes; use 'loop'")
        return impl

    def experts_grouped(self, x_sorted: Tensor, counts: Tensor, w_sorted: Tensor) -> Tensor:
        """All experts at once: x_sorted (N*K, D) in expert blocks of sizes counts (E,) -> (N*K, D), weighted.

        The experts' matrices are stacked (E, m, D) for the call (a copy per forward; the parameters
        stay one `Expert` module each, under DeepSeek's names; stacking w1 and w3 into one (E, 2m, D)
        GEMM measured slower on the H200, the extra copy costing more than the launch it saves).
        Under autocast it computes in the autocast dtype, as `nn.Linear` does. The combine weight multiplies the
        (N*K, m) hidden activation before w2, which equals weighting the output (w2 is linear) and
        touches m instead of D values per row.
        """
        dtype = compute_dtype(x_sorted)  # under autocast: its dtype, as nn.Linear would compute
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block, on the device
        w1 = torch.stack([e.w1.weight for e in self.experts]).to(dtype)  # (E, m, D)
        w3 = torch.stack([e.w3.weight for e in self.experts]).to(dtype)  # (E, m, D)
        w2 = torch.stack([e.w2.weight for e in self.experts]).to(dtype)  # (E, D, m)
        x_sorted = x_sorted.to(dtype)
        splits = self.wgrad_splits or wgrad_splits(x_sorted.device, *w1.shape)
        a = grouped_linear(x_sorted, w1, offs, splits)  # (N*K, m)
        b = grouped_linear(x_sorted, w3, offs, splits)  # (N*K, m)
        h = F.silu(a) * b * w_sorted.to(dtype).unsqueeze(-1)  # (N*K, m)
        return grouped_linear(h, w2, offs, splits)  # (N*K, D)

    def experts_loop(self, x_sorted: Tensor, counts: Tensor, w_sorted: Tensor) -> Tensor:
        """Each `Expert` module once on its contiguous block (x_sorted.split(counts)), then weighted.

        An expert without tokens runs on its empty block too, so that its weights get a zero gradient
        (not None), as in the grouped GEMM: AdamW then treats idle experts the same on both paths.
        """
        sizes = counts.tolist()  # host sync: the per-expert GEMM shapes need the block sizes
        outs = [self.experts[e](block) for e, block in enumerate(x_sorted.split(sizes))]
        return torch.cat(outs) * w_sorted.unsqueeze(-1)  # (N*K, D)

    def dispatch(self, x: Tensor, routing: Routing, impl: str | None = None) -> tuple[Tensor, Tensor]:
        """Run each expert once on the tokens routed to it and combine with the weights.

        x (N, D), routing weights/indices (N, K) -> (y (N, D) in x's dtype, counts (E,) int64 tokens
        per expert). `impl`: one of `MOE_IMPLS` (None = `self.impl`).

        How (benchmarks/moe_layer.py measures each choice): the N*K (token, slot) pairs are sorted by
        expert, so every expert's tokens form one contiguous block; the experts run on their blocks
        (one grouped GEMM, or a loop of per-expert GEMMs); rows go back to (token, slot) order and
        each token sums its K slots. Rows move by permutations whose backward is the inverse
        permutation (`dispatch.gather_pairs`, `dispatch.permute_rows`), never by `index_add_`: no atomic adds in bf16 and
        the same result on every run. The weights are cast to x's dtype before they multiply, as in
        DeepSeek's reference (`weights.type_as(x)`).
        Raises:
            ValueError: for an unknown impl.
        """
        impl = self.resolve_impl(x, impl)
        K = routing.indices.shape[1]
        order = sort_by_expert(routing.indices, self.n_experts)  # pairs sorted by expert; counts (E,)
        x_sorted = gather_pairs(x, order.order, order.position, K)  # (N*K, D) expert after expert
        w_sorted = permute_rows(routing.weights.flatten().to(x.dtype), order.order, order.position)  # (N*K,)
        # Expert parallelism plugs in here: send each expert's contiguous block to its device and back.
        run = self.experts_grouped if impl == "grouped" else self.experts_loop
        out_sorted = run(x_sorted, order.counts, w_sorted)  # (N*K, D), weighted, in x_sorted's order
        y = combine(out_sorted, order, K)  # (N, D)
        counts = order.counts
        return y.to(x.dtype), counts  # x's dtype on both paths, autocast or not

    def forward(self, x: Tensor) -> MoEOutput:
        B, S, D = x.shape
        flat = x.reshape(B * S, D)  # (N, D)
        routing = self.gate(flat)
        y, counts = self.dispatch(flat, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        load = counts.float()  # (E,)
        if self.training:
            self.load_since_update += counts
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.seq_aux_loss_alpha > 0:
            aux = aux + self.seq_aux_loss_alpha * sequence_balance_loss(
                routing.scores.view(B, S, -1), routing.indices.view(B, S, -1), self.n_experts, self.topk)
        if self.expert_aux_loss_alpha > 0:
            aux = aux + self.expert_aux_loss_alpha * expert_balance_loss(
                routing.scores, routing.indices, self.n_experts, self.topk)
        return MoEOutput(y=y.view(B, S, D), aux_loss=aux, load=load)

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """Apply `update_bias` with the load gathered since the last call (once per optimizer step).

        Returns the load used (E,); a no-op on the bias when bias_update_speed == 0 or nothing was routed
        (every load 0: sign(0 - 0) = 0 moves no bias). No host read, so no GPU sync per step.
        """
        load = self.load_since_update.to(torch.float32, copy=True)  # (E,) fp32 copy (zeroed below)
        if self.bias_update_speed > 0:
            update_bias(self.gate.bias, load, self.bias_update_speed)
        self.load_since_update.zero_()
        return load
