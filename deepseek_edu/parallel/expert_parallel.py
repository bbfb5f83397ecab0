"""Expert parallelism: the routed experts sharded over ranks, tokens moved by all-to-all.

DeepSeek-V3 §3.2.2 (training, EP64) and §3.4 (inference: EP32 prefill, EP144/EP320 decode);
DeepEP's dispatch/combine. With W ranks and E routed experts, rank r owns experts
[r E/W, (r+1) E/W); the gate and the shared expert are replicated (every rank holds the same
weights) and run on the rank's own tokens. One forward:

1. **route** locally: `MoE.gate` on the rank's N tokens -> (N, K) experts and weights;
2. **sort** the N K (token, slot) pairs by expert: the pairs for rank 0's experts come first, then
   rank 1's, ... (so a rank's send buffer is one contiguous block per destination);
3. **exchange the counts** first: an all_to_all_single of the (W, E/W) per-expert counts tells
   every rank how many rows it will receive from each source (the splits of the next exchange);
4. **dispatch**: all_to_all_single of the rows with uneven splits (a rank may send or receive 0);
5. the received rows arrive grouped by source; **regroup** them by local expert (a permutation)
   and run each local `Expert` once on its contiguous block;
6. **combine**: the reverse all_to_all_single brings each output row back to the token's rank,
   which multiplies by the combine weight and sums the K slots (weights never travel, as in DeepEP).

Autograd: `_AllToAll` is a `torch.autograd.Function` whose backward is the all-to-all with the
splits swapped, so gradients flow back to the source ranks; the experts' weight gradients equal
the single-process `MoE`'s (their tokens are the same rows), and the replicated gate/shared weights
get the gradient of the rank's own tokens (sum over ranks = the single-process gradient; DDP or an
all_reduce does that sum).

Bytes moved (`bytes_per_token`): dispatch sends K rows of D values per token (BF16: 2 D bytes; FP8:
D bytes + one fp32 scale per 128 channels), combine returns K rows in BF16 -- DeepEP's choice (FP8
dispatch, BF16 combine). This implementation sends one row per (token, expert) pair; DeepEP sends a
token once per destination rank or node and lets that rank fan it out, which moves fewer bytes
when two of a token's experts share a rank.

Run `python -m deepseek_edu.parallel.expert_parallel --selftest --world-size 2` to check on CPU
processes that forward and gradients equal the single-process MoE.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..moe import MoE, MoEOutput, Routing, expert_balance_loss, expert_counts, sequence_balance_loss

FP8_SCALE_BLOCK = 128  # DeepEP / V3 §3.3: one fp32 scale per 1 x 128 tile of an FP8 activation


def bytes_per_token(dim: int, topk: int, dispatch: str = "bf16") -> dict[str, float]:
    """Bytes one token moves through dispatch and combine (one row per routed expert).

    Args:
        dim: hidden size D (V3: 7168). topk: experts per token K (V3: 8).
        dispatch: "bf16" (2 bytes per value) or "fp8" (1 byte per value + a 4-byte scale per 128).
    Returns:
        {"dispatch": bytes, "combine": bytes (always BF16), "total": bytes}.
    Raises:
        ValueError: unknown dispatch format.
    """
    if dispatch == "bf16":
        d = 2 * dim
    elif dispatch == "fp8":
        d = dim + 4 * -(-dim // FP8_SCALE_BLOCK)
    else:
        raise ValueError(f"dispatch={dispatch!r} must be 'bf16' or 'fp8'")
    return {"dispatch": float(topk * d), "combine": float(topk * 2 * dim), "total": float(topk * (d + 2 * dim))}


def tokens_per_expert(batch_per_gpu: float, ep: int, topk: int, n_experts: int) -> float:
    """Tokens one routed expert processes per decode step with a balanced load (V3 §3.4.2).

    ep GPUs each decode batch_per_gpu sequences (one new token each); every token goes to topk of
    n_experts experts: batch_per_gpu * ep * topk / n_experts. In BF16 an expert GEMM's arithmetic
    intensity is this many FLOP per byte of weights read.
    """
    return batch_per_gpu * ep * topk / n_experts


class _AllToAll(torch.autograd.Function):
    """rows (sum(in_splits), ...) -> (sum(out_splits), ...) by all_to_all_single; backward: the reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return all_to_all_rows(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_rows(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Rank r sends rows x[sum(in_splits[:j]) : +in_splits[j]] to rank j and receives out_splits[j] from j.

    Shapes: x (sum(in_splits), *F) -> (sum(out_splits), *F), same dtype. No autograd (see `_AllToAll`).
    """
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def exchange_counts(send_counts: Tensor, group=None) -> Tensor:
    """Step 3: (W, E_local) rows to send per (destination rank, its local expert) -> the same received.

    Received [s, e] = rows that rank s sends to this rank's local expert e. int64 on x's device.
    """
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)  # equal splits: E_local each
    return recv


def simulate_dispatch(xs: list[Tensor], indices: list[Tensor], n_experts: int
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Steps 2-4 in one process, the ranks simulated by lists: what every rank receives.

    Args:
        xs: per rank r, (N_r, D) tokens (N_r may be 0). indices: per rank, (N_r, K) chosen experts.
        n_experts: E, divisible by W = len(xs).
    Returns:
        (received, recv_counts): per destination rank d, received[d] (R_d, D) -- the rows from
        source 0, then source 1, ...; from each source its (token, slot) pairs sorted by expert
        (stably) -- and recv_counts[d] (W, E/W) int64, rows from source s for d's local expert e.
    Raises:
        ValueError: W does not divide E, or the lists differ in length.
    """
    W = len(xs)
    if W != len(indices) or n_experts % W:
        raise ValueError(f"{W} ranks with {len(indices)} index tensors and n_experts={n_experts}: the lists "
                         "must have one entry per rank and the ranks must divide the experts")
    local = n_experts // W
    sends, send_counts = [], []
    for x, idx in zip(xs, indices):
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = expert_counts(flat, n_experts).view(W, local)  # (W, E_local)
        sends.append(x.index_select(0, order // idx.shape[1]).split(counts.sum(1).tolist()))
        send_counts.append(counts)
    received = [torch.cat([sends[s][d] for s in range(W)]) for d in range(W)]
    recv_counts = [torch.stack([send_counts[s][d] for s in range(W)]) for d in range(W)]
    return received, recv_counts


def config_fingerprint(cfg_values: tuple) -> int:
    """A 63-bit hash of a tuple of config values, equal on every rank that holds the same config."""
    digest = hashlib.sha256(repr(cfg_values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_same_config(values: tuple, device: torch.device, group=None) -> None:
    """All-gather a fingerprint of `values`; raise ValueError on EVERY rank if any rank differs.

    Every rank takes part in the same collective and sees the same gathered list, so all raise
    together (no rank left waiting in a later collective).
    """
    mine = torch.tensor([config_fingerprint(values)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    fps = [int(t) for t in gathered]
    if len(set(fps)) > 1:
        raise ValueError(f"ranks hold different MoE configs (fingerprints {fps}); every rank must build "
                         "the same config")


class ExpertParallelMoE(nn.Module):
    """One MoE layer with its routed experts sharded over the ranks of `group`.

    Built from a full `MoE` (same weights on every rank, e.g. same seed): keeps its `gate` and
    `shared_experts` (replicated) and only the local experts, `experts` (E/W modules, global ids
    `expert_offset` + j). Shapes: x (B, S, D) -> `MoEOutput` y (B, S, D), aux_loss (), load (E,)
    of this rank's tokens. B*S may differ between ranks and may be 0.

    Raises (on every rank, before any data moves):
        ValueError: the world size does not divide n_routed_experts; the ranks' configs differ.
    """

    def __init__(self, moe: MoE, group=None) -> None:
        super().__init__()
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts, self.topk = moe.n_experts, moe.topk
        if self.n_experts % self.world_size:
            raise ValueError(f"n_routed_experts={self.n_experts} is not divisible by the expert-parallel "
                             f"world size {self.world_size}")
        self.n_local = self.n_experts // self.world_size
        self.expert_offset = self.rank * self.n_local
        self.seq_aux_loss_alpha, self.expert_aux_loss_alpha = moe.seq_aux_loss_alpha, moe.expert_aux_loss_alpha
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        self.experts = nn.ModuleList(moe.experts[self.expert_offset: self.expert_offset + self.n_local])
        e = moe.experts[0]
        shared = None if moe.shared_experts is None else moe.shared_experts.w1.out_features
        check_same_config((self.n_experts, self.topk, e.w1.in_features, e.w1.out_features, shared,
                           self.gate.n_groups, self.gate.topk_groups, self.gate.score_func,
                           self.gate.group_score, self.gate.norm_topk_prob, self.gate.route_scale,
                           self.seq_aux_loss_alpha, self.expert_aux_loss_alpha),
                          self.gate.weight.device, group)
        self.last_rows_sent = 0  # rows this rank sent to OTHER ranks in the last forward (bytes = rows x row size)

    def _route(self, flat: Tensor) -> Routing:
        if flat.shape[0] == 0:  # Gate's group view cannot reshape 0 rows; an empty routing, still in the graph
            scores = F.linear(flat.float(), self.gate.weight.float()).sigmoid()  # (0, E)
            empty = torch.empty(0, self.topk, dtype=torch.int64, device=flat.device)
            return Routing(weights=scores[:, :self.topk], indices=empty, scores=scores)
        return self.gate(flat)

    def _run_local_experts(self, rows: Tensor, recv_counts: Tensor) -> Tensor:
        """Step 5: rows (R, D) grouped by (source rank, local expert) -> expert outputs in the same order."""
        W, L = recv_counts.shape
        segment = torch.repeat_interleave(torch.arange(W * L, device=rows.device), recv_counts.flatten())  # (R,)
        key = (segment % L) * W + segment // L  # local expert major, source rank minor
        perm = key.argsort(stable=True)  # (R,) expert-ordered position -> received row
        inverse = torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))
        blocks = rows.index_select(0, perm).split(recv_counts.sum(0).tolist())  # one block per local expert
        out = torch.cat([expert(block) for expert, block in zip(self.experts, blocks)])  # empty blocks too
        return out.index_select(0, inverse)  # back to received order

    def forward(self, x: Tensor) -> MoEOutput:
        B, S, D = x.shape
        flat = x.reshape(B * S, D)  # (N, D)
        routing = self._route(flat)
        N, K = routing.indices.shape
        pair_expert = routing.indices.flatten()  # (N*K,)
        order = pair_expert.argsort(stable=True)  # sorted position -> pair (token * K + slot)
        position = torch.empty_like(order).index_copy_(0, order, torch.arange(N * K, device=x.device))
        counts = expert_counts(pair_expert, self.n_experts)  # (E,) this rank's tokens per expert
        send_counts = counts.view(self.world_size, self.n_local)  # (W, E_local) per destination
        recv_counts = exchange_counts(send_counts, self.group)  # (W, E_local) per source
        in_splits, out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        self.last_rows_sent = sum(in_splits) - in_splits[self.rank]
        x_sorted = flat.index_select(0, order // K)  # (N*K, D) destination rank after destination rank
        received = _AllToAll.apply(x_sorted, out_splits, in_splits, self.group)  # dispatch
        expert_out = self._run_local_experts(received, recv_counts)
        back = _AllToAll.apply(expert_out, in_splits, out_splits, self.group)  # combine, (N*K, D) sorted
        pairs = back.index_select(0, position).view(N, K, D)  # (N, K, D) token, slot order
        y = (pairs * routing.weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)  # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.seq_aux_loss_alpha > 0 and N:
            aux = aux + self.seq_aux_loss_alpha * sequence_balance_loss(
                routing.scores.view(B, S, -1), routing.indices.view(B, S, -1), self.n_experts, self.topk)
        if self.expert_aux_loss_alpha > 0 and N:
            aux = aux + self.expert_aux_loss_alpha * expert_balance_loss(
                routing.scores, routing.indices, self.n_experts, self.topk)
        return MoEOutput(y=y.view(B, S, D), aux_loss=aux, load=counts.float())


# --- self-test: EP == single process ------------------------------------------------------------


def selftest_config() -> ModelConfig:
    """A small MoE config with groups (8 experts, top-2 of 4 groups keeping 2) and a shared expert."""
    return ModelConfig(dim=32, n_layers=1, n_heads=2, inter_dim=64, n_dense_layers=0, n_routed_experts=8,
                       n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16, n_expert_groups=4,
                       n_limited_groups=2, score_func="sigmoid", group_score="top2_sum", route_scale=2.5,
                       norm_topk_prob=True, seq_aux_loss_alpha=0.0, expert_aux_loss_alpha=0.0)


def _rank_tokens(world_size: int, lengths: list[int], dim: int, seed: int) -> list[Tensor]:
    """Deterministic per-rank inputs (1, lengths[r], D) fp32, the same on every process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, lengths[r], dim, generator=g) for r in range(world_size)]


def compare_with_single_process(rank: int, world_size: int, cfg: ModelConfig, lengths: list[int],
                                seed: int = 0, ref_impl: str = "loop", gate_bias: Tensor | None = None
                                ) -> dict[str, float]:
    """Run on every rank (process group initialised): EP forward/backward vs the full MoE on all tokens.

    Args:
        lengths: tokens per rank (any may be 0). ref_impl: the reference MoE's dispatch_impl.
        gate_bias: (E,) selection bias set on both models (None: a small ramp).
    Returns the max absolute differences of this rank's output, input gradient and local experts'
    gradients (the same rows in the same order: exact up to a few ulps), and of the replicated
    weights' all-reduced gradients divided by max(1, their largest entry).
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(seed)
    moe = MoE(cfg)  # the same weights on every rank (same seed)
    with torch.no_grad():
        # a small bias exercises the biased choice; a large one can starve a rank's experts
        moe.gate.bias.copy_(torch.linspace(-0.02, 0.02, cfg.n_routed_experts) if gate_bias is None else gate_bias)
    ref = MoE(cfg)
    ref.load_state_dict(moe.state_dict())
    ref.dispatch_impl = ref_impl  # "loop": the same per-expert GEMMs, weights applied after w2 as here
    moe.to(device)
    ref.to(device)
    xs = [x.to(device) for x in _rank_tokens(world_size, lengths, cfg.dim, seed + 1)]
    targets = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2 + r)).to(device)
               for r, x in enumerate(xs)]
    # reference: one process, all ranks' tokens
    x_all = torch.cat(xs, dim=1).requires_grad_()
    y_ref = ref(x_all).y
    (y_ref * torch.cat(targets, dim=1)).sum().backward()
    # expert parallel: this rank's tokens only
    ep = ExpertParallelMoE(moe)
    x = xs[rank].clone().requires_grad_()
    y = ep(x).y
    (y * targets[rank]).sum().backward()
    start = sum(lengths[:rank])
    diffs = {"y": (y - y_ref[:, start:start + lengths[rank]]).abs().max().item() if lengths[rank] else 0.0,
             "x.grad": (x.grad - x_all.grad[:, start:start + lengths[rank]]).abs().max().item()
             if lengths[rank] else 0.0}
    for j, expert in enumerate(ep.experts):
        for name, p in expert.named_parameters():
            p_ref = dict(ref.experts[ep.expert_offset + j].named_parameters())[name]
            diffs[f"experts.{ep.expert_offset + j}.{name}"] = (p.grad - p_ref.grad).abs().max().item()
    ref_params = dict(ref.named_parameters())
    for name, p in moe.named_parameters():
        if not name.startswith(("gate.", "shared_experts.")):
            continue
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)  # replicated weights: the sum of the ranks' gradients (what DDP does)
        # the one-process GEMM sums all tokens in one order, the all_reduce sums W partial sums: the
        # same sum rounded differently, so this one is relative to the gradient's size (max 1)
        diffs[name] = (grad - ref_params[name].grad).abs().max().item() / max(1.0, ref_params[name].grad.abs().max().item())
    return diffs


def main(argv: list[str] | None = None) -> int:
    from .launch import run_ranks

    p = argparse.ArgumentParser(prog="python -m deepseek_edu.parallel.expert_parallel",
                                description="Check expert parallelism against the single-process MoE.")
    p.add_argument("--selftest", action="store_true", help="run the check (the only action)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="nccl: one GPU per rank")
    args = p.parse_args(argv)
    if not args.selftest:
        p.print_help()
        return 0
    cfg = selftest_config()
    lengths = [5 + 3 * r for r in range(args.world_size)]
    lengths[-1] = 0  # one rank with an empty batch
    results = run_ranks(compare_with_single_process, args.world_size, args=(cfg, lengths), backend=args.backend)
    worst = max(max(d.values()) for d in results)
    print(f"expert parallel over {args.world_size} {args.backend} ranks, tokens per rank {lengths}: "
          f"max |EP - single process| over outputs and gradients = {worst:.1e}")
    print("equal within 1e-6:", worst <= 1e-6)
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
