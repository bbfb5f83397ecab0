"""Weight quantisation to FP8 E4M3 with one FP32 scale per 128 x 128 block: DeepSeek-V3 §3.3.2.

Weights are quantised once (offline), so a coarser grid than activations' 1 x 128 tiles suffices: a
128 x 128 block shares one scale, and the scales of an (N, K) weight are (ceil(N/128), ceil(K/128))
-- 1/16384 of the weight's bytes. The GEMM then applies one activation scale per row and one weight
scale per block for each 128-wide slice of K (see `fp8_gemm`).

**Bytes and FLOPs.** `weight_dequant` of an N x K weight reads NK (E4M3) + 4NK/16384 bytes and
writes 2NK (bf16): ~3 NK bytes, 1 FLOP per element -- memory-bound, judged against copy bandwidth.
`weight_quant` moves the same bytes the other way (reads 2NK, writes NK) with ~3 FLOPs per element.

Blocks at the right and bottom edges may be partial (N or K not a multiple of 128): their scale is
the max-abs of the elements that exist.
"""

import torch
from torch import Tensor

from ._triton import check_contiguous, check_device, jit, require_triton, tl, triton
from .act_quant import AMAX_EPS, FP8_E4M3_MAX, round_to_e4m3


def _blocks(w: Tensor, block_size: int) -> Tensor:
    """(N, K) -> (ceil(N/b), b, ceil(K/b), b), zero-padded at the bottom and right edges."""
    N, K = w.shape
    pad_n, pad_k = -N % block_size, -K % block_size
    w = torch.nn.functional.pad(w, (0, pad_k, 0, pad_n))
    return w.view(w.shape[0] // block_size, block_size, w.shape[1] // block_size, block_size)


def weight_quant_ref(w: Tensor, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of `weight_quant` (same semantics as `deepseek_edu.fp8.weight_quant_ref`).

    Args:
        w: (N, K) float weight.
    Returns:
        y: (N, K) float8_e4m3fn; s: (ceil(N/b), ceil(K/b)) float32 with w ≈ y * s blockwise.
    Raises:
        ValueError: if w is not 2-D floating point.
    """
    _check_weight(w, float_only=True)
    N, K = w.shape
    wb = _blocks(w.float(), block_size)  # (N/b, b, K/b, b)
    s = wb.abs().amax(dim=(1, 3)).clamp(min=AMAX_EPS) / FP8_E4M3_MAX  # (N/b, K/b)
    y = (wb / s[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return y.flatten(2).flatten(0, 1)[:N, :K].contiguous(), s


def weight_dequant_ref(w: Tensor, s: Tensor, block_size: int = 128, dtype: torch.dtype | None = None) -> Tensor:
    """Plain-PyTorch twin of `weight_dequant`: w (N, K) E4M3, s (ceil(N/b), ceil(K/b)) -> (N, K).

    `dtype` defaults to torch.get_default_dtype() (as DeepSeek's `weight_dequant`).
    """
    _check_scales(w, s, block_size)
    N, K = w.shape
    s_full = s.repeat_interleave(block_size, 0)[:N].repeat_interleave(block_size, 1)[:, :K]  # (N, K)
    return (w.float() * s_full).to(dtype or torch.get_default_dtype())


def _check_weight(w: Tensor, float_only: bool = False) -> None:
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, K), got shape {tuple(w.shape)}")
    if float_only and (not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        raise ValueError(f"w must be fp32, fp16 or bf16, got {w.dtype}")


def _check_scales(w: Tensor, s: Tensor, block_size: int) -> None:
    _check_weight(w)
    if w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"w must be float8_e4m3fn, got {w.dtype}")
    want = (_cdiv(w.shape[0], block_size), _cdiv(w.shape[1], block_size))
    if s.dtype != torch.float32 or tuple(s.shape) != want:
        raise ValueError(f"s must be float32 of shape {want} for w {tuple(w.shape)} and block_size={block_size}, "
                         f"got {s.dtype} {tuple(s.shape)}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@jit
def weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, BLOCK: tl.constexpr):
    """One program: the BLOCK x BLOCK block (pid_n, pid_k) -> its E4M3 values and one scale."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(w)), 1e-4) / 448.0  # AMAX_EPS, FP8_E4M3_MAX
    y = round_to_e4m3(tl.clamp(w / s, -448.0, 448.0))  # exact cast below (see act_quant)
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k, s)


@jit
def weight_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, BLOCK: tl.constexpr):
    """One program: the BLOCK x BLOCK block (pid_n, pid_k) times its scale."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=mask).to(tl.float32)
    s = tl.load(s_ptr + pid_n * tl.cdiv(K, BLOCK) + pid_k)
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], (w * s).to(y_ptr.dtype.element_ty), mask=mask)


def _check_launch(block_size: int, **tensors: Tensor) -> None:
    check_contiguous(**tensors)
    check_device(*tensors.values())
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a power of two (Triton tiles are)")


def weight_quant(w: Tensor, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Quantise a weight to E4M3 with one FP32 scale per block_size x block_size block (Triton).

    Args:
        w: (N, K) fp32/fp16/bf16, contiguous; any N, K (edge blocks may be partial).
    Returns:
        y: (N, K) float8_e4m3fn; s: (ceil(N/b), ceil(K/b)) float32, equal to `weight_quant_ref`.
    Raises:
        ValueError: bad shape, dtype, layout or block size.
        TritonUnavailableError: without Triton (use `weight_quant_ref`).
    """
    require_triton("deepseek_edu.kernels.weight_quant_ref")
    _check_weight(w, float_only=True)
    _check_launch(block_size, w=w)
    N, K = w.shape
    y = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    s = w.new_empty(triton.cdiv(N, block_size), triton.cdiv(K, block_size), dtype=torch.float32)
    weight_quant_kernel[s.shape](w, y, s, N, K, BLOCK=block_size)
    return y, s


def weight_dequant(w: Tensor, s: Tensor, block_size: int = 128, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantise an E4M3 weight with its 128 x 128 block scales (Triton; DeepSeek's `weight_dequant`).

    Args:
        w: (N, K) float8_e4m3fn, contiguous.
        s: (ceil(N/b), ceil(K/b)) float32, contiguous.
        dtype: output dtype (default torch.get_default_dtype()).
    Returns:
        (N, K) w * s blockwise, equal to `weight_dequant_ref` (one rounding to `dtype`).
    Raises:
        ValueError: bad shapes, dtypes, layout or block size.
        TritonUnavailableError: without Triton (use `weight_dequant_ref`).
    """
    require_triton("deepseek_edu.kernels.weight_dequant_ref")
    _check_scales(w, s, block_size)
    _check_launch(block_size, w=w, s=s)
    y = torch.empty_like(w, dtype=dtype or torch.get_default_dtype())
    weight_dequant_kernel[s.shape](w, s, y, w.shape[0], w.shape[1], BLOCK=block_size)
    return y
