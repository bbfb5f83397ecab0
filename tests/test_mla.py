"""Tests of deepseek_edu.mla.MLA and of the Transformer with attention="mla".

Checks, on tiny configs (with and without query compression, with YaRN, with unusual widths N, R,
Dv, C including N = 0, batch > 1):

- the absorbed path equals the naive path (fp32, 1e-5), without a cache and with one, and both
  equal an independent float64 reference written here from DeepSeek-V2's equations (per-head
  explicit up-projection of keys and values, explicit mask and softmax, scale 1/sqrt(N+R)·mscale²);
- pitfalls kind E (positions): a full forward = prefill + token-by-token decoding = chunked prefill
  on a warm cache (chunks 5, 1, 7, 3), all-position logits within 1e-5, for impl naive / absorbed /
  auto, and with the paths (and the default) sharing one cache; causality with and without a cache;
- pitfalls kind D (scale): the softmax scale is 1/sqrt(N+R) (not 1/sqrt(C), 1/sqrt(N), 1/sqrt(N+R+Dv)),
  times mscale² under YaRN (hand-computed); every wrong scale is caught at positions >= 1, while
  position 0 (one key, softmax = 1) is blind to it;
- pitfalls kind C (layout): q_pe / k_pe rotate interleaved pairs; permuting the rotary rows of
  wq(_b) and wkv_a with `interleaved_to_half` and rotating half-split pairs gives the same output;
- the latent cache holds exactly C + R numbers per token per layer: the normalised latent
  kv_norm(wkv_a(x)[..., :C]) and the already-rotated shared rotary key (wkv_a has C + R outputs,
  no per-head rotary key weights);
- ValueError for impossible shapes and options; gradients equal through both paths.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_edu.attention import KVCache
from deepseek_edu.config import ModelConfig
from deepseek_edu.mla import MLA
from deepseek_edu.model import Transformer
from deepseek_edu.rope import (
    half_to_interleaved,
    interleaved_to_half,
    precompute_freqs_cis,
    rotate_half_ref,
    yarn_inv_freq,
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # two fp32 orderings of the same sums, values O(1)
WRONG = 1e-3  # a wrong scale / layout must move some output by more than this


BASE = dict(attention="mla", vocab_size=61, dim=48, n_layers=2, n_heads=4, inter_dim=64, max_seq_len=32,
            q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)

# id -> changes to BASE. YaRN is on when max_seq_len > original_seq_len and rope_factor > 1.
CONFIGS = {
    "no_q_lora": dict(),
    "q_lora": dict(q_lora_rank=24),
    "yarn_q_lora": dict(q_lora_rank=24, rope_factor=4.0, original_seq_len=8, mscale=0.707),
    "yarn_mscale1": dict(rope_factor=8.0, original_seq_len=8, mscale=1.0),
    "no_nope": dict(qk_nope_head_dim=0, qk_rope_head_dim=8, q_lora_rank=10),
    "odd_widths": dict(n_heads=3, dim=30, kv_lora_rank=7, qk_nope_head_dim=5, qk_rope_head_dim=6,
                       v_head_dim=9),
    "wide_rope": dict(n_heads=2, kv_lora_rank=32, qk_nope_head_dim=4, qk_rope_head_dim=12, v_head_dim=16,
                      q_lora_rank=8),
}


def _cfg(name: str = "q_lora", **kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name], **kw})


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _close(actual, expected, tol=FP32_TOL, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), **tol,
                               msg=lambda m: f"{what}: max diff {_max_diff(actual, expected):.3g}\n{m}")


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights with unit gain (scores O(1), softmax far from uniform) and non-trivial norm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))  # RMSNorm weights != 1
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def _mla(cfg: ModelConfig, seed: int = 0) -> MLA:
    torch.manual_seed(seed)
    mla = MLA(cfg)
    _randomize(mla, seed)
    return mla


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    _randomize(model, seed)
    return model.eval()


def _x(cfg: ModelConfig, B: int = 3, S: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, cfg.dim, generator=torch.Generator().manual_seed(seed))


# --- an independent reference from DeepSeek-V2 §2.1 (eqs. 9-19 of the paper), in float64 ---------------


def _rms_ref(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate_interleaved_ref(x, angles):
    """Pairs (x[2j], x[2j+1]) turned by angles (S, R/2); x (..., S, R)."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _rotate_half_split_ref(x, angles):
    """Pairs (x[j], x[j + R/2]) turned by angles (S, R/2), via rope.rotate_half_ref; x (B, S, R)."""
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (S, R)
    return rotate_half_ref(x.unsqueeze(2), cos, sin).squeeze(2)


def _ref_scale(cfg: ModelConfig) -> float:
    """1/sqrt(N + R), times mscale² when YaRN is on (mscale = 0.1 · cfg.mscale · ln(factor) + 1)."""
    scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    if cfg.max_seq_len > cfg.original_seq_len and cfg.rope_factor > 1:
        scale *= (0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0) ** 2
    return scale


def mla_ref(weights: dict, cfg: ModelConfig, x: torch.Tensor, rotary: str = "interleaved",
            scale: float | None = None) -> torch.Tensor:
    """MLA over positions 0..S-1 from the paper's equations, head by head, in float64.

    weights: an MLA state dict; x (B, S, D) -> (B, S, D).
    """
    H, N, R, Dv, C = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                      cfg.kv_lora_rank)
    W = {k: v.double() for k, v in weights.items()}
    x = x.double()
    S = x.shape[1]
    scale = _ref_scale(cfg) if scale is None else scale
    angles = torch.arange(S, dtype=torch.float64)[:, None] * yarn_inv_freq(cfg).double()[None, :]  # (S, R/2)
    rot = {"interleaved": _rotate_interleaved_ref, "half": _rotate_half_split_ref}[rotary]
    # queries: c_Q = RMSNorm(W_DQ h) (or h itself without compression); q_C = W_UQ c_Q; q_R = RoPE(W_QR c_Q)
    if cfg.q_lora_rank:
        c_q, w_q = _rms_ref(x @ W["wq_a.weight"].T, W["q_norm.weight"], cfg.norm_eps), W["wq_b.weight"]
    else:
        c_q, w_q = x, W["wq.weight"]
    w_q = w_q.view(H, N + R, -1)
    # keys/values: c_KV = RMSNorm(W_DKV h) (cached); k_R = RoPE(W_KR h), ONE rotary key for all heads
    c_kv = _rms_ref(x @ W["wkv_a.weight"][:C].T, W["kv_norm.weight"], cfg.norm_eps)  # (B, S, C)
    k_r = rot(x @ W["wkv_a.weight"][C:].T, angles)  # (B, S, R)
    w_kv_b = W["wkv_b.weight"].view(H, N + Dv, C)
    future = torch.ones(S, S, dtype=torch.bool).triu(1)  # key j > query i
    heads = []
    for h in range(H):
        q = torch.cat([c_q @ w_q[h, :N].T, rot(c_q @ w_q[h, N:].T, angles)], -1)  # (B, S, N+R)
        k = torch.cat([c_kv @ w_kv_b[h, :N].T, k_r], -1)  # k_C = W_UK c_KV, then the shared k_R
        v = c_kv @ w_kv_b[h, N:].T  # v_C = W_UV c_KV, (B, S, Dv)
        scores = ((q @ k.transpose(1, 2)) * scale).masked_fill(future, float("-inf"))  # (B, S, S)
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)  # softmax written out
        probs = probs / probs.sum(-1, keepdim=True)
        heads.append(probs @ v)  # (B, S, Dv)
    return torch.cat(heads, -1) @ W["wo.weight"].T  # (B, S, D)


def _run_chunks(mla: MLA, x: torch.Tensor, chunks: list[int], impl: str, cfg: ModelConfig):
    """Feed x through one KVCache in the given chunk sizes; return the concatenated outputs and the cache."""
    freqs = precompute_freqs_cis(cfg)
    cache = KVCache(x.shape[0], cfg.max_seq_len, mla.cache_spec())
    outs, pos = [], 0
    for n in chunks:
        outs.append(mla(x[:, pos:pos + n], freqs[pos:pos + n], cache, impl=impl))
        pos += n
    return torch.cat(outs, 1), cache


# --- absorbed == naive == reference ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_absorbed_equals_naive_full_forward(name):
    cfg = _cfg(name)
    mla, x = _mla(cfg), _x(cfg)
    freqs = precompute_freqs_cis(cfg)[: x.shape[1]]
    with torch.no_grad():
        naive, absorbed = mla(x, freqs, impl="naive"), mla(x, freqs, impl="absorbed")
    assert naive.shape == absorbed.shape == x.shape
    _close(absorbed, naive, what=f"{name}: absorbed vs naive, no cache")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_absorbed_equals_naive_with_cache(name):
    cfg = _cfg(name)
    mla, x = _mla(cfg), _x(cfg, S=14)
    freqs = precompute_freqs_cis(cfg)[:14]
    with torch.no_grad():
        full = mla(x, freqs, impl="naive")
        for chunks in ([14], [4, 1, 6, 3], [1] * 14):
            naive, _ = _run_chunks(mla, x, chunks, "naive", cfg)
            absorbed, _ = _run_chunks(mla, x, chunks, "absorbed", cfg)
            _close(absorbed, naive, what=f"{name} chunks {chunks}: absorbed vs naive")
            _close(absorbed, full, what=f"{name} chunks {chunks}: cached absorbed vs full forward")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_paths_match_paper_reference(name):
    cfg = _cfg(name)
    mla, x = _mla(cfg), _x(cfg)
    ref = mla_ref(mla.state_dict(), cfg, x)
    freqs = precompute_freqs_cis(cfg)[: x.shape[1]]
    with torch.no_grad():
        for impl in ("naive", "absorbed"):
            _close(mla(x, freqs, impl=impl), ref, what=f"{name}: {impl} vs paper reference")
        cached, _ = _run_chunks(mla, x, [3, 1, 7], "absorbed", cfg)
    _close(cached, ref, what=f"{name}: cached absorbed vs paper reference")


def test_auto_is_naive_without_cache_and_absorbed_with_one():
    cfg = _cfg()
    mla, x = _mla(cfg), _x(cfg, S=5)
    freqs = precompute_freqs_cis(cfg)
    calls = []
    for path in ("_attend_naive", "_attend_absorbed"):
        original = getattr(mla, path)
        setattr(mla, path, lambda *a, _p=path, _f=original: calls.append(_p) or _f(*a))
    with torch.no_grad():
        mla(x, freqs[:5])  # default impl is "auto"
        mla(x, freqs[:5], KVCache(3, 8, mla.cache_spec()))
        mla(x, freqs[:5], impl="naive")
    assert mla.impl == "auto"
    assert calls == ["_attend_naive", "_attend_absorbed", "_attend_naive"]


# --- pitfalls kind E: full forward = prefill + decoding = chunked prefill, for the whole model ------------------


@pytest.mark.parametrize("name", ["no_q_lora", "yarn_q_lora", "odd_widths"])
@pytest.mark.parametrize("impl", ["naive", "absorbed", "auto"])
def test_transformer_full_equals_decoding_equals_chunked(name, impl):
    cfg = _cfg(name, max_seq_len=24)
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truth = model(tokens, attn_impl="naive").logits  # (B, 16, V)
        full = model(tokens, attn_impl=impl).logits
        _close(full, truth, what=f"{name} impl={impl}: full forward vs naive full forward")

        cache = model.new_cache(2, 24)
        steps = [model(tokens[:, :4], cache, attn_impl=impl).logits]  # prefill
        steps += [model(tokens[:, t:t + 1], cache, attn_impl=impl).logits for t in range(4, 16)]
        assert cache.length == 16
        _close(torch.cat(steps, 1), truth, what=f"{name} impl={impl}: prefill + token-by-token")

        cache = model.new_cache(2, 24)
        pieces, pos = [], 0
        for n in (5, 1, 7, 3):  # every chunk after the first lands on a warm cache
            pieces.append(model(tokens[:, pos:pos + n], cache, attn_impl=impl).logits)
            pos += n
        _close(torch.cat(pieces, 1), truth, what=f"{name} impl={impl}: chunked prefill 5, 1, 7, 3")


def test_transformer_paths_share_one_cache():
    """Prefill with one path, decode with the other (and the default): all share one latent cache."""
    cfg = _cfg("yarn_q_lora", max_seq_len=24)
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        truth = model(tokens).logits
        for first, then in (("naive", "absorbed"), ("absorbed", "naive"), (None, None)):
            cache = model.new_cache(2)
            out = [model(tokens[:, :6], cache, attn_impl=first).logits]
            out += [model(tokens[:, t:t + 1], cache, attn_impl=then).logits for t in range(6, 12)]
            _close(torch.cat(out, 1), truth, what=f"prefill {first}, decode {then}")


@pytest.mark.parametrize("impl", ["naive", "absorbed"])
def test_causality(impl):
    cfg = _cfg("yarn_q_lora", max_seq_len=24)
    model = _model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens, attn_impl=impl).logits, model(changed, attn_impl=impl).logits
        _close(b[:, :7], a[:, :7], tol=dict(atol=1e-6, rtol=0), what="positions before the change")
        assert _max_diff(a[:, 7:], b[:, 7:]) > WRONG, "the changed token must affect its own and later logits"
        # the same with the change inside a chunk added to a warm cache (positions 4..11)
        outs = []
        for t in (tokens, changed):
            cache = model.new_cache(2)
            model(t[:, :4], cache, attn_impl=impl)
            outs.append(model(t[:, 4:], cache, attn_impl=impl).logits)
        _close(outs[1][:, :3], outs[0][:, :3], tol=dict(atol=1e-6, rtol=0),
               what="warm-cache chunk: positions 4..6 before the change")
        assert _max_diff(outs[0][:, 3:], outs[1][:, 3:]) > WRONG


# --- the latent cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["no_q_lora", "odd_widths"])
def test_cache_holds_normalised_latent_and_rotated_shared_key(name):
    cfg = _cfg(name)
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    mla, x = _mla(cfg), _x(cfg, S=9)
    _, cache = _run_chunks(mla, x, [4, 5], "absorbed", cfg)
    assert set(cache.buffers) == {"kv", "pe"}
    assert cache.buffers["kv"].shape == (3, cfg.max_seq_len, C)
    assert cache.buffers["pe"].shape == (3, cfg.max_seq_len, R)
    assert cache.elements_per_token == C + R
    with torch.no_grad():
        latent = mla.wkv_a(x)  # (B, S, C + R)
        kv_expected = mla.kv_norm(latent[..., :C])
        angles = torch.arange(9, dtype=torch.float64)[:, None] * yarn_inv_freq(cfg).double()
        pe_expected = _rotate_interleaved_ref(latent[..., C:].double(), angles)
    _close(cache.buffers["kv"][:, :9], kv_expected, what="cached kv is kv_norm(wkv_a(x)[..., :C])")
    _close(cache.buffers["pe"][:, :9], pe_expected, what="cached pe is the rotated rotary key")
    assert _max_diff(cache.buffers["pe"][:, 1:9], latent[:, 1:, C:]) > WRONG, "pe must be stored rotated"
    assert _max_diff(cache.buffers["kv"][:, :9], latent[..., :C]) > WRONG, "kv must be stored normalised"


def test_no_per_head_rotary_key_weights():
    q_weights = {"no_q_lora": {"wq.weight"}, "q_lora": {"wq_a.weight", "q_norm.weight", "wq_b.weight"}}
    for name, extra in q_weights.items():
        cfg = _cfg(name)
        H, N, R, Dv, C = 4, 8, 4, 12, 16
        shapes = {k: tuple(v.shape) for k, v in MLA(cfg).state_dict().items()}
        assert set(shapes) == extra | {"wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight"}
        assert shapes["wkv_a.weight"] == (C + R, cfg.dim)  # one latent + ONE rotary key per token
        assert shapes["wkv_b.weight"] == (H * (N + Dv), C)  # per-head keys/values carry no rotary part
        assert shapes["wo.weight"] == (cfg.dim, H * Dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_cache_size(dtype):
    cfg = _cfg("q_lora")
    model = Transformer(cfg)
    cache = model.new_cache(3, 20, dtype=dtype)
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert [layer.elements_per_token for layer in cache.layers] == [per_token] * cfg.n_layers
    assert cache.nbytes == 3 * 20 * per_token * cfg.n_layers * (4 if dtype == torch.float32 else 2)


# --- pitfalls kind D: the softmax scale ----------------------------------------------------------------------------


def test_softmax_scale_hand_computed():
    assert _mla(_cfg("q_lora")).softmax_scale == pytest.approx(0.28867513459481287, rel=1e-12)  # 1/sqrt(8+4)
    # YaRN, factor 4, mscale 0.707: m = 0.1 * 0.707 * ln 4 + 1 = 1.0980110113; scale = m² / sqrt(12)
    assert _mla(_cfg("yarn_q_lora")).softmax_scale == pytest.approx(0.34803487742277706, rel=1e-12)
    # YaRN, factor 8, mscale 1: m = 0.1 * ln 8 + 1 = 1.2079441542; scale = m² / sqrt(12)
    assert _mla(_cfg("yarn_mscale1")).softmax_scale == pytest.approx(0.42121428344144607, rel=1e-12)
    # YaRN stays off while the context is not extended (max_seq_len <= original_seq_len)
    no_yarn = _mla(_cfg("yarn_mscale1", original_seq_len=32))
    assert no_yarn.softmax_scale == pytest.approx(12 ** -0.5, rel=1e-12)


@pytest.mark.parametrize("name", ["q_lora", "yarn_q_lora"])
@pytest.mark.parametrize("impl", ["naive", "absorbed"])
def test_wrong_scale_is_caught_at_positions_after_zero(name, impl):
    cfg = _cfg(name)
    N, R, Dv, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    mla, x = _mla(cfg), _x(cfg, S=8)
    freqs = precompute_freqs_cis(cfg)[:8]
    ref = mla_ref(mla.state_dict(), cfg, x)
    right = mla.softmax_scale
    m = (0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1) if cfg.rope_factor > 1 else 1.0
    wrong_scales = {
        "1/sqrt(C) (absorbed width)": C ** -0.5 * m * m,
        "1/sqrt(N) (no rotary part)": N ** -0.5 * m * m,
        "1/sqrt(N+R+Dv)": (N + R + Dv) ** -0.5 * m * m,
        "1/sqrt(N+R+C)": (N + R + C) ** -0.5 * m * m,
    }
    if m != 1.0:
        wrong_scales["mscale applied once"] = (N + R) ** -0.5 * m
        wrong_scales["mscale missing"] = (N + R) ** -0.5
    with torch.no_grad():
        _close(mla(x, freqs, impl=impl), ref, what=f"{impl} with the right scale")
        for label, scale in wrong_scales.items():
            assert abs(scale - right) > 1e-3 * right, label
            mla.softmax_scale = scale
            out = mla(x, freqs, impl=impl)
            # position 0 sees only itself: softmax over one key is 1 whatever the scale
            _close(out[:, 0], ref[:, 0], what=f"{label}: position 0 cannot see a scale error")
            assert _max_diff(out[:, 1:], ref[:, 1:]) > WRONG, f"{label} not caught at positions >= 1"
        mla.softmax_scale = right


# --- pitfalls kind C: rotary layout ---------------------------------------------------------------------------


def _to_half_split(weights: dict, cfg: ModelConfig) -> dict:
    """Permute the rotary output rows of wq / wq_b (per head) and of wkv_a into the half-split layout."""
    H, N, R, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    out = dict(weights)
    name = "wq_b.weight" if cfg.q_lora_rank else "wq.weight"
    wq = weights[name].view(H, N + R, -1)
    out[name] = torch.cat([wq[:, :N], interleaved_to_half(wq[:, N:], dim=1)], 1).reshape(H * (N + R), -1)
    wkv_a = weights["wkv_a.weight"]
    out["wkv_a.weight"] = torch.cat([wkv_a[:C], interleaved_to_half(wkv_a[C:], dim=0)], 0)
    return out


@pytest.mark.parametrize("name", ["no_q_lora", "yarn_q_lora", "wide_rope"])
def test_interleaved_layout_equals_permuted_half_split(name):
    cfg = _cfg(name)
    mla, x = _mla(cfg), _x(cfg, S=10)
    weights = {k: v.clone() for k, v in mla.state_dict().items()}  # load_state_dict below copies in place
    half_weights = _to_half_split(weights, cfg)
    freqs = precompute_freqs_cis(cfg)[:10]
    with torch.no_grad():
        out = mla(x, freqs, impl="absorbed")
        _close(mla_ref(weights, cfg, x, rotary="interleaved"), out, what="interleaved reference")
        _close(mla_ref(half_weights, cfg, x, rotary="half"), out,
               what="permuted weights + half-split rotation")
        # and the mismatched combinations are caught (R >= 4, so the permutation is not the identity)
        assert _max_diff(mla_ref(weights, cfg, x, rotary="half"), out) > WRONG, \
            "half-split rotation on unpermuted weights"
        mla.load_state_dict(half_weights)
        assert _max_diff(mla(x, freqs, impl="naive"), out) > WRONG, "interleaved rotation on permuted weights"
    # the permutation is invertible: exporting and importing back restores the weights bitwise
    for key in ("wkv_a.weight",):
        back = torch.cat([half_weights[key][: cfg.kv_lora_rank],
                          half_to_interleaved(half_weights[key][cfg.kv_lora_rank:], dim=0)], 0)
        assert torch.equal(back, weights[key])


# --- gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q_lora", "yarn_q_lora", "no_nope"])
def test_gradients_equal_through_both_paths(name):
    cfg = _cfg(name)
    x0 = _x(cfg, S=9)
    w = torch.randn(3, 9, cfg.dim, generator=torch.Generator().manual_seed(7))
    freqs = precompute_freqs_cis(cfg)[:9]
    grads = {}
    for impl in ("naive", "absorbed"):
        mla = _mla(cfg)
        x = x0.clone().requires_grad_(True)
        (mla(x, freqs, impl=impl) * w).sum().backward()
        grads[impl] = {"x": x.grad, **{k: p.grad for k, p in mla.named_parameters()}}
    assert set(grads["naive"]) == set(grads["absorbed"])
    for key, g in grads["naive"].items():
        assert g is not None and grads["absorbed"][key] is not None and g.abs().max() > 0, key
        _close(grads["absorbed"][key], g, what=f"grad of {key}")


# --- impossible shapes and options ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_mla_rejects_other_attention_kinds(kind):
    with pytest.raises(ValueError, match="attention='mla'"):
        MLA(ModelConfig(attention=kind, dim=48, n_heads=4, n_kv_heads=2 if kind == "gqa" else 0))


@pytest.mark.parametrize("change, field", [
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim=5"),
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim=0"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0"),
    (dict(v_head_dim=0), "v_head_dim=0"),
    (dict(qk_nope_head_dim=-1), "qk_nope_head_dim=-1"),
    (dict(q_lora_rank=-4), "q_lora_rank=-4"),
])
def test_impossible_mla_shapes(change, field):
    with pytest.raises(ValueError, match=field):
        _cfg("q_lora", **change)
    # a config mutated after construction is re-validated when the model is built
    cfg = _cfg("q_lora")
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=field):
        Transformer(cfg)


def test_bad_impl_strings():
    cfg = _cfg("q_lora")
    mla, x = _mla(cfg), _x(cfg, S=3)
    freqs = precompute_freqs_cis(cfg)[:3]
    for bad in ("fast", "Naive", "", "absorb"):
        with pytest.raises(ValueError, match="impl="):
            mla(x, freqs, impl=bad)
    mla.impl = "flash"
    with pytest.raises(ValueError, match="impl="):
        mla(x, freqs)
    model = Transformer(cfg)
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="impl="):
        model(torch.zeros(1, 3, dtype=torch.long), cache, attn_impl="fast")
    assert cache.length == 0, "a rejected call must leave the cache untouched"


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("impl", ["naive", "absorbed", "triton?"])
def test_attn_impl_on_a_non_mla_model(kind, impl):
    model = Transformer(ModelConfig(attention=kind, vocab_size=61, dim=32, n_heads=4, n_layers=1,
                                    n_kv_heads=2 if kind == "gqa" else 0, inter_dim=32, max_seq_len=8))
    with pytest.raises(ValueError, match="attn_impl.*ATTENTION_IMPLS"):
        model(torch.zeros(1, 3, dtype=torch.long), attn_impl=impl)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    # every attention class takes the convention's "auto" (and its own paths): the same logits
    assert torch.equal(model(tokens, attn_impl="auto").logits, model(tokens).logits)
    assert torch.equal(model(tokens, attn_impl="sdpa").logits, model(tokens).logits)


def test_every_attention_class_names_its_paths_in_an_impls_tuple():
    from deepseek_edu.attention import ATTENTION_IMPLS, Attention
    from deepseek_edu.mla import MLA_IMPLS

    for cls, impls in ((Attention, ATTENTION_IMPLS), (MLA, MLA_IMPLS)):
        assert impls[0] == "auto", cls
    mla = _mla(_cfg("q_lora"))
    for impl in MLA_IMPLS[1:]:
        assert callable(getattr(mla, f"_attend_{impl}")), impl  # each path is one method
    with pytest.raises(ValueError, match="MLA_IMPLS"):
        mla.impl = "fast"
        mla(_x(_cfg("q_lora"), S=2), precompute_freqs_cis(_cfg("q_lora"))[:2])


def test_cache_overflow_and_wrong_freqs():
    cfg = _cfg("q_lora")
    mla, x = _mla(cfg), _x(cfg, S=5)
    freqs = precompute_freqs_cis(cfg)
    cache = KVCache(3, 6, mla.cache_spec())
    with torch.no_grad():
        mla(x, freqs[:5], cache)
        with pytest.raises(ValueError, match="overflow"):
            mla(x[:, :2], freqs[5:7], cache)
        with pytest.raises(ValueError, match="freqs_cis"):
            mla(x, freqs[:4])  # one row of rotary factors short
