"""Blockwise-scaled FP8 GEMM with FP32 promotion: DeepSeek-V3 §3.3.2 ("increasing accumulation
precision") and DeepSeek's `inference/kernel.py`.

C = A B^T with A (M, K) in E4M3 scaled per 1 x 128 tile (`act_quant`) and B (N, K) in E4M3 scaled per
128 x 128 block (`weight_quant`). Inside one 128-wide slice of K every product shares the same two
scales, so the tensor core multiplies the raw E4M3 values and sums them; the slice's partial sum is
then multiplied by a_s (one per row) and b_s (one per column block) and added to an FP32
accumulator. That add, outside the tensor core, every 128 values of K, is V3's *promotion*: H800
tensor cores keep only ~14 bits of the running sum, so long K would lose precision if the whole sum
stayed inside them.

**Bytes and FLOPs**: 2MNK FLOPs; reads MK + NK bytes of E4M3 plus scales (4MK/128 + 4NK/16384),
writes 2MN (bf16). At M = N = K = 8192: 1.1 PFLOP over ~0.27 GB -- compute-bound, judged against
`torch._scaled_mm` on the same scales.
"""

import torch
from torch import Tensor

from ._triton import check_contiguous, check_device, jit, require_triton, tl, triton

SCALE_BLOCK = 128  # K-slice of one promotion; also the weight's scale block (V3: 128 x 128)


def fp8_gemm_ref(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Plain-PyTorch twin of `fp8_gemm`: the same per-128 K-slice products, scaled and summed in FP32.

    Args:
        a: (..., K) float8_e4m3fn; a_s: (..., K // 128) float32.
        b: (N, K) float8_e4m3fn; b_s: (ceil(N / 128), K // 128) float32.
    Returns:
        (..., N) in out_dtype (bf16 by default).
    Raises:
        ValueError: on shapes, dtypes or K not a multiple of 128.
    """
    _check_args(a, a_s, b, b_s)
    K, N = a.shape[-1], b.shape[0]
    a2, a_s2 = a.reshape(-1, K).float(), a_s.reshape(-1, K // SCALE_BLOCK)
    b_s_cols = b_s.repeat_interleave(SCALE_BLOCK, 0)[:N]  # (N, K/128): each column's block scale
    acc = torch.zeros(a2.shape[0], N, dtype=torch.float32, device=a.device)  # (M, N)
    for i in range(K // SCALE_BLOCK):
        ks = slice(i * SCALE_BLOCK, (i + 1) * SCALE_BLOCK)
        partial = a2[:, ks] @ b[:, ks].float().T  # (M, N): what the tensor core sums for one K-slice
        acc += partial * a_s2[:, i, None] * b_s_cols[None, :, i]  # promotion: scale, add in FP32
    return acc.to(out_dtype).view(*a.shape[:-1], N)


def _check_args(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name} must be float8_e4m3fn, got {t.dtype}")
    for name, t in (("a_s", a_s), ("b_s", b_s)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    if a.dim() < 1 or b.dim() != 2 or a.shape[-1] != b.shape[1]:
        raise ValueError(f"a (..., K) and b (N, K) must share K, got {tuple(a.shape)} and {tuple(b.shape)}")
    K, N = b.shape[1], b.shape[0]
    if K % SCALE_BLOCK:
        raise ValueError(f"K={K} must be a multiple of {SCALE_BLOCK} (one scale per 128-wide K-slice)")
    if tuple(a_s.shape) != (*a.shape[:-1], K // SCALE_BLOCK):
        raise ValueError(f"a_s must have shape {(*a.shape[:-1], K // SCALE_BLOCK)}, got {tuple(a_s.shape)}")
    if tuple(b_s.shape) != (-(-N // SCALE_BLOCK), K // SCALE_BLOCK):
        raise ValueError(f"b_s must have shape {(-(-N // SCALE_BLOCK), K // SCALE_BLOCK)}, got {tuple(b_s.shape)}")


@jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: the BLOCK_M x BLOCK_N tile (pid_m, pid_n) of C, looping over K in 128-wide slices."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    n_kb = K // BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): B^T read in place
    a_s_ptrs = a_s_ptr + offs_m * n_kb  # one scale per row per K-slice
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * n_kb  # one scale per 128 columns per K-slice
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(n_kb):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + i, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptrs + i, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]  # promotion: FP32 add outside the tensor core
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_gemm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype = torch.bfloat16,
             block_m: int = 64, block_n: int = 128) -> Tensor:
    """Blockwise-scaled FP8 GEMM, C = (A * a_s) (B * b_s)^T, FP32 accumulation with promotion (Triton).

    Args:
        a: (..., K) float8_e4m3fn, contiguous; a_s: (..., K // 128) float32 (from `act_quant`).
        b: (N, K) float8_e4m3fn, contiguous; b_s: (ceil(N / 128), K // 128) float32 (`weight_quant`).
        out_dtype: output dtype (bf16 by default).
        block_m, block_n: tile of C per program (powers of two, >= 16; block_n divides 128).
    Returns:
        (..., N) out_dtype, equal to `fp8_gemm_ref` up to the FP32 summation order (one out_dtype step).
    Raises:
        ValueError: bad shapes, dtypes, layout, K % 128 != 0, or bad tile sizes.
        TritonUnavailableError: without Triton (use `fp8_gemm_ref`).
    """
    require_triton("deepseek_edu.kernels.fp8_gemm_ref")
    _check_args(a, a_s, b, b_s)
    check_contiguous(a=a, a_s=a_s, b=b, b_s=b_s)
    check_device(a, a_s, b, b_s)
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot's smallest tile)")
    if SCALE_BLOCK % block_n:
        raise ValueError(f"block_n={block_n} must divide {SCALE_BLOCK} (one weight scale per tile column)")
    K, N = b.shape[1], b.shape[0]
    M = a.numel() // K
    c = a.new_empty(*a.shape[:-1], N, dtype=out_dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    fp8_gemm_kernel[grid](a, b, c, a_s, b_s, M, N, K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=SCALE_BLOCK)
    return c
