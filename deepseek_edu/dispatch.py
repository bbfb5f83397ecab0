"""MoE dispatch: move each (token, slot) pair to its expert, run the experts, and bring the rows back.

DeepSeekMoE's layer (`moe.MoE.dispatch`) is four steps, each a public function here:

    order = sort_by_expert(indices, E)              (N, K) -> pairs sorted by expert + counts (E,)
    x_sorted = gather_pairs(x, order.order, order.position, K)    (N, D) -> (N*K, D), expert after expert
    out_sorted = <run the experts on their contiguous blocks>     (N*K, D) -> (N*K, D)
    y = combine(out_sorted, order, K)                             (N*K, D) -> (N, D), the K slots summed

The experts' step is where the implementation paths differ: one grouped GEMM per matrix
(`grouped_linear`, where `grouped_mm_available`) or a loop of per-expert GEMMs, and where expert
parallelism plugs in: with the experts spread over devices, the contiguous block of expert e is sent
to e's device (an all-to-all of `counts`-sized blocks), run there, and sent back in the same order,
between `gather_pairs` and `combine`; nothing before or after changes.

Rows move by permutations whose backward is the inverse permutation (`gather_pairs`,
`permute_rows`), never by `index_add_`: no atomic adds in bf16 and the same bits on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DISPATCH_IMPLS = ("auto", "grouped", "loop")  # MoE.impl: how the experts' GEMMs run


def expert_counts(indices: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert: indices (...,) integer ids in [0, E) -> (E,) int64 counts.

    A scatter-add of ones into E fixed slots. Unlike `torch.bincount`, whose output length depends on
    the largest index, the shape is known before the data, so `torch.compile` traces it into the
    graph instead of breaking it there (integer adds, so the counts are exact on every run).
    """
    flat = indices.flatten().long()  # scatter_add_ wants int64 ids and ones of the counts' dtype
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sum_slots(v: Tensor) -> Tensor:
    """(N, K, D) -> (N, D): each token's K slots summed.

    For K = 2 one elementwise add of two strided views (the exactly rounded sum), which runs several
    times faster on a GPU than a reduction over a middle axis of size 2; for larger K the reduction.
    """
    if v.shape[1] > 2:  # a chain of K - 1 passes costs more than one reduction from K = 3 on
        return v.sum(dim=1)
    return v[:, 0] if v.shape[1] == 1 else v[:, 0] + v[:, 1]


class _GatherPairs(torch.autograd.Function):
    """x (N, D) -> (N*K, D) in expert order: row j is token order[j] // K (pair p = token * K + slot).

    Backward brings the rows back to pair order with a gather by `position` (the inverse of `order`)
    and sums each token's K slots: no atomic adds, the same bits on every run.
    """

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, position: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(position)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (position,) = ctx.saved_tensors
        n_pairs, d = grad.shape
        return sum_slots(grad.index_select(0, position).view(n_pairs // ctx.k, ctx.k, d)), None, None, None


class _Permute(torch.autograd.Function):
    """rows[perm]: a permutation of rows whose backward is the inverse permutation (a gather, no atomics)."""

    @staticmethod
    def forward(ctx, rows: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GroupedLinear(torch.autograd.Function):
    """Every expert's linear map in one grouped GEMM: y[rows of e] = x[rows of e] @ w[e]^T.

    Shapes: x (T, D_in) with the rows of expert e in the block offs[e-1]:offs[e] (offs (E,) int32,
    cumulative, on the device), w (E, D_out, D_in) -> y (T, D_out). Backward: grad_x is again one
    grouped GEMM over the row blocks; grad_w[e] = grad_y[block e]^T @ x[block e] sums over the rows of
    expert e, so its GEMM is grouped along the *inner* dimension, and one GEMM tile of a busy expert
    runs through all that expert's rows while the tiles of idle experts are done. With `splits` > 1
    each block is cut into that many consecutive sub-blocks of (nearly) equal size whose partial
    gradients (in the GEMM's dtype) are summed in fp32: in fp32 the same sum in another order, in bf16
    one more rounding per partial; the work of a busy expert is spread over `splits` times
    more tiles (on the H200, benchmarks/profile_train_step.py; a router is seldom balanced early on).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offs: Tensor, splits: int) -> Tensor:
        ctx.save_for_backward(x, w, offs)
        ctx.splits = splits
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w, offs=offs)  # (T, D_in)
        n_experts, d_out, d_in = w.shape
        s = ctx.splits
        if s > 1:  # sub-block j of expert e ends at start_e + floor(j * count_e / s), j = 1..s
            ends = offs.long()
            counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,)
            parts = torch.arange(1, s + 1, device=offs.device)  # (s,)
            sub_offs = ((ends - counts)[:, None] + counts[:, None] * parts // s).flatten().to(torch.int32)
            partial = torch._grouped_mm(grad.t(), x, offs=sub_offs)  # (E*s, D_out, D_in)
            grad_w = partial.view(n_experts, s, d_out, d_in).float().sum(dim=1).to(w.dtype)
        else:
            grad_w = torch._grouped_mm(grad.t(), x, offs=offs)  # (E, D_out, D_in)
        return grad_x, grad_w, None, None


def wgrad_splits(device: torch.device, n_experts: int, d_out: int, d_in: int) -> int:
    """Sub-blocks per expert for the weight gradient of `grouped_linear` (1 = none).

    On CUDA, when all experts' (d_out, d_in) gradients together hold fewer than 1,024 output tiles of
    128 x 128 (a few waves of an H200's 132 SMs), as many sub-blocks (at most 4) as bring them near
    1,024: with so few tiles, the tiles of a busy expert would run on alone at the end. Else 1: the
    tiles already keep the GPU busy, and the partial sums cost `splits` times the gradient's memory
    (measured slower for 64 experts at D 2048, benchmarks/moe_layer.py). 1 on CPU, where torch's
    reference kernel loops over the groups.
    """
    if device.type != "cuda":
        return 1
    tiles = n_experts * -(-d_out // 128) * -(-d_in // 128)
    return max(1, min(4, 1024 // tiles))



def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype inside an autocast region, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_available(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether `torch._grouped_mm` (one launch for all experts' GEMMs) serves this device and dtype.

    CPU: fp32 or bf16 (torch's reference implementation); under `torch.compile` bf16 only, because
    torch's shape function for the op accepts nothing else. CUDA: bf16 on compute capability >= 9.0
    (Hopper's grouped GEMM kernel). Every matrix width in `widths` (here dim and moe_inter_dim) must
    be a multiple of 16 bytes, which the kernels require of the strides. Elsewhere the loop is used.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(w * itemsize % 16 for w in widths):
        return False
    if device.type == "cpu":
        return dtype == torch.bfloat16 or (dtype == torch.float32 and not torch.compiler.is_compiling())
    return device.type == "cuda" and dtype == torch.bfloat16 and _cuda_major(device.index or 0) >= 9


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    """The compute capability's major number of CUDA device `index`; a constant to `torch.compile`."""
    return torch.cuda.get_device_capability(index)[0]


# --- the public steps ------------------------------------------------------------------------------------


@dataclass
class ExpertOrder:
    """The (token, slot) pairs sorted by expert: what `sort_by_expert` returns.

    Attributes:
        order: (N*K,) int64, sorted position -> pair (pair p = token * K + slot).
        position: (N*K,) int64, pair -> sorted position (the inverse permutation of `order`).
        counts: (E,) int64 pairs per expert; expert e's rows are the block
            counts[:e].sum() : counts[:e+1].sum() of the sorted rows.
    """

    order: Tensor
    position: Tensor
    counts: Tensor


def sort_by_expert(indices: Tensor, n_experts: int) -> ExpertOrder:
    """Sort the (token, slot) pairs by expert with a stable sort (ties keep token order).

    Args:
        indices: (N, K) int64 chosen experts per token.
        n_experts: E.
    Returns:
        `ExpertOrder`.
    """
    flat = indices.flatten()  # (N*K,) expert of each (token, slot) pair
    order = flat.argsort(stable=True)  # (N*K,) sorted position -> pair
    position = torch.empty_like(order).index_copy_(  # (N*K,) pair -> sorted position (inverse of order)
        0, order, torch.arange(order.numel(), device=order.device))
    return ExpertOrder(order=order, position=position, counts=expert_counts(flat, n_experts))


def gather_pairs(x: Tensor, order: Tensor, position: Tensor, k: int) -> Tensor:
    """x (N, D) -> (N*K, D) in expert order: row j is token order[j] // k. Backward: a gather by
    `position` and a sum of each token's k slots (deterministic, no atomics)."""
    return _GatherPairs.apply(x, order, position, k)


def permute_rows(rows: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    """rows[perm] along dim 0, whose backward is the gather by `inverse` (the inverse permutation)."""
    return _Permute.apply(rows, perm, inverse)


def grouped_linear(x: Tensor, w: Tensor, offs: Tensor, splits: int = 1) -> Tensor:
    """Every expert's linear map in one grouped GEMM: x (T, D_in) in expert blocks ending at offs (E,)
    int32, w (E, D_out, D_in) -> (T, D_out); `splits` sub-blocks per expert in the weight gradient."""
    return _GroupedLinear.apply(x, w, offs, splits)


def combine(out_sorted: Tensor, order: ExpertOrder, k: int) -> Tensor:
    """(N*K, D) rows in expert order -> (N, D): back to (token, slot) order, each token's k slots summed."""
    unsorted = permute_rows(out_sorted, order.position, order.order)  # (N*K, D) in pair order
    return sum_slots(unsorted.view(unsorted.shape[0] // k, k, -1))  # (N, D)
