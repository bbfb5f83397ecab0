"""Absorbed MLA decoding over the latent cache, split over the sequence (flash-decoding).

DeepSeek-V2 §2.1 / V3 §2.1.1 with the up-projections absorbed (see `deepseek_edu.mla`): each of the
H heads scores its latent query q (C,) and rotary query q_pe (R,) against every cached latent kv_t (C,)
and shared rotary key pe_t (R,), and sums the latents with the softmax weights:

    o_h = sum_t softmax_t(scale * (q_h . kv_t + q_pe_h . pe_t)) kv_t        (B, S, H, C)

All H heads read the *same* (C + R)-wide cache row: it is multi-query attention with a 576-wide head
(V3), which is why one program takes a block of heads and loads each cache tile once for all of them.

**Flash-decoding.** One query token gives too few programs to fill a GPU (B x H/BLOCK_H), so the T
cached positions are cut into `num_splits` ranges, each program computes a *partial* softmax result
over its range -- the normalised output o_i and its log-sum-exp lse_i -- and a combine step merges
them exactly: lse = log sum_i exp(lse_i), o = sum_i exp(lse_i - lse) o_i (`combine_splits_ref`).

**Speculative verification.** S_q > 1 query tokens are the last S_q cache positions; query s sees
cache positions t <= T - S_q + s (causal within the few).

**Caches.** bf16 (or fp32) kv (B, T, C) and pe (B, T, R), any batch/position strides; or FlashMLA's FP8
cache, one uint8 row per token: C E4M3 values, C/128 FP32 scales, R BF16 rotary values -- 656 bytes
for V3 (512 + 16 + 128) against 1152 in bf16 (`quantize_mla_cache`).

**Bytes and FLOPs** per query token, batch row and layer: FLOPs 2H(C + R) for the scores + 2HC for
the sum = 4HC + 2HR; bytes (C + R) x 2 of bf16 cache per cached token (656 for FP8). With C = 512,
R = 64: H(4C + 2R) / (2(C + R)) = H x 2176/1152 -> about 242 FLOP per byte at H = 128 (compute-bound
on an H200, ridge ~206), 30 at H = 16 (memory-bound). `arithmetic_intensity` computes it.
"""


import torch
from torch import Tensor

from ._triton import check_device, interpreting, jit, require_triton, tl, triton

QUANT_BLOCK = 128  # latent channels per FP8 scale (FlashMLA: 4 scales for C = 512)


def fp8_cache_bytes_per_token(C: int = 512, R: int = 64) -> int:
    """Bytes of one token's FP8 cache row: C E4M3 + 4 bytes per 128 channels + 2R BF16 (656 for V3)."""
    return C + 4 * (C // QUANT_BLOCK) + 2 * R


FP8_CACHE_BYTES_PER_TOKEN = fp8_cache_bytes_per_token()  # 656


def arithmetic_intensity(n_heads: int, C: int = 512, R: int = 64, cache_bytes_per_token: int | None = None) -> float:
    """FLOPs per byte of cache read by absorbed MLA decoding (one query token): H(4C + 2R) / bytes."""
    nbytes = cache_bytes_per_token if cache_bytes_per_token is not None else 2 * (C + R)
    return n_heads * (4 * C + 2 * R) / nbytes


def quantize_mla_cache(kv: Tensor, pe: Tensor) -> Tensor:
    """Pack a latent cache into FlashMLA's FP8 layout: (B, T, C) + (B, T, R) -> (B, T, C + C/32 + 2R) uint8.

    Per token: C float8_e4m3fn (one scale per 128 channels: amax / 448), C/128 float32 scales, R bfloat16.
    Raises:
        ValueError: if C is not a multiple of 128 or the shapes disagree.
    """
    from .act_quant import act_quant_ref

    if kv.dim() != 3 or pe.dim() != 3 or kv.shape[:2] != pe.shape[:2]:
        raise ValueError(f"kv (B, T, C) and pe (B, T, R) must share B, T, got {tuple(kv.shape)}, {tuple(pe.shape)}")
    if kv.shape[-1] % QUANT_BLOCK:
        raise ValueError(f"C={kv.shape[-1]} must be a multiple of {QUANT_BLOCK} for the FP8 cache")
    y, s = act_quant_ref(kv, QUANT_BLOCK)  # (B, T, C) e4m3, (B, T, C/128) fp32
    parts = [y.view(torch.uint8), s.view(torch.uint8), pe.to(torch.bfloat16).contiguous().view(torch.uint8)]
    return torch.cat(parts, dim=-1)  # (B, T, 656) for V3


def split_mla_cache(cache: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views of a packed FP8 cache (no copy): kv (B,T,C) e4m3, scales (B,T,C/128) fp32, pe (B,T,R) bf16.

    Raises:
        ValueError: if the cache is not uint8 with a row of C + C/32 + 2R bytes.
    """
    if cache.dtype != torch.uint8 or cache.dim() != 3 or cache.stride(-1) != 1:
        raise ValueError(f"an FP8 MLA cache is (B, T, bytes) uint8 with unit last stride, got {cache.dtype} "
                         f"{tuple(cache.shape)}")
    n_scale = 4 * (C // QUANT_BLOCK)
    rest = cache.shape[-1] - C - n_scale
    if C % QUANT_BLOCK or rest <= 0 or rest % 2:
        raise ValueError(f"cache row of {cache.shape[-1]} bytes does not fit C={C} (+ C/32 scale bytes + 2R)")
    kv = cache[..., :C].view(torch.float8_e4m3fn)
    s = cache[..., C:C + n_scale].view(torch.float32)
    pe = cache[..., C + n_scale:].view(torch.bfloat16)
    return kv, s, pe


def dequantize_mla_cache(cache: Tensor, C: int, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Unpack an FP8 cache back to kv (B, T, C) and pe (B, T, R) in `dtype`."""
    kv, s, pe = split_mla_cache(cache, C)
    kv = (kv.float().unflatten(-1, (-1, QUANT_BLOCK)) * s[..., None]).flatten(-2)
    return kv.to(dtype), pe.to(dtype)


def combine_splits_ref(o_parts: Tensor, lse_parts: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial softmax results: o_parts (..., P, C) normalised per part, lse_parts (..., P).

    lse = log sum_i exp(lse_i) (computed from the max, so nothing overflows); o = sum_i exp(lse_i - lse) o_i.
    A part with no visible position has lse_i = -inf and weight 0.
    """
    lse = torch.logsumexp(lse_parts, dim=-1)  # (...,)
    w = torch.exp(lse_parts - lse[..., None])  # (..., P), sums to 1
    return (w[..., None] * o_parts).sum(-2), lse


def mla_decode_ref(q: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor, softmax_scale: float) -> Tensor:
    """Plain-PyTorch absorbed decoding (the einsums of `MLA._attend_absorbed` on the latent side).

    Args:
        q: (B, S, H, C) latent queries (q_nope with W_UK absorbed); q_pe: (B, S, H, R).
        kv: (B, T, C) and pe: (B, T, R), T >= S; the S queries are the last S positions.
        softmax_scale: multiplies the scores (1/sqrt(N + R) in MLA, never 1/sqrt(C)).
    Returns:
        (B, S, H, C) in q's dtype.
    """
    S, T = q.shape[1], kv.shape[1]
    kv, pe = kv.to(q.dtype), pe.to(q.dtype)
    scores = (torch.einsum("bshc,btc->bsht", q, kv) + torch.einsum("bshr,btr->bsht", q_pe, pe)) * softmax_scale
    visible = torch.arange(T, device=q.device)[None, :] <= torch.arange(T - S, T, device=q.device)[:, None]
    scores = scores.masked_fill(~visible[None, :, None, :], float("-inf"))  # (B, S, H, T)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)
    return torch.einsum("bsht,btc->bshc", probs, kv)


@jit
def mla_decode_split_kernel(
        q_ptr, q_pe_ptr, kv_ptr, kv_scale_ptr, pe_ptr, o_ptr, lse_ptr,
        S, H, T, C, R, split_len, softmax_scale,
        stride_kv_b, stride_kv_t, stride_s_b, stride_s_t, stride_pe_b, stride_pe_t,
        BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        NUM_SPLITS: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One program: heads [hb * BLOCK_H, +BLOCK_H) of query (b, s) over cache positions of one split.

    Writes the split's normalised partial output o (BLOCK_H, C) in fp32 and its log-sum-exp.
    UPCAST (interpreter only): feed tl.dot fp32 copies of the 16-bit operands (exact products, so the same
    sums), because the interpreter's tl.dot mishandles bf16.
    """
    pid_bsh, split = tl.program_id(0), tl.program_id(1)
    n_hb = tl.cdiv(H, BLOCK_H)
    bs, hb = pid_bsh // n_hb, pid_bsh % n_hb
    b, s = bs // S, bs % S
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    cs, rs = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    mask_h = heads < H
    q = tl.load(q_ptr + (bs * H + heads[:, None]) * C + cs[None, :],
                mask=mask_h[:, None] & (cs[None, :] < C), other=0.0)  # (BLOCK_H, BLOCK_C)
    q_pe = tl.load(q_pe_ptr + (bs * H + heads[:, None]) * R + rs[None, :],
                   mask=mask_h[:, None] & (rs[None, :] < R), other=0.0)  # (BLOCK_H, BLOCK_R)
    if UPCAST:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    last = T - S + s  # causal: this query sees t <= last
    start = split * split_len
    end = tl.minimum(start + split_len, last + 1)
    m_i = tl.full((BLOCK_H,), -1e30, dtype=tl.float32)  # running max (finite: no inf - inf)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)  # running sum of p * kv
    for t0 in range(start, end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask_t = ts < end
        kv_mask = mask_t[:, None] & (cs[None, :] < C)
        kv = tl.load(kv_ptr + b * stride_kv_b + ts[:, None] * stride_kv_t + cs[None, :], mask=kv_mask, other=0.0)
        if FP8:  # dequantise: one FP32 scale per 128 latent channels
            sc = tl.load(kv_scale_ptr + b * stride_s_b + ts[:, None] * stride_s_t + cs[None, :] // 128,
                         mask=kv_mask, other=0.0)
            kv = kv.to(tl.float32) * sc
        kv = kv.to(q_ptr.dtype.element_ty)  # the dots' input dtype: q's
        pe = tl.load(pe_ptr + b * stride_pe_b + ts[:, None] * stride_pe_t + rs[None, :],
                     mask=mask_t[:, None] & (rs[None, :] < R), other=0.0).to(q_ptr.dtype.element_ty)
        if UPCAST:
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
        scores = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_T)
        scores += tl.dot(q_pe, tl.trans(pe), input_precision=DOT_PRECISION)
        scores = tl.where(mask_t[None, :], scores * softmax_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)  # rescale what was summed under the old max
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q_ptr.dtype.element_ty).to(kv.dtype), kv, input_precision=DOT_PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # no visible position in this split
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    row = (bs * H + heads) * NUM_SPLITS + split  # (BLOCK_H,) into (B*S*H, NUM_SPLITS)
    tl.store(o_ptr + row[:, None] * C + cs[None, :], o, mask=mask_h[:, None] & (cs[None, :] < C))
    tl.store(lse_ptr + row, lse, mask=mask_h)


@jit
def mla_decode_combine_kernel(o_parts_ptr, lse_ptr, out_ptr, C, NUM_SPLITS: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: one (b, s, h) row; merges its NUM_SPLITS partial results by log-sum-exp."""
    row = tl.program_id(0)
    ps, cs = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + ps, mask=ps < NUM_SPLITS, other=float("-inf"))  # (BLOCK_P,)
    m = tl.max(lse, axis=0)  # finite: split 0 always sees position 0
    w = tl.exp(lse - m)  # (BLOCK_P,), 0 for empty splits
    o = tl.load(o_parts_ptr + (row * NUM_SPLITS + ps[:, None]) * C + cs[None, :],
                mask=(ps[:, None] < NUM_SPLITS) & (cs[None, :] < C), other=0.0)  # (BLOCK_P, BLOCK_C)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * C + cs, out.to(out_ptr.dtype.element_ty), mask=cs < C)


def _check_inputs(q: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor) -> None:
    if q.dim() != 4 or q_pe.dim() != 4 or q.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"q (B, S, H, C) and q_pe (B, S, H, R) must share B, S, H, got {tuple(q.shape)}, "
                         f"{tuple(q_pe.shape)}")
    B, S, _, C = q.shape
    if kv.dim() != 3 or pe.dim() != 3 or kv.shape[0] != B or pe.shape[:2] != kv.shape[:2] or kv.shape[2] != C \
            or pe.shape[2] != q_pe.shape[3]:
        raise ValueError(f"kv must be (B={B}, T, C={C}) and pe (B, T, R={q_pe.shape[3]}), "
                         f"got {tuple(kv.shape)}, {tuple(pe.shape)}")
    if kv.shape[1] < S:
        raise ValueError(f"T={kv.shape[1]} cached positions < S={S} queries (the queries are the last S)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or q_pe.dtype != q.dtype:
        raise ValueError(f"q and q_pe must share a float dtype (fp32/fp16/bf16), got {q.dtype}, {q_pe.dtype}")


def mla_decode(q: Tensor, q_pe: Tensor, kv: Tensor | None, pe: Tensor | None, softmax_scale: float,
               fp8_cache: Tensor | None = None, num_splits: int | None = None,
               block_h: int | None = None, block_t: int = 32) -> Tensor:
    """Absorbed MLA decoding with split-KV and a log-sum-exp combine (Triton flash-decoding).

    Args:
        q: (B, S, H, C) latent queries, contiguous; q_pe: (B, S, H, R), contiguous; fp32/fp16/bf16.
        kv: (B, T, C) and pe: (B, T, R) cache (unit last stride; batch/position strides free, e.g.
            `KVCache` views), or None when `fp8_cache` is given.
        softmax_scale: score multiplier.
        fp8_cache: (B, T, C + C/32 + 2R) uint8 from `quantize_mla_cache` (FlashMLA's layout), or None.
        num_splits: ranges of T computed in parallel (default: enough programs to fill the device).
        block_h, block_t: heads and positions per tile (powers of two, >= 16).
    Returns:
        (B, S, H, C) in q's dtype, equal to `mla_decode_ref` (on the dequantised cache for FP8).
    Raises:
        ValueError: on shapes, dtypes, strides or tile sizes.
        TritonUnavailableError: without Triton (use `mla_decode_ref`, or MLA impl="absorbed").
    """
    require_triton("deepseek_edu.kernels.mla_decode_ref (or MLA impl='absorbed')")
    B, S, H, C = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    if fp8_cache is not None:
        if kv is not None or pe is not None:
            raise ValueError("pass either kv and pe or fp8_cache, not both")
        kv, kv_scale, pe = split_mla_cache(fp8_cache, C)
    else:
        if kv is None or pe is None:
            raise ValueError("kv and pe are required without fp8_cache")
        kv_scale = None
    _check_inputs(q, q_pe, kv, pe)
    if not (q.is_contiguous() and q_pe.is_contiguous()):
        raise ValueError("q and q_pe must be contiguous")
    if kv.stride(-1) != 1 or pe.stride(-1) != 1:
        raise ValueError(f"kv and pe need unit stride in their last dim, got {kv.stride()}, {pe.stride()}")
    if fp8_cache is None and (kv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or pe.dtype != kv.dtype):
        raise ValueError(f"kv and pe must share a float dtype, got {kv.dtype}, {pe.dtype}")
    check_device(q, q_pe, kv, pe)
    T, R = kv.shape[1], pe.shape[2]
    block_h = block_h or min(32, max(16, triton.next_power_of_2(H)))
    for name, v in (("block_h", block_h), ("block_t", block_t)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot's smallest tile)")
    n_hb = triton.cdiv(H, block_h)
    if num_splits is None:  # aim at ~2 programs per SM (132 on an H200); one split per 64 positions at most
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = max(1, min(triton.cdiv(2 * sms, B * S * n_hb), triton.cdiv(T, 64)))
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    split_len = triton.cdiv(triton.cdiv(T, num_splits), block_t) * block_t  # whole tiles per split
    num_splits = triton.cdiv(T, split_len)  # no split left empty by the rounding
    o_parts = q.new_empty(B, S, H, num_splits, C, dtype=torch.float32)
    lse = q.new_empty(B, S, H, num_splits, dtype=torch.float32)
    fp8 = kv_scale is not None
    kv_scale = kv_scale if fp8 else kv  # unused pointer when not FP8
    precision = "ieee" if q.dtype == torch.float32 or interpreting() else "tf32"  # fp32 in: no TF32
    block_c, block_r = max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(R))
    extra = {} if interpreting() else {"num_warps": 8 if block_h * block_c >= 16384 else 4}
    mla_decode_split_kernel[(B * S * n_hb, num_splits)](
        q, q_pe, kv, kv_scale, pe, o_parts, lse, S, H, T, C, R, split_len, softmax_scale,
        kv.stride(0), kv.stride(1), kv_scale.stride(0), kv_scale.stride(1), pe.stride(0), pe.stride(1),
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_R=block_r, NUM_SPLITS=num_splits, FP8=fp8,
        DOT_PRECISION=precision, UPCAST=interpreting() and q.dtype != torch.float32, **extra)
    out = torch.empty_like(q)
    mla_decode_combine_kernel[(B * S * H,)](o_parts, lse, out, C, NUM_SPLITS=num_splits,
                                            BLOCK_P=triton.next_power_of_2(num_splits), BLOCK_C=block_c)
    return out


def decode_flops_bytes(B: int, S: int, H: int, T: int, C: int = 512, R: int = 64,
                       cache_bytes_per_token: int | None = None) -> tuple[float, float]:
    """FLOPs and cache bytes of one `mla_decode` call (counting every query against all T positions)."""
    nbytes = cache_bytes_per_token if cache_bytes_per_token is not None else 2 * (C + R)
    return float(B * S * H * T * (4 * C + 2 * R)), float(B * T * nbytes)


