"""Activation quantisation to FP8 E4M3, one FP32 scale per 1 x 128 tile: DeepSeek-V3 §3.3.2.

Each token's row is cut into tiles of `block_size` = 128 channels; a tile's scale is its max-abs over
448 (the largest finite E4M3 value), so the largest element lands on 448 and the rest keep E4M3's
3 mantissa bits *relative to their tile*, not to the whole tensor: one outlier channel costs
precision only in its own 128 values.

**Bytes and FLOPs** for x of M x K in bf16: reads 2MK bytes, writes MK (E4M3) + 4MK/128 (scales),
so 3.03 MK bytes in all, and ~3 FLOPs per element (abs, max, divide). Three bytes per FLOP is far
below any GPU's ridge point: the kernel is memory-bound and judged against copy bandwidth.

Order as in the Triton tutorials: the plain-PyTorch `act_quant_ref` (what to compute), then
`act_quant_kernel` (how one program computes one BLOCK_M x 128 tile), then the launcher `act_quant`.
"""

import torch
from torch import Tensor

from ._triton import check_contiguous, check_device, jit, require_triton, tl, triton

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
AMAX_EPS = 1e-4  # floor of a tile's max-abs: an all-zero tile gets a finite scale (and zeros), not 0/0
SCALE_FMTS = (None, "ue8m0")


def _pow2_ceil_ref(s: Tensor) -> Tensor:
    """Smallest power of two >= s (s > 0), exactly: frexp gives s = m * 2^e with m in [0.5, 1)."""
    m, e = torch.frexp(s)
    return torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))


def act_quant_ref(x: Tensor, block_size: int = 128, scale_fmt: str | None = None) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of `act_quant` (same semantics as `deepseek_edu.fp8.act_quant_ref`).

    Args:
        x: (..., K) float tensor; K a multiple of block_size.
        block_size: channels per tile (128 in V3).
        scale_fmt: None (any FP32 scale) or "ue8m0" (scale rounded up to a power of two, as
            DeepSeek-V3.1+ and Blackwell's MX formats store it: an 8-bit exponent, no mantissa).
    Returns:
        y: (..., K) float8_e4m3fn; s: (..., K // block_size) float32; x ≈ y.float() * s per tile.
    Raises:
        ValueError: if K % block_size != 0 or scale_fmt is unknown.
    """
    _check_args(x, block_size, scale_fmt)
    xb = x.float().unflatten(-1, (-1, block_size))  # (..., K/128, 128)
    s = xb.abs().amax(-1).clamp(min=AMAX_EPS) / FP8_E4M3_MAX  # (..., K/128)
    if scale_fmt == "ue8m0":
        s = _pow2_ceil_ref(s)
    y = (xb / s[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)  # saturate
    return y.flatten(-2), s


def _check_args(x: Tensor, block_size: int, scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be one of {SCALE_FMTS}")
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise ValueError(f"the last dim of x ({tuple(x.shape)}) must be a multiple of block_size={block_size}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"x must be fp32, fp16 or bf16, got {x.dtype}")


@jit
def round_to_e4m3(x):
    """Round fp32 x (|x| <= 448) to the nearest E4M3 value, ties to even, staying in fp32.

    The cast that follows is then exact. Triton's CPU interpreter rounds some casts wrongly (a rounding
    carry into the exponent is lost: 126.7 -> 64 instead of 128), so we round here, the same way on
    every backend: normal values keep 3 mantissa bits (add half an ulp of the dropped 20 bits, plus one
    if the kept last bit is odd, then clear them); below 2^-6 (subnormal E4M3) the step is 2^-9, and
    adding and removing 1.5 * 2^14 rounds to it (fp32's own round-to-nearest-even at that magnitude).
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@jit
def act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     UE8M0: tl.constexpr):
    """One program: rows [pid_m * BLOCK_M, +BLOCK_M) x channels [pid_k * BLOCK_K, +BLOCK_K)."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    mask = rows[:, None] < M  # K is a multiple of BLOCK_K: only the last rows can overhang
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)  # (BLOCK_M,) AMAX_EPS
    s = amax / 448.0  # FP8_E4M3_MAX
    if UE8M0:  # round the scale up to a power of two on its bits: exponent + 1 unless mantissa is 0
        bits = s.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (exponent << 23).to(tl.float32, bitcast=True)
    y = round_to_e4m3(tl.clamp(x / s[:, None], -448.0, 448.0))  # saturate, as the reference does
    tl.store(y_ptr + rows[:, None] * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * (K // BLOCK_K) + pid_k, s, mask=rows < M)


def act_quant(x: Tensor, block_size: int = 128, scale_fmt: str | None = None,
              block_m: int = 32) -> tuple[Tensor, Tensor]:
    """Quantise activations to FP8 E4M3 with one scale per 1 x block_size tile (Triton).

    DeepSeek-V3 §3.3.2: online max-abs scaling, one scale per token per 128 channels.

    Args:
        x: (..., K) fp32/fp16/bf16, contiguous; K a multiple of block_size (a power of two).
        block_size: channels per tile (128 in V3).
        scale_fmt: None or "ue8m0" (power-of-two scales), as in `act_quant_ref`.
        block_m: rows per program (a power of two).
    Returns:
        y: (..., K) float8_e4m3fn and s: (..., K // block_size) float32, equal to `act_quant_ref`
        (bit for bit: see `round_to_e4m3`).
    Raises:
        ValueError: bad shape, dtype, layout, block size or scale_fmt.
        TritonUnavailableError: without Triton (use `act_quant_ref`).
    """
    require_triton("deepseek_edu.kernels.act_quant_ref")
    _check_args(x, block_size, scale_fmt)
    check_contiguous(x=x)
    check_device(x)
    for name, v in (("block_size", block_size), ("block_m", block_m)):
        if v <= 0 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two (Triton tiles are)")
    K = x.shape[-1]
    M = x.numel() // K
    y = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    s = x.new_empty(*x.shape[:-1], K // block_size, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m), K // block_size)
    act_quant_kernel[grid](x, y, s, M, K, BLOCK_M=block_m, BLOCK_K=block_size, UE8M0=scale_fmt == "ue8m0")
    return y, s
