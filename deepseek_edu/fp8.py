"""FP8 training the DeepSeek-V3 way: formats, fine-grained scaling, accumulation precision (V3 §3.3, App. B).

**The formats.** An FP8 number has 8 bits. E4M3 (4 exponent bits, 3 mantissa bits, `torch.float8_e4m3fn`)
reaches +-448 with steps of 1/8 near 1 and of 32 near 448; E5M2 reaches +-57344 with one bit less of
mantissa. V3 uses E4M3 for *every* GEMM input, forward and backward (earlier work used E5M2 for
gradients): fine-grained scaling buys back the range, so the extra mantissa bit is worth more.
E4M3 ("fn": finite, NaN) has no infinity: its one NaN pattern per sign sits where infinity would be.
What a cast of an out-of-range value gives is not the format's business: this torch's CPU cast
saturates to +-448, other casts (hardware conversions without "satfinite", older kernels) give NaN.
So every quantiser here clamps to +-`FP8_E4M3_MAX` before casting and never relies on the cast.

**Fine-grained scaling.** One scale for a whole tensor lets one outlier channel set the step for every
value: small activations fall into E4M3's subnormals or to zero. V3 scales activations per 1 x 128
*tile* (one token, 128 channels) and weights per 128 x 128 *block*; the scale is amax / 448 of the
tile, computed online from the current values (no history, unlike delayed scaling). An all-zero tile
gets scale 1 (not 0/0) and quantises to zeros. The scale that is stored is the scale that was used:
every quantiser returns the scales it divided by, and dequantising multiplies by exactly those.
V3.1 (`scale_fmt="ue8m0"`) rounds each scale *up* to a power of two, so that it fits an 8-bit
exponent-only format and dividing by it is exact; rounding up keeps |x / s| <= 448.

**Shapes not divisible by the block.** One rule everywhere: the last tile or block along a dimension
may be partial; it is scaled by the amax of the elements it holds (as if padded with zeros). Scales
have ceil(K / block) entries along that dimension.

**Accumulation.** V3 measured that the H800's FP8 tensor-core GEMM keeps only about 14 bits of its
running sum: at K = 4096 the maximum relative error reached nearly 2%. Its fix: every N_C = 128
elements of K, the partial sum is *promoted* to an FP32 accumulator on the CUDA cores (where the
scales are applied too). `limited_precision_matmul` emulates both, see its docstring for the model.

**Training.** `FP8Linear` runs its three GEMMs with FP8 inputs (V3 Fig. 6): forward x (1 x 128 tiles)
by W (128 x 128 blocks); input gradient dy (1 x 128 tiles along the output features) by W (the
same blocks); weight gradient dy^T by x, both quantised in 128 x 1 tiles along the token dimension
(the contraction dimension of that GEMM). Master weights, gradients and optimizer state stay FP32.
On this CPU, FP8 is emulated exactly: quantise, dequantise, FP32 matmul. `to_fp8(model)` swaps the
linear layers V3 runs in FP8 and leaves the embedding, the output head, the gate, the norms and
attention's core (softmax and the attention products) in higher precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_E4M3 = torch.float8_e4m3fn
FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
FP8_E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344.0
FP8_BLOCK = 128  # V3's tile and block edge
SCALE_FMTS = (None, "ue8m0")
GRANULARITIES = ("blockwise", "tensorwise")


def fp8_facts(dtype: torch.dtype = FP8_E4M3) -> dict[str, float]:
    """Range and spacing of an FP8 format, read from `torch.finfo` (max, eps = spacing at 1, tiny, bits)."""
    f = torch.finfo(dtype)
    vals = representable_values(dtype)
    return {"max": f.max, "eps": f.eps, "smallest_normal": f.smallest_normal,
            "smallest_subnormal": float(vals[1]), "spacing_at_max": float(vals[-1] - vals[-2])}


def representable_values(dtype: torch.dtype = FP8_E4M3) -> Tensor:
    """Every finite non-negative value of an FP8 format, sorted (all 256 bit patterns decoded)."""
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return torch.unique(v[torch.isfinite(v) & (v >= 0)])


def _check(x: Tensor, block_size: int, scale_fmt: str | None, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"x must be a floating tensor of bf16/fp16/fp32, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < min_dim:
        raise ValueError(f"x must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be one of {SCALE_FMTS}")


def compute_scale(amax: Tensor, scale_fmt: str | None = None) -> Tensor:
    """Scale(s) from max-abs value(s): amax / 448; an all-zero group gets 1; `"ue8m0"` rounds up to 2^k.

    amax / 448 is floored at fp32's smallest normal number: for a group whose amax is below about
    5e-36 (subnormal values, e.g. tiny gradients) the division would round to a scale of 0, and the
    group's zeros would become 0 / 0 = NaN.

    Args:
        amax: any shape, >= 0.
        scale_fmt: None (plain fp32 scale) or "ue8m0" (power of two, rounded up: |x / s| stays <= 448).
    Returns:
        fp32 scales, amax's shape, finite and > 0 wherever amax is finite.
    """
    amax = amax.float()
    tiny = torch.finfo(torch.float32).tiny  # a scale of amax / 448 would underflow to 0 below ~5e-36
    s = torch.where(amax > 0, (amax / FP8_E4M3_MAX).clamp(min=tiny), torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


def _cast(x: Tensor, s: Tensor) -> Tensor:
    """x / s clamped to +-448, then cast to E4M3 (clamp first: never rely on the cast's overflow rule)."""
    return (x.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_E4M3)


def quantize_tensorwise(x: Tensor, scale_fmt: str | None = None) -> tuple[Tensor, Tensor]:
    """One scale for the whole tensor. x (any shape) -> y (x's shape) E4M3, s () fp32; x ~ y.float() * s."""
    _check(x, 1, scale_fmt)
    amax = x.detach().abs().amax() if x.numel() else x.new_zeros(())  # an empty tensor: scale 1
    s = compute_scale(amax, scale_fmt)
    return _cast(x, s), s


def quantize_rowwise(x: Tensor, scale_fmt: str | None = None) -> tuple[Tensor, Tensor]:
    """One scale per row (last dim). x (..., K) -> y (..., K) E4M3, s (..., 1) fp32; x ~ y.float() * s."""
    _check(x, 1, scale_fmt)
    s = compute_scale(x.detach().abs().amax(dim=-1, keepdim=True), scale_fmt)
    return _cast(x, s), s


def _pad_last(x: Tensor, block_size: int) -> Tensor:
    pad = -x.shape[-1] % block_size
    return F.pad(x, (0, pad)) if pad else x


def act_quant_ref(x: Tensor, block_size: int = FP8_BLOCK, scale_fmt: str | None = None) -> tuple[Tensor, Tensor]:
    """Quantise activations to E4M3 with one scale per 1 x block_size tile along the last dimension.

    DeepSeek-V3 §3.3.1: online max-abs scaling, one scale per token per 128 channels.

    Args:
        x: (..., K) bf16/fp16/fp32. K need not be a multiple of block_size: the last tile may be partial.
        block_size: tile width (128 in V3).
        scale_fmt: None or "ue8m0" (power-of-two scales, V3.1).
    Returns:
        y: (..., K) float8_e4m3fn, and s: (..., ceil(K / block_size)) fp32, with x ~ y.float() * s per tile.
    Raises:
        ValueError: for a non-floating or FP8 x, a 0-d x, a bad block_size or scale_fmt.
    """
    _check(x, block_size, scale_fmt)
    K = x.shape[-1]
    xp = _pad_last(x.float(), block_size)
    tiles = xp.reshape(*x.shape[:-1], xp.shape[-1] // block_size, block_size)  # (..., T, b)
    s = compute_scale(tiles.detach().abs().amax(dim=-1), scale_fmt)  # (..., T)
    y = _cast(tiles, s.unsqueeze(-1)).reshape(xp.shape)[..., :K]
    return y, s


def act_dequant_ref(y: Tensor, s: Tensor, block_size: int = FP8_BLOCK) -> Tensor:
    """Inverse of `act_quant_ref`: y (..., K) E4M3, s (..., ceil(K/b)) -> (..., K) fp32 = y * s per tile."""
    if s.shape[-1] != math.ceil(y.shape[-1] / block_size) or s.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"scales {tuple(s.shape)} do not fit y {tuple(y.shape)} with block_size={block_size}")
    return y.float() * s.repeat_interleave(block_size, dim=-1)[..., : y.shape[-1]]


def weight_quant_ref(w: Tensor, block_size: int = FP8_BLOCK, scale_fmt: str | None = None) -> tuple[Tensor, Tensor]:
    """Quantise a weight matrix to E4M3 with one scale per block_size x block_size block (V3 §3.3.1).

    Args:
        w: (M, N) bf16/fp16/fp32; partial blocks on the bottom and right edges are allowed.
    Returns:
        y: (M, N) float8_e4m3fn, s: (ceil(M/b), ceil(N/b)) fp32, with w ~ `weight_dequant_ref(y, s)`.
    Raises:
        ValueError: if w is not 2-D, or as `act_quant_ref`.
    """
    _check(w, block_size, scale_fmt, min_dim=2)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (M, N), got shape {tuple(w.shape)}")
    M, N = w.shape
    b = block_size
    wp = F.pad(w.float(), (0, -N % b, 0, -M % b))
    blocks = wp.reshape(wp.shape[0] // b, b, wp.shape[1] // b, b)  # (Mb, b, Nb, b)
    s = compute_scale(blocks.detach().abs().amax(dim=(1, 3)), scale_fmt)  # (Mb, Nb)
    y = _cast(blocks, s[:, None, :, None]).reshape(wp.shape)[:M, :N]
    return y, s


def weight_dequant_ref(y: Tensor, s: Tensor, block_size: int = FP8_BLOCK) -> Tensor:
    """Inverse of `weight_quant_ref`: y (M, N) E4M3, s (ceil(M/b), ceil(N/b)) fp32 -> (M, N) fp32.

    Raises:
        ValueError: if s's shape does not fit y and block_size.
    """
    M, N = y.shape
    if tuple(s.shape) != (math.ceil(M / block_size), math.ceil(N / block_size)):
        raise ValueError(f"scales {tuple(s.shape)} do not fit y {(M, N)} with block_size={block_size}")
    full = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:M, :N]
    return y.float() * full


def round_mantissa(x: Tensor, bits: int) -> Tensor:
    """Round fp32 values toward zero to `bits` explicit mantissa bits (drop the low 23 - bits bits)."""
    if x.dtype != torch.float32 or not 0 <= bits <= 23:
        raise ValueError(f"round_mantissa needs fp32 and 0 <= bits <= 23, got {x.dtype}, bits={bits}")
    drop = 23 - bits
    return (x.view(torch.int32) & ~((1 << drop) - 1)).view(torch.float32)


def limited_precision_matmul(a: Tensor, b: Tensor, mantissa_bits: int = 14, n_c: int | None = None) -> Tensor:
    """An emulated tensor-core GEMM whose running sum keeps `mantissa_bits` bits, with optional promotion.

    The model (our emulation, not NVIDIA's documented design): the K products a[:, k] b[k, :] are
    added to the running sum one k at a time; after every addition the sum is truncated (rounded
    toward zero, as bits shifted out while aligning exponents are dropped) to `mantissa_bits`
    explicit mantissa bits. With `n_c`, every n_c values of k the running sum is *promoted*: added
    to an FP32 accumulator and restarted from zero (V3 §3.3.2, N_C = 128).

    Args:
        a: (M, K) fp32 (typically FP8 values already dequantised), b: (K, N) fp32.
        mantissa_bits: bits the limited accumulator keeps (14 ~ V3's H800 measurement).
        n_c: promotion interval in elements of K, or None for no promotion.
    Returns:
        (M, N) fp32.
    Raises:
        ValueError: for mismatched shapes or a non-positive n_c.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"need a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    if n_c is not None and n_c < 1:
        raise ValueError(f"n_c must be positive or None, got {n_c}")
    a, b = a.float(), b.float()
    acc = a.new_zeros(a.shape[0], b.shape[1])  # the limited-precision running sum (tensor core)
    out = torch.zeros_like(acc)  # the FP32 accumulator (CUDA cores)
    for k in range(a.shape[1]):
        acc = round_mantissa(acc + a[:, k, None] * b[None, k, :], mantissa_bits)
        if n_c is not None and (k + 1) % n_c == 0:
            out, acc = out + acc, torch.zeros_like(acc)  # promotion
    return out + acc


def max_relative_error(c: Tensor, ref: Tensor) -> float:
    """max |c - ref| / max |ref|: the error relative to the output's scale (near-zero outputs excluded)."""
    return float((c.double() - ref.double()).abs().max() / ref.double().abs().max())


# ---------------------------------------------------------------------------------------------- FP8Linear
FP8_IMPLS = ("auto", "emulate", "scaled_mm")


def quantize_for_gemm(x: Tensor, granularity: str, tile: str, block_size: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """One GEMM input, (R, K) with K the contracted dim: `tile` "row" = 1 x b tiles along K (scales (R, K/b)),
    "block" = b x b blocks (scales (R/b, K/b)); "tensorwise" granularity: one scale () whatever `tile`."""
    if granularity == "tensorwise":
        return quantize_tensorwise(x)
    return act_quant_ref(x, block_size) if tile == "row" else weight_quant_ref(x, block_size)


def _dequant(q: Tensor, s: Tensor, tile: str, block_size: int) -> Tensor:
    if s.dim() == 0:
        return q.float() * s
    return act_dequant_ref(q, s, block_size) if tile == "row" else weight_dequant_ref(q, s, block_size)


def fake_quant(x: Tensor, granularity: str, tile: str, block_size: int = FP8_BLOCK) -> Tensor:
    """Quantise then dequantise, fp32 out (tiles as `quantize_for_gemm`; "col" = b x 1 tiles along dim 0)."""
    if tile == "col":
        return fake_quant(x.t(), granularity, "row", block_size).t()
    return _dequant(*quantize_for_gemm(x, granularity, tile, block_size), tile, block_size)


_SCALED_MM_LAYOUT: dict[tuple, int | None] = {}  # (b_tile, tensorwise) -> scale layout that agreed, or None


def _scaled_mm_nt(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, layout: int = 0) -> Tensor:
    """a @ b^T on the tensor cores: aq (R, K) E4M3 with scales (R, K/128) or (); bq (C, K) with scales
    (C/128, K/128), (C, K/128) or (). torch._scaled_mm takes b column-major as (K, C), its scales along
    (K, C); `layout` picks the memory layout of the scale tensors (0: row-major, 1: outer-dim-major)."""
    if sa.dim():
        sa = sa.t().contiguous().t() if layout else sa.contiguous()
        sb = sb.t() if layout else sb.t().contiguous()
    return torch._scaled_mm(aq.contiguous(), bq.contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=torch.bfloat16).float()


def _use_scaled_mm(impl: str, aq: Tensor, bq: Tensor, b_tile: str, tensorwise: bool) -> int | None:
    """The scale layout for torch._scaled_mm on this GEMM, or None to emulate: CUDA SM 9.0+, shapes of whole
    128-tiles, and a first probe on random data that agreed with the emulation (once per kind of GEMM)."""
    if impl == "emulate":
        return None
    if (aq.device.type != "cuda" or not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(aq.device)
            < (9, 0) or any(d % FP8_BLOCK for d in (*aq.shape, *bq.shape))):
        return None if impl == "auto" else _raise_no_scaled_mm()
    key = (b_tile, tensorwise)
    if key not in _SCALED_MM_LAYOUT:
        _SCALED_MM_LAYOUT[key] = None
        g = "tensorwise" if tensorwise else "blockwise"
        gen = torch.Generator(device=aq.device).manual_seed(0)
        pa = quantize_for_gemm(torch.randn(512, 384, device=aq.device, generator=gen), g, "row")
        pb = quantize_for_gemm(torch.randn(256, 384, device=aq.device, generator=gen), g, b_tile)  # non-square scale grids
        ref = _dequant(*pa, "row", FP8_BLOCK) @ _dequant(*pb, b_tile, FP8_BLOCK).t()
        for layout in (0, 1):
            try:
                out = _scaled_mm_nt(*pa, *pb, layout)
            except (RuntimeError, TypeError, ValueError):
                continue
            if ((out - ref).norm() / ref.norm()) < 1e-2:
                _SCALED_MM_LAYOUT[key] = layout
                break
    if _SCALED_MM_LAYOUT[key] is None and impl == "scaled_mm":
        _raise_no_scaled_mm()
    return _SCALED_MM_LAYOUT[key]


def _raise_no_scaled_mm() -> None:
    raise ValueError("impl='scaled_mm' needs CUDA SM 9.0+, torch._scaled_mm with blockwise scales, and dims "
                     "that are multiples of 128; use impl='auto' or 'emulate'")


def _gemm_nt(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], b_tile: str, block_size: int, impl: str) -> Tensor:
    """A @ B^T from quantised inputs: a (R, K) in 1 x b tiles along K, b (C, K) in `b_tile`s -> (R, C) fp32."""
    layout = _use_scaled_mm(impl, a[0], b[0], b_tile, a[1].dim() == 0) if block_size == FP8_BLOCK else None
    if layout is not None:
        return _scaled_mm_nt(*a, *b, layout)
    return _dequant(*a, "row", block_size) @ _dequant(*b, b_tile, block_size).t()  # exact emulation


class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T with all three GEMMs on FP8-quantised inputs (each written A @ B^T, contracting dim last)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, granularity: str, block_size: int, impl: str) -> Tensor:
        g, b = granularity, block_size
        wq = quantize_for_gemm(w, g, "block", b)  # (M, K) in 128 x 128 blocks
        ctx.save_for_backward(x, *wq)  # x for the wgrad's own (128 x 1) tiles; W's blocks serve the dgrad
        ctx.granularity, ctx.block_size, ctx.impl = g, b, impl
        return _gemm_nt(quantize_for_gemm(x, g, "row", b), wq, "block", b, impl)  # (T, M) fprop

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, wq, ws = ctx.saved_tensors
        g, b, impl = ctx.granularity, ctx.block_size, ctx.impl
        w_t = (wq.t(), ws if ws.dim() == 0 else ws.t())  # W^T (K, M): its blocks are W's blocks transposed
        dx = _gemm_nt(quantize_for_gemm(dy, g, "row", b), w_t, "block", b, impl)  # (T, K) dgrad, dy 1 x 128 along M
        # wgrad (M, K) = dy^T x, contracting over tokens: both quantised in 128 x 1 tiles along T
        dw = _gemm_nt(quantize_for_gemm(dy.t(), g, "row", b), quantize_for_gemm(x.t(), g, "row", b), "row", b, impl)
        return dx, dw, None, None, None


class FP8Linear(nn.Linear):
    """An `nn.Linear` whose GEMMs take FP8 inputs (DeepSeek-V3 Fig. 6); weights stay FP32 masters.

    Shapes: x (..., in_features) -> (..., out_features), fp32 out. Same parameters (and state-dict
    keys) as nn.Linear. Attribute `granularity`: "blockwise" (V3: 1 x 128 tiles, 128 x 128 blocks)
    or "tensorwise" (one scale per tensor per GEMM input, the baseline V3 improves on).
    Attribute `impl` (`FP8_IMPLS`): "emulate" (quantise, dequantise, FP32 matmul: exact, any device),
    "scaled_mm" (torch._scaled_mm on an SM 9.0+ GPU, bf16 out; ValueError where unavailable) or "auto"
    (default: scaled_mm where it is available and agreed with the emulation on a first probe, else
    emulate). The bias, if any, is added in FP32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, granularity: str = "blockwise",
                 block_size: int = FP8_BLOCK, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
        self.granularity, self.block_size, self.impl = granularity, block_size, "auto"

    @classmethod
    def from_linear(cls, lin: nn.Linear, granularity: str = "blockwise", block_size: int = FP8_BLOCK) -> FP8Linear:
        """An FP8Linear that *shares* lin's parameters (no copy: optimizers and ties stay valid)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
        new.granularity, new.block_size, new.impl = granularity, block_size, "auto"
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.impl not in FP8_IMPLS:
            raise ValueError(f"impl={self.impl!r} must be one of {FP8_IMPLS}")
        lead = x.shape[:-1]
        y = _FP8LinearFn.apply(x.reshape(-1, self.in_features).float(), self.weight.float(),
                               self.granularity, self.block_size, self.impl)  # (T, M)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}, block_size={self.block_size}, impl={self.impl}"


KEEP_HIGH_PRECISION = ("head",)  # module names (last part) that stay in high precision besides the non-Linears


def to_fp8(model: nn.Module, granularity: str = "blockwise", block_size: int = FP8_BLOCK,
           keep: tuple[str, ...] = KEEP_HIGH_PRECISION) -> nn.Module:
    """Swap, in place, every `nn.Linear` V3 runs in FP8 for an `FP8Linear` sharing its parameters.

    Kept in high precision: modules whose name is in `keep` (the output head) and everything that is
    not an nn.Linear (embedding, norms, the gate's scoring, attention's softmax and products). MoE
    layers are set to `dispatch_impl = "loop"` so that each expert's FP8Linear runs (the grouped path
    stacks the raw weights). State-dict keys are unchanged. Returns the model.
    Raises:
        ValueError: for an unknown granularity.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
    for module in list(model.modules()):
        if hasattr(module, "dispatch_impl"):
            module.dispatch_impl = "loop"
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name not in keep:
                setattr(module, name, FP8Linear.from_linear(child, granularity, block_size))
    return model
