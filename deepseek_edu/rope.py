"""Rotary position embedding (RoPE, Su et al. 2021) in DeepSeek's interleaved-pair layout, and YaRN.

RoPE rotates each pair of channels of a query or key by an angle proportional to the position:
pair i at position m turns by m * theta_i with theta_i = rope_theta^(-2i/R). A dot product of a
rotated query at m and a rotated key at n then depends on m - n only.

**Layout.** Which channels form a pair is a convention, and mixing conventions is a classic bug
(docs/pitfalls.md kind C). DeepSeek's `inference/model.py` pairs *adjacent* channels (x[2i], x[2i+1]) and
views them as one complex number; `transformers`' Llama-style `rotate_half` pairs channel i with
channel i + R/2. The two agree exactly after permuting the channels of the projection that
produced the vector (`interleaved_to_half` / `half_to_interleaved`).

**YaRN** (Peng et al. 2023; DeepSeek-V2 §2.1 / V3 §4.3) extends the context by a factor s: slow
frequencies (fewer than `beta_slow` turns over the original context) are divided by s,
fast ones (more than `beta_fast` turns) are kept, with a linear ramp between; the attention
softmax scale is then multiplied by mscale^2 (see `ModelConfig.softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ModelConfig


def _correction_dim(n_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """Index of the rotary pair whose wavelength fits `n_rotations` turns in `max_seq_len` tokens."""
    return dim * math.log(max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(cfg: ModelConfig) -> Tensor:
    """Rotary inverse frequencies theta_i, with YaRN interpolation when the context is extended.

    Returns:
        (R/2,) fp32, radians per token for each rotary pair, R = `cfg.rope_dim`.

    YaRN applies only when `cfg.max_seq_len > cfg.original_seq_len` and `rope_factor > 1`
    (DeepSeek-V3 `precompute_freqs_cis`).
    """
    dim, base = cfg.rope_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.max_seq_len > cfg.original_seq_len and cfg.rope_factor > 1:
        low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp  # 1 for fast pairs (kept), 0 for slow pairs (interpolated)
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs.float()


def precompute_freqs_cis(cfg: ModelConfig, seq_len: int | None = None) -> Tensor:
    """Unit complex numbers e^{i m theta_j} for every position m and rotary pair j.

    Args:
        cfg: model config (uses rope_dim, rope_theta and the YaRN fields).
        seq_len: number of positions; defaults to `cfg.max_seq_len`.
    Returns:
        (seq_len, R/2) complex64.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    inv_freq = yarn_inv_freq(cfg).double()
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (S, R/2) radians
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2j], x[2j+1]) of `x` by the angles in `freqs_cis`.

    Args:
        x: (B, S, H, R) queries or keys, any float dtype; R even.
        freqs_cis: (S, R/2) complex64, rows for the S positions of `x`.
    Returns:
        (B, S, H, R), same dtype as `x` (the rotation itself runs in fp32).
    Raises:
        ValueError: if R is odd, the shapes disagree, or `freqs_cis` is not complex.
    """
    if not freqs_cis.is_complex():  # e.g. cast to a real dtype: only cos would be left, no rotation
        raise ValueError(f"apply_rotary_emb: freqs_cis must be complex, got {freqs_cis.dtype}")
    if x.shape[-1] % 2 or freqs_cis.shape != (x.shape[1], x.shape[-1] // 2):
        raise ValueError(
            f"apply_rotary_emb: x {tuple(x.shape)} needs freqs_cis of shape "
            f"({x.shape[1]}, {x.shape[-1] // 2}), got {tuple(freqs_cis.shape)}"
        )
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, S, H, R/2) complex
    y = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(-2)  # (B, S, H, R)
    return y.to(x.dtype)


def rotate_half_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The half-split convention (`transformers` Llama/DeepseekV3): pairs (x[j], x[j + R/2]).

    Reference for tests and the notebook. cos, sin: (S, R) with the R/2 angles repeated twice.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[None, :, None, :] + torch.cat([-x2, x1], dim=-1) * sin[None, :, None, :]


def interleaved_to_half(x: Tensor, dim: int = -1) -> Tensor:
    """Permute channels [a0, b0, a1, b1, ...] -> [a0, a1, ..., b0, b1, ...] along `dim`.

    Applied to the output rows of a projection, it converts weights trained with the interleaved
    layout into weights for the half-split layout (the rotation then gives the same scores).
    """
    x = x.movedim(dim, -1)
    y = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    return y.movedim(-1, dim)


def half_to_interleaved(x: Tensor, dim: int = -1) -> Tensor:
    """Inverse of `interleaved_to_half`: [a0, a1, ..., b0, b1, ...] -> [a0, b0, a1, b1, ...]."""
    x = x.movedim(dim, -1)
    a, b = x.chunk(2, dim=-1)
    y = torch.stack([a, b], dim=-1).flatten(-2)
    return y.movedim(-1, dim)
