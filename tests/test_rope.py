"""Tests of deepseek_edu.rope: interleaved RoPE, the half-split layout bridge, and YaRN.

Checks:
- the interleaved layout, hand-computed for a 4-dim vector at positions 1 and 2 (pair (x0, x1)
  turns by theta_0 * m, pair (x2, x3) by theta_1 * m);
- the relative-position property: q_m . k_n depends only on m - n;
- layout at boundaries (pitfalls kind C): `interleaved_to_half` / `half_to_interleaved` round trip, and
  after the permutation `rotate_half_ref` and `transformers`' Llama `apply_rotary_pos_emb` give the
  same rotated vectors and the same scores as the interleaved rotation, also when the permutation
  is applied to the rows of a projection's weight (export to the half-split layout);
- YaRN: inv_freq unchanged when the context is not extended; fast pairs kept and slow pairs divided
  by the factor, every pair checked against a hand computation with DeepSeek-V3's formula; equal
  to `transformers`' `_compute_yarn_parameters` (truncate=True) and its attention factor squared
  equals the mscale^2 of `ModelConfig.softmax_scale` (pitfalls kind D);
- shape errors raise ValueError.

Differences with `transformers` found and pinned here: (1) `transformers` applies YaRN whenever
rope_type is "yarn"; this module (like DeepSeek-V3's `precompute_freqs_cis`) only when
max_seq_len > original_seq_len. (2) With `truncate=False` `transformers` does not floor/ceil the
correction range, DeepSeek does; the two then differ on the ramp pairs. (3) `transformers` puts the
YaRN temperature on cos/sin (both q and k, so squared in the score); DeepSeek multiplies the softmax
scale by mscale^2 -- the same scores.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_edu.config import ModelConfig
from deepseek_edu.rope import (
    apply_rotary_emb,
    half_to_interleaved,
    interleaved_to_half,
    precompute_freqs_cis,
    rotate_half_ref,
    yarn_inv_freq,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 rotations of O(1) vectors over <= 64 positions


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _close(a, b, tol=FP32_TOL, what=""):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} max diff {_max_diff(a, b)}\n{m}")


def _cfg(rope_dim=8, **kw):
    """An mha config whose head (= rotary) width is rope_dim."""
    return ModelConfig(dim=2 * rope_dim, n_heads=2, **kw)


def _cos_sin(inv_freq, seq_len):
    """Half-split convention tables: (S, R) with the R/2 angles repeated twice (Llama)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq.double())
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().float(), emb.sin().float()


# --- the interleaved rotation ---------------------------------------------------------------------

def test_interleaved_hand_computed_4dim():
    cfg = _cfg(rope_dim=4, rope_theta=10000.0)
    freqs = precompute_freqs_cis(cfg, seq_len=3)
    assert freqs.shape == (3, 2) and freqs.dtype == torch.complex64
    theta = [1.0, 10000.0 ** (-2 / 4)]  # theta_i = base^(-2i/R): 1 and 0.01
    x0, x1, x2, x3 = 0.3, -1.2, 0.7, 2.0
    x = torch.tensor([x0, x1, x2, x3]).expand(1, 3, 1, 4)  # same vector at positions 0, 1, 2
    y = apply_rotary_emb(x, freqs)
    for m in (0, 1, 2):
        a, b = theta[0] * m, theta[1] * m
        expected = torch.tensor([
            x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a),
            x2 * math.cos(b) - x3 * math.sin(b), x2 * math.sin(b) + x3 * math.cos(b),
        ])
        _close(y[0, m, 0], expected, dict(atol=1e-6, rtol=1e-6), f"position {m}:")


def test_rotation_keeps_norm_dtype_and_shape():
    cfg = _cfg(rope_dim=8)
    freqs = precompute_freqs_cis(cfg, seq_len=5)
    x = torch.randn(2, 5, 3, 8)
    y = apply_rotary_emb(x, freqs)
    assert y.shape == x.shape and y.dtype == x.dtype
    _close(y.norm(dim=-1), x.norm(dim=-1), what="norm")
    yb = apply_rotary_emb(x.bfloat16(), freqs)
    assert yb.dtype == torch.bfloat16
    _close(yb.float(), y, dict(atol=2e-2, rtol=2e-2), "bf16 vs fp32")  # bf16 input rounding


def test_relative_position_property():
    torch.manual_seed(0)
    cfg = _cfg(rope_dim=16)
    S = 24
    freqs = precompute_freqs_cis(cfg, seq_len=S)
    q, k = torch.randn(16), torch.randn(16)
    qr = apply_rotary_emb(q.expand(1, S, 1, 16), freqs)[0, :, 0]  # (S, R): q at every position
    kr = apply_rotary_emb(k.expand(1, S, 1, 16), freqs)[0, :, 0]
    scores = qr @ kr.T  # (S, S): q_m . k_n
    for delta in (-5, 0, 3, 11):
        diag = torch.diagonal(scores, offset=-delta)  # entries with m - n = delta
        _close(diag, diag[:1].expand_as(diag), what=f"m - n = {delta}:")
    # and it does depend on the distance
    assert (scores[5, 0] - scores[5, 4]).abs() > 1e-3


# --- layout at boundaries (pitfalls kind C) ------------------------------------------------------------

def test_permutation_round_trip_and_order():
    x = torch.arange(8.0)  # [a0, b0, a1, b1, a2, b2, a3, b3]
    assert interleaved_to_half(x).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert half_to_interleaved(interleaved_to_half(x)).tolist() == x.tolist()
    w = torch.randn(3, 8, 5)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, dim=1), dim=1), w)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, dim=1), dim=1), w)


def test_rotate_half_after_permutation_gives_same_vectors_and_scores():
    torch.manual_seed(1)
    cfg = _cfg(rope_dim=8)
    S = 10
    freqs = precompute_freqs_cis(cfg, seq_len=S)
    cos, sin = _cos_sin(yarn_inv_freq(cfg), S)
    q, k = torch.randn(2, S, 3, 8), torch.randn(2, S, 3, 8)
    q_int, k_int = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
    q_half = rotate_half_ref(interleaved_to_half(q), cos, sin)
    k_half = rotate_half_ref(interleaved_to_half(k), cos, sin)
    _close(q_half, interleaved_to_half(q_int), what="rotated vectors")
    s_int = torch.einsum("bshd,bthd->bsht", q_int, k_int)
    s_half = torch.einsum("bshd,bthd->bsht", q_half, k_half)
    _close(s_half, s_int, what="scores")
    # The fault the permutation prevents: feeding unpermuted channels to rotate_half changes scores.
    s_wrong = torch.einsum("bshd,bthd->bsht", rotate_half_ref(q, cos, sin), rotate_half_ref(k, cos, sin))
    assert _max_diff(s_wrong, s_int) > 1e-2


def test_matches_transformers_llama_rotary_after_permutation():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(2)
    cfg = _cfg(rope_dim=16, max_seq_len=64, original_seq_len=16, rope_factor=4.0)  # YaRN on: any inv_freq
    S = 12
    freqs = precompute_freqs_cis(cfg)[:S]
    cos, sin = _cos_sin(yarn_inv_freq(cfg), S)
    q, k = torch.randn(2, S, 4, 16), torch.randn(2, S, 4, 16)  # (B, S, H, R) interleaved layout
    # transformers expects (B, H, S, R) and cos/sin (B, S, R)
    q_hf, k_hf = llama.apply_rotary_pos_emb(
        interleaved_to_half(q).transpose(1, 2), interleaved_to_half(k).transpose(1, 2), cos[None], sin[None])
    q_ours, k_ours = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
    _close(q_hf.transpose(1, 2), interleaved_to_half(q_ours), what="q vs transformers")
    _close(k_hf.transpose(1, 2), interleaved_to_half(k_ours), what="k vs transformers")
    _close(torch.einsum("bhsd,bhtd->bhst", q_hf, k_hf), torch.einsum("bshd,bthd->bhst", q_ours, k_ours),
           what="scores vs transformers")


def test_projection_weights_exported_to_half_layout_give_same_scores():
    # Export: permute the output rows of wq/wk per head; the half-split model then scores the same.
    torch.manual_seed(3)
    D, H, R, S = 12, 2, 8, 7
    cfg = _cfg(rope_dim=R)
    freqs = precompute_freqs_cis(cfg, seq_len=S)
    cos, sin = _cos_sin(yarn_inv_freq(cfg), S)
    wq, wk = torch.randn(H * R, D), torch.randn(H * R, D)
    x = torch.randn(1, S, D)
    q = apply_rotary_emb((x @ wq.T).view(1, S, H, R), freqs)
    k = apply_rotary_emb((x @ wk.T).view(1, S, H, R), freqs)
    wq_h = interleaved_to_half(wq.view(H, R, D), dim=1).reshape(H * R, D)
    wk_h = interleaved_to_half(wk.view(H, R, D), dim=1).reshape(H * R, D)
    q_h = rotate_half_ref((x @ wq_h.T).view(1, S, H, R), cos, sin)
    k_h = rotate_half_ref((x @ wk_h.T).view(1, S, H, R), cos, sin)
    _close(torch.einsum("bshd,bthd->bsht", q_h, k_h), torch.einsum("bshd,bthd->bsht", q, k),
           dict(atol=1e-4, rtol=1e-5), "scores after export")  # O(10) scores: fp32 sums of 8 products
    # and back
    assert torch.equal(half_to_interleaved(wq_h.view(H, R, D), dim=1).reshape(H * R, D), wq)


# --- YaRN ----------------------------------------------------------------------------------------

def _plain_inv_freq(dim, base):
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def _yarn_hand(dim, base, factor, orig, beta_fast, beta_slow):
    """DeepSeek-V3 `precompute_freqs_cis`, written out with math only."""
    def corr(n_rot):  # find_correction_dim = dim * ln(orig / (n_rot * 2 pi)) / (2 ln base)
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(_plain_inv_freq(dim, base)):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep, 1: interpolate
        out.append(f / factor * ramp + f * (1 - ramp))
    return out, low, high


def test_yarn_unchanged_when_not_extended():
    for max_seq_len in (256, 4096):
        cfg = _cfg(rope_dim=64, rope_factor=40.0, original_seq_len=4096, max_seq_len=max_seq_len)
        got = yarn_inv_freq(cfg)
        assert got.shape == (32,) and got.dtype == torch.float32
        _close(got, torch.tensor(_plain_inv_freq(64, 10000.0)), dict(atol=0, rtol=1e-6), "not extended:")


def test_yarn_deepseek_v3_hand_computed():
    # V3 rotary part: R = 64, base 10000, original 4096, factor 40, beta 32 / 1.
    cfg = ModelConfig(attention="mla", qk_rope_head_dim=64, rope_theta=10000.0, rope_factor=40.0,
                      original_seq_len=4096, max_seq_len=163840, beta_fast=32, beta_slow=1)
    expected, low, high = _yarn_hand(64, 10000.0, 40.0, 4096, 32, 1)
    assert (low, high) == (10, 23)  # 64 ln(4096/(64 pi)) / (2 ln 1e4) = 10.47; 64 ln(4096/(2 pi)) / ... = 22.5
    got = yarn_inv_freq(cfg)
    _close(got, torch.tensor(expected), dict(atol=0, rtol=1e-6), "V3 YaRN inv_freq:")
    plain = torch.tensor(_plain_inv_freq(64, 10000.0))
    # fast (high-frequency) pairs kept exactly, slow pairs divided by the factor
    _close(got[: low + 1], plain[: low + 1], dict(atol=0, rtol=1e-6), "fast pairs:")
    _close(got[high:], plain[high:] / 40.0, dict(atol=0, rtol=1e-6), "slow pairs:")
    assert got[0].item() == pytest.approx(1.0) and got[-1].item() == pytest.approx(10000 ** (-62 / 64) / 40, rel=1e-6)
    ramp = got[low + 1: high] / plain[low + 1: high]  # strictly between 1/40 and 1, decreasing
    assert (ramp < 1).all() and (ramp > 1 / 40).all() and (ramp.diff() < 0).all()


def test_yarn_zero_width_ramp():
    # beta_fast / beta_slow that give the same pair index: the ramp becomes a step, no division by 0
    expected, low, high = _yarn_hand(8, 10000.0, 4.0, 64, 2, 1)
    cfg = _cfg(rope_dim=8, rope_factor=4.0, original_seq_len=64, max_seq_len=256, beta_fast=2, beta_slow=1)
    got = yarn_inv_freq(cfg)
    assert torch.isfinite(got).all()
    _close(got, torch.tensor(expected), dict(atol=0, rtol=1e-6), f"low={low} high={high}:")


@pytest.mark.parametrize("rope_dim, base, factor, orig, beta_fast, beta_slow", [
    (64, 10000.0, 40.0, 4096, 32, 1),  # DeepSeek-V3
    (32, 500000.0, 8.0, 8192, 32, 1),
    (16, 10000.0, 4.0, 256, 16, 2),
])
def test_yarn_matches_transformers(rope_dim, base, factor, orig, beta_fast, beta_slow):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    def hf(truncate, mscale_keys=False):
        params = {"rope_type": "yarn", "rope_theta": base, "factor": factor,
                  "original_max_position_embeddings": orig, "beta_fast": beta_fast, "beta_slow": beta_slow,
                  "truncate": truncate}
        if mscale_keys:  # DeepSeek-V3's config.json: mscale = mscale_all_dim = 1.0
            params |= {"mscale": 1.0, "mscale_all_dim": 1.0}
        c = LlamaConfig(hidden_size=2 * rope_dim, num_attention_heads=2, head_dim=rope_dim,
                        max_position_embeddings=orig * int(factor), rope_parameters=params)
        return rope_utils._compute_yarn_parameters(c)

    cfg = _cfg(rope_dim=rope_dim, rope_theta=base, rope_factor=factor, original_seq_len=orig,
               max_seq_len=orig * int(factor), beta_fast=beta_fast, beta_slow=beta_slow)
    ours = yarn_inv_freq(cfg)
    inv_hf, attention_factor = hf(truncate=True)
    _close(ours, inv_hf.float(), dict(atol=0, rtol=1e-5), "vs transformers (truncate=True):")
    # transformers scales cos and sin by attention_factor (so q.k by its square); DeepSeek multiplies
    # the softmax scale by mscale^2 instead: the same scores.
    assert attention_factor**2 == pytest.approx(cfg.softmax_scale * math.sqrt(cfg.qk_head_dim), rel=1e-12)
    # With DeepSeek-V3's mscale keys transformers moves the temperature out of cos/sin entirely.
    assert hf(truncate=True, mscale_keys=True)[1] == pytest.approx(1.0)
    # truncate=False: no floor/ceil of the correction range -> not DeepSeek's formula on the ramp
    inv_untrunc, _ = hf(truncate=False)
    assert _max_diff(ours, inv_untrunc) > 0, "truncate=False unexpectedly equals DeepSeek's truncated ramp"


# --- errors --------------------------------------------------------------------------------------

def test_shape_errors_raise():
    cfg = _cfg(rope_dim=8)
    freqs = precompute_freqs_cis(cfg, seq_len=6)
    with pytest.raises(ValueError, match="freqs_cis"):
        apply_rotary_emb(torch.randn(1, 5, 2, 8), freqs)  # 5 positions, 6 rows
    with pytest.raises(ValueError, match="freqs_cis"):
        apply_rotary_emb(torch.randn(1, 6, 2, 6), freqs)  # R = 6, table for R = 8
    with pytest.raises(ValueError):
        apply_rotary_emb(torch.randn(1, 6, 2, 7), freqs[:, :3])  # odd R


def test_real_valued_table_is_rejected():
    # A complex table cast to a real dtype (e.g. by nn.Module.to(torch.bfloat16)) keeps only cos:
    # the "rotation" would then silently scale instead of rotate.
    cfg = _cfg(rope_dim=8)
    freqs = precompute_freqs_cis(cfg, seq_len=4)
    with pytest.raises(ValueError, match="complex"):
        apply_rotary_emb(torch.randn(1, 4, 2, 8), freqs.real.contiguous())


def test_precompute_default_length_and_unit_modulus():
    cfg = _cfg(rope_dim=8, max_seq_len=48)
    freqs = precompute_freqs_cis(cfg)
    assert freqs.shape == (48, 4)
    _close(freqs.abs(), torch.ones(48, 4), what="|e^{i m theta}|")
    _close(torch.angle(freqs[1]), yarn_inv_freq(cfg), what="angle at position 1")
