"""Tests of deepseek_edu.attention: KVCache, causal_mask and the MHA / GQA / MQA module.

Checks:
- KVCache: update appends and returns views of everything so far, truncate rolls back and the next
  update overwrites, nbytes and elements per token, and ValueError on overflow, a wrong name set,
  a batch or feature-shape mismatch, unequal new lengths and a bad truncate;
- causal_mask hand-written for a warm cache (start_pos > 0);
- Attention equals a hand computation (projections, interleaved RoPE, kv heads expanded by hand,
  `attention_ref` with a hand-written scale, output projection) for mha, gqa and mqa;
- GQA with n_kv_heads == n_heads equals MHA with the same weights; MQA equals GQA with one kv head;
- cache elements per token = 2 * kv_heads * head_dim (DeepSeek-V2 Table 1) for each kind;
- causality: changing a future token never changes earlier outputs;
- decoding from the cache (token by token and in chunks) equals the stateless forward;
- scale errors (pitfalls kind D): the scale is checked at positions >= 1, where it matters (position 0
  attends to a single key, so any scale gives the same output there), also with YaRN's mscale^2.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_edu.attention import Attention, KVCache, attention_ref, causal_mask
from deepseek_edu.config import ModelConfig
from deepseek_edu.rope import apply_rotary_emb, precompute_freqs_cis

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, O(1) activations, sums over <= 64 terms
BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # bf16 activations through 4 matmuls and a softmax

KINDS = {  # attention kind -> extra config fields (6 query heads of width 8)
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="mqa"),
}


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _close(a, b, tol=FP32_TOL, what=""):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} max diff {_max_diff(a, b)}\n{m}")


def _cfg(kind="mha", **kw):
    return ModelConfig(**(dict(dim=48, n_heads=6, max_seq_len=64, vocab_size=64) | KINDS[kind] | kw))


def _module(cfg, seed=0):
    torch.manual_seed(seed)
    attn = Attention(cfg)
    with torch.no_grad():  # larger than the default init so the softmax is far from uniform
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def _hand(attn, cfg, x, scale):
    """Attention by hand: project, rotate, expand kv heads, softmax(q k^T * scale) v, project."""
    B, S, _ = x.shape
    H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    freqs = precompute_freqs_cis(cfg, seq_len=S)
    q = apply_rotary_emb((x @ attn.wq.weight.T).view(B, S, H, Dh), freqs)
    k = apply_rotary_emb((x @ attn.wk.weight.T).view(B, S, Hkv, Dh), freqs)
    v = (x @ attn.wv.weight.T).view(B, S, Hkv, Dh)
    head_of = [h * Hkv // H for h in range(H)]  # query head h reads kv head h // (H / Hkv)
    k, v = k[:, :, head_of], v[:, :, head_of]  # (B, S, H, Dh)
    out = attention_ref(q, k, v, scale)  # (B, S, H, Dh)
    return out.reshape(B, S, H * Dh) @ attn.wo.weight.T


# --- KVCache -------------------------------------------------------------------------------------

def test_kvcache_update_returns_everything_so_far():
    cache = KVCache(2, 6, {"k": (3, 4), "v": (3, 4)})
    k1, v1 = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    out = cache.update(k=k1, v=v1)
    assert cache.length == 2 and out["k"].shape == (2, 2, 3, 4)
    assert torch.equal(out["k"], k1) and torch.equal(out["v"], v1)
    k2, v2 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    out = cache.update(k=k2, v=v2)
    assert cache.length == 5
    assert torch.equal(out["k"], torch.cat([k1, k2], 1)) and torch.equal(out["v"], torch.cat([v1, v2], 1))


def test_kvcache_truncate_then_update_overwrites():
    cache = KVCache(1, 5, {"k": (2,), "v": (2,)})
    cache.update(k=torch.ones(1, 4, 2), v=torch.ones(1, 4, 2))
    cache.truncate(2)
    assert cache.length == 2
    out = cache.update(k=torch.full((1, 1, 2), 7.0), v=torch.full((1, 1, 2), 8.0))
    assert out["k"].shape == (1, 3, 2)
    assert out["k"][0, :, 0].tolist() == [1.0, 1.0, 7.0] and out["v"][0, :, 0].tolist() == [1.0, 1.0, 8.0]
    cache.truncate(0)
    assert cache.length == 0
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(1)  # beyond what is held
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(-1)


def test_kvcache_nbytes_and_elements_per_token():
    spec = {"k": (4, 8), "v": (4, 8)}
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = KVCache(3, 10, spec, dtype=dtype)
        assert cache.elements_per_token == 2 * 4 * 8
        assert cache.nbytes == 3 * 10 * 2 * 4 * 8 * size
    mla_like = KVCache(2, 7, {"kv": (512,), "pe": (64,)}, dtype=torch.bfloat16)
    assert mla_like.elements_per_token == 576  # V2 Table 1: d_c + d_h^R
    assert mla_like.nbytes == 2 * 7 * 576 * 2


def test_kvcache_errors():
    cache = KVCache(2, 4, {"k": (3,), "v": (3,)})
    with pytest.raises(ValueError, match="overflow"):
        cache.update(k=torch.zeros(2, 5, 3), v=torch.zeros(2, 5, 3))
    cache.update(k=torch.zeros(2, 3, 3), v=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"overflow.*3 cached \+ 2 new.*max_len=4"):
        cache.update(k=torch.zeros(2, 2, 3), v=torch.zeros(2, 2, 3))
    assert cache.length == 3  # a failed update leaves the length alone
    with pytest.raises(ValueError, match="needs exactly"):
        cache.update(k=torch.zeros(2, 1, 3))  # v missing
    with pytest.raises(ValueError, match="needs exactly"):
        cache.update(k=torch.zeros(2, 1, 3), v=torch.zeros(2, 1, 3), pe=torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="shape"):
        cache.update(k=torch.zeros(3, 1, 3), v=torch.zeros(3, 1, 3))  # batch 3 into a batch-2 cache
    with pytest.raises(ValueError, match="shape"):
        cache.update(k=torch.zeros(2, 1, 4), v=torch.zeros(2, 1, 4))  # feature width
    with pytest.raises(ValueError, match="same number of positions"):
        cache.update(k=torch.zeros(2, 1, 3), v=torch.zeros(2, 2, 3))
    assert cache.length == 3


def test_causal_mask_with_warm_cache():
    expected = torch.tensor([
        [1, 1, 1, 0, 0],  # query at position 2 sees keys 0..2
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 3), expected)
    assert torch.equal(causal_mask(0, 3), torch.ones(3, 3, dtype=torch.bool).tril())


# --- the module ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_attention_equals_hand_computation(kind):
    cfg = _cfg(kind)
    attn = _module(cfg)
    x = torch.randn(2, 11, cfg.dim)
    S = x.shape[1]
    y = attn(x, precompute_freqs_cis(cfg, seq_len=S))
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = _hand(attn, cfg, x, 1 / math.sqrt(8))  # head width 48 / 6 = 8
    _close(y, ref, what=f"{kind}:")
    # attention_ref does not expand kv heads itself: check its head count assumption is met
    assert attn.wk.weight.shape[0] == cfg.kv_heads * 8


def test_gqa_with_all_heads_equals_mha():
    mha = _module(_cfg("mha"))
    gqa = Attention(_cfg("gqa", n_kv_heads=6))
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 9, 48)
    freqs = precompute_freqs_cis(_cfg("mha"), seq_len=9)
    _close(gqa(x, freqs), mha(x, freqs), dict(atol=0, rtol=0), "gqa(H_kv = H) vs mha:")


def test_mqa_equals_gqa_with_one_kv_head():
    mqa = _module(_cfg("mqa"))
    gqa = Attention(_cfg("gqa", n_kv_heads=1))
    gqa.load_state_dict(mqa.state_dict())
    x = torch.randn(2, 9, 48)
    freqs = precompute_freqs_cis(_cfg("mqa"), seq_len=9)
    _close(gqa(x, freqs), mqa(x, freqs), dict(atol=0, rtol=0), "gqa(H_kv = 1) vs mqa:")


def test_gqa_is_not_mha_with_repeated_weights_in_the_wrong_order():
    # repeat_interleave (head h uses kv head h // groups) vs repeat (h % n_kv): must be the former.
    cfg = _cfg("gqa", n_kv_heads=2)
    gqa = _module(cfg)
    mha = Attention(_cfg("mha"))
    Dh, groups = 8, 3
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, Dh, 48)  # (H_kv, Dh, D)
            getattr(mha, name).weight.copy_(w.repeat_interleave(groups, dim=0).reshape(6 * Dh, 48))
    x = torch.randn(1, 7, 48)
    freqs = precompute_freqs_cis(cfg, seq_len=7)
    _close(gqa(x, freqs), mha(x, freqs), what="gqa vs mha with kv weights repeated per group:")


@pytest.mark.parametrize("kind, kv_heads", [("mha", 6), ("gqa", 2), ("mqa", 1)])
def test_cache_elements_per_token(kind, kv_heads):
    cfg = _cfg(kind)
    attn = Attention(cfg)
    spec = attn.cache_spec()
    cache = KVCache(1, 4, spec)
    assert cache.elements_per_token == 2 * kv_heads * cfg.attn_head_dim, spec  # V2 Table 1, one layer
    assert attn.wk.weight.shape == (kv_heads * cfg.attn_head_dim, cfg.dim)


@pytest.mark.parametrize("kind", list(KINDS))
def test_causality(kind):
    cfg = _cfg(kind)
    attn = _module(cfg)
    x = torch.randn(1, 10, 48)
    freqs = precompute_freqs_cis(cfg, seq_len=10)
    y = attn(x, freqs)
    for t in (0, 4, 9):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:]) * 5
        y2 = attn(x2, freqs)
        _close(y2[:, :t], y[:, :t], dict(atol=1e-6, rtol=0), f"{kind}: outputs before {t} moved:")
        if t < 9:
            assert _max_diff(y2[:, t:], y[:, t:]) > 1e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_decoding_equals_stateless_forward(kind):
    cfg = _cfg(kind)
    attn = _module(cfg)
    x = torch.randn(2, 13, 48)
    freqs = precompute_freqs_cis(cfg, seq_len=13)
    full = attn(x, freqs)
    for chunks in ([13], [1] * 13, [5, 1, 7], [4, 4, 4, 1]):
        cache = KVCache(2, 16, attn.cache_spec())
        outs, pos = [], 0
        for n in chunks:
            outs.append(attn(x[:, pos:pos + n], freqs[pos:pos + n], cache))
            pos += n
        assert cache.length == 13
        _close(torch.cat(outs, 1), full, what=f"{kind} chunks {chunks}:")


# --- the softmax scale (pitfalls kind D) ----------------------------------------------------------------

def test_scale_is_visible_only_after_position_0():
    cfg = _cfg("mha")
    attn = _module(cfg)
    x = torch.randn(1, 8, 48)
    y = attn(x, precompute_freqs_cis(cfg, seq_len=8))
    right = _hand(attn, cfg, x, 1 / math.sqrt(8))
    wrong = _hand(attn, cfg, x, 1 / 8)  # e.g. 1/Dh instead of 1/sqrt(Dh)
    _close(wrong[:, 0], right[:, 0], what="position 0 must hide the scale:")
    assert _max_diff(wrong[:, 1:], right[:, 1:]) > 1e-3, "the test input does not expose a scale error"
    _close(y[:, 1:], right[:, 1:], what="positions >= 1:")


def test_yarn_mscale_squared_reaches_attention():
    # YaRN active (max_seq_len > original_seq_len): the score scale is mscale^2 / sqrt(Dh).
    cfg = _cfg("gqa", n_kv_heads=3, max_seq_len=64, original_seq_len=16, rope_factor=8.0)
    attn = _module(cfg)
    m = 0.1 * math.log(8.0) + 1.0
    assert attn.softmax_scale == pytest.approx(m * m / math.sqrt(8), rel=1e-12)
    x = torch.randn(1, 9, 48)
    y = attn(x, precompute_freqs_cis(cfg, seq_len=9))
    right = _hand(attn, cfg, x, m * m / math.sqrt(8))
    once = _hand(attn, cfg, x, m / math.sqrt(8))  # mscale applied once: the fault
    assert _max_diff(once[:, 1:], right[:, 1:]) > 1e-3
    _close(y[:, 1:], right[:, 1:], what="yarn positions >= 1:")
    _close(y, right, what="yarn all positions:")


def test_bf16_close_to_fp32():
    cfg = _cfg("gqa")
    attn = _module(cfg)
    x = torch.randn(2, 10, 48)
    freqs = precompute_freqs_cis(cfg, seq_len=10)
    y32 = attn(x, freqs)
    y16 = attn.to(torch.bfloat16)(x.bfloat16(), freqs)
    assert y16.dtype == torch.bfloat16
    scale = y32.abs().max()
    _close(y16.float() / scale, y32 / scale, BF16_TOL, "bf16 vs fp32 (relative to max |y|):")


def test_rejects_mla_config():
    with pytest.raises(ValueError, match="mla"):
        Attention(ModelConfig(attention="mla"))
