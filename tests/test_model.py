"""Tests of deepseek_edu.model: the Transformer, its cache, outputs, errors and trainability.

Checks:
- position / off-by-one (pitfalls kind E): a full forward = prefill + token-by-token decoding = chunked
  prefill on a warm cache (chunks 5, 1, 7, ...) = rolled-back cache (truncate, re-feed), all-token
  and last-token logits within 1e-5 in fp32, for mha, gqa, mqa and mla, tied and untied;
- causality of the whole model: a change at position t never moves the logits before t;
- `forward` always returns a `ModelOutput` with the documented shapes and dtypes (also in bf16);
- tied head (pitfalls kind C): the same tensor as the embedding (data_ptr), counted once by
  `num_parameters`, and still tied after `load_state_dict`, `.to(dtype)` and an optimiser step;
  untied is two tensors;
- dtype (pitfalls kind F): `.to(torch.float64)` / `.to(torch.bfloat16)` keep the complex rotary table
  (a cast to a real dtype would keep only cos and silently drop position), so fp64 logits equal
  fp32 logits to 1e-5;
- errors: token id out of range (negative and >= vocab_size, message names the id and
  vocab_size), sequence longer than max_seq_len, cache overflow (cache left untouched), float or
  1-D tokens, a cache longer than max_seq_len, an `attn_impl` the attention class does not have;
  routed experts raise NotImplementedError pointing to the MoE chapter (notebook 04) until deepseek_edu.moe is wired in;
- the parameter count equals a hand formula (and the hand-computed number) for the baseline;
- determinism with a seed; a tiny model overfits one batch (loss falls by > 80% in 50 steps).
"""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.config import ModelConfig, get_preset
from deepseek_edu.model import ModelOutput, Transformer

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # pitfalls kind E: fp32 logits of O(1..10), same math in other chunks
BF16_TOL = dict(atol=0.15, rtol=0.05)  # bf16 weights and activations through 2 blocks, logits O(5)

KINDS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                q_lora_rank=12),
}


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _close(a, b, tol=FP32_TOL, what=""):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} max diff {_max_diff(a, b)}\n{m}")


def _cfg(kind="mha", **kw):
    # init_std 0.2 (not 0.02): logits spread over several units, so position errors show up
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, inter_dim=48, max_seq_len=40, init_std=0.2)
    return ModelConfig(**(base | KINDS[kind] | kw))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _tokens(B, S, V=97, seed=1):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _decode(model, tokens, chunks, cache=None):
    """Feed `tokens` through the cache in chunks; return the concatenated logits (B, S, V)."""
    cache = model.new_cache(tokens.shape[0]) if cache is None else cache
    outs, pos = [], cache.length
    for n in chunks:
        outs.append(model(tokens[:, pos:pos + n], cache).logits)
        pos += n
    return torch.cat(outs, 1), cache


# --- pitfalls kind E: full = prefill + decode = chunked --------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_full_equals_prefill_decode_equals_chunked(kind, tie):
    model = _model(_cfg(kind, tie_embeddings=tie))
    tokens = _tokens(2, 19)
    full = model(tokens).logits  # (B, S, V), no cache
    assert full.std() > 0.5, "logits nearly constant: the test would not see a position error"
    schedules = {
        "prefill 10 + 9 x 1": [10] + [1] * 9,
        "token by token": [1] * 19,
        "chunks 5, 1, 7, 6": [5, 1, 7, 6],
        "one chunk": [19],
    }
    for name, chunks in schedules.items():
        logits, cache = _decode(model, tokens, chunks)
        assert cache.length == 19
        _close(logits, full, what=f"{kind} {name}, all tokens:")
        _close(logits[:, -1], full[:, -1], what=f"{kind} {name}, last token:")


@pytest.mark.parametrize("kind", ["gqa", "mla"])
@torch.no_grad()
def test_truncated_cache_then_refeed_equals_full(kind):
    # Speculative-decoding rollback: forget positions 8.., feed other tokens, compare with a fresh forward.
    model = _model(_cfg(kind))
    tokens = _tokens(1, 14)
    _, cache = _decode(model, tokens, [12])
    cache.truncate(8)
    assert cache.length == 8
    other = tokens.clone()
    other[:, 8:] = _tokens(1, 6, seed=7)
    logits, _ = _decode(model, other, [3, 3], cache)
    _close(logits, model(other).logits[:, 8:], what=f"{kind} after truncate:")


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_model_causality(kind):
    model = _model(_cfg(kind))
    tokens = _tokens(1, 16)
    ref = model(tokens).logits
    for t in (0, 5, 15):
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(16 - t)) % 97
        out = model(changed).logits
        _close(out[:, :t], ref[:, :t], dict(atol=1e-6, rtol=0), f"{kind}: logits before {t} moved:")
        assert _max_diff(out[:, t:], ref[:, t:]) > 1e-3


# --- outputs -------------------------------------------------------------------------------------

@torch.no_grad()
def test_forward_returns_model_output_with_documented_shapes():
    model = _model(_cfg("gqa"))
    tokens = _tokens(3, 7)
    for out in (model(tokens), model(tokens[:, :4], model.new_cache(3))):
        assert type(out) is ModelOutput
        S = out.logits.shape[1]
        assert out.logits.shape == (3, S, 97) and out.logits.dtype == torch.float32
        assert out.hidden.shape == (3, S, 32) and out.hidden.dtype == torch.float32
        assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
        assert out.mtp_logits == [] and out.expert_load == []


@torch.no_grad()
def test_int32_tokens_accepted():
    model = _model(_cfg())
    tokens = _tokens(1, 6)
    _close(model(tokens.int()).logits, model(tokens).logits, dict(atol=0, rtol=0), "int32 vs int64:")


@torch.no_grad()
def test_dtype_cast_keeps_rotary_table_complex():
    cfg = _cfg("mha")
    model = _model(cfg)
    tokens = _tokens(1, 20)
    ref = model(tokens).logits
    m64 = _model(cfg).to(torch.float64)
    assert m64.freqs_cis.dtype == torch.complex64, m64.freqs_cis.dtype
    # fp64 weights = fp32 weights exactly; only rounding differs, so any position loss shows up
    _close(m64(tokens).logits.float(), ref, what="fp64 model vs fp32 model:")
    m16 = _model(cfg).to(torch.bfloat16)
    assert m16.freqs_cis.dtype == torch.complex64, m16.freqs_cis.dtype
    out = m16(tokens)
    assert out.logits.dtype == torch.float32 and out.hidden.dtype == torch.bfloat16
    _close(out.logits, ref, BF16_TOL, "bf16 model vs fp32 model:")
    logits, _ = _decode(m16, tokens, [7, 1, 12])  # the cache follows the model dtype
    _close(logits, out.logits, dict(atol=0.1, rtol=0.05), "bf16 cached vs bf16 full:")  # bf16 rounding in other shapes


# --- tied embeddings (pitfalls kind C) --------------------------------------------------------------

def test_tied_head_is_the_embedding():
    cfg = _cfg(tie_embeddings=True)
    tied, untied = _model(cfg), _model(cfg.replace(tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    V, D = cfg.vocab_size, cfg.dim
    assert tied.num_parameters() == untied.num_parameters() - V * D
    assert tied.num_parameters() == sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())


def test_tie_survives_load_cast_and_step():
    cfg = _cfg(tie_embeddings=True)
    src, dst = _model(cfg, seed=0), _model(cfg, seed=5)
    dst.load_state_dict(src.state_dict())
    assert dst.head.weight is dst.embed.weight and torch.equal(dst.embed.weight, src.embed.weight)
    dst.to(torch.float64)
    assert dst.head.weight is dst.embed.weight
    dst.to(torch.float32).train()
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    tokens = _tokens(2, 8)
    out = dst(tokens[:, :-1])
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, 97), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    assert dst.head.weight is dst.embed.weight
    assert not torch.equal(dst.embed.weight, src.embed.weight)


# --- errors --------------------------------------------------------------------------------------

def test_token_out_of_range_raises_naming_id_and_vocab():
    model = _model(_cfg())
    for bad in (-1, 97, 1000):
        tokens = _tokens(1, 5)
        tokens[0, 3] = bad
        with pytest.raises(ValueError) as info:
            model(tokens)
        assert str(bad) in str(info.value) and "vocab_size=97" in str(info.value), str(info.value)


def test_sequence_longer_than_max_seq_len_raises():
    model = _model(_cfg())
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model(_tokens(1, 41))
    cache = model.new_cache(1)
    model(_tokens(1, 30), cache)
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model(_tokens(1, 11), cache)  # positions 30..40


@torch.no_grad()
def test_cache_overflow_raises_and_leaves_cache_intact():
    model = _model(_cfg())
    tokens = _tokens(1, 12)
    cache = model.new_cache(1, max_len=8)
    model(tokens[:, :6], cache)
    with pytest.raises(ValueError, match="overflow"):
        model(tokens[:, 6:9], cache)
    assert cache.length == 6 and all(layer.length == 6 for layer in cache.layers)
    logits, _ = _decode(model, tokens, [2], cache)  # still usable
    _close(logits, model(tokens[:, :8]).logits[:, 6:], what="after a refused overflow:")


def test_bad_token_tensors_raise():
    model = _model(_cfg())
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))  # float tokens
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        model(torch.zeros(4, dtype=torch.long))  # 1-D
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, max_len=41)
    with pytest.raises(ValueError, match="attn_impl='absorbed'.*ATTENTION_IMPLS"):
        model(_tokens(1, 3), attn_impl="absorbed")


def test_batch_mismatch_with_cache_raises():
    model = _model(_cfg())
    cache = model.new_cache(2)
    with pytest.raises(ValueError):
        model(_tokens(3, 4), cache)


def test_dense_then_moe_layers():
    from deepseek_edu.ffn import MLP
    from deepseek_edu.moe import MoE

    cfg = _cfg(n_routed_experts=4, n_activated_experts=2, n_dense_layers=1)
    model = Transformer(cfg)
    kinds = [type(layer.ffn) for layer in model.layers]
    assert kinds == [MLP] + [MoE] * (cfg.n_layers - 1), kinds
    out = model(_tokens(2, 5))
    assert len(out.expert_load) == cfg.n_layers - 1
    assert all(load.sum().item() == 2 * 5 * 2 for load in out.expert_load)
    dense = Transformer(cfg.replace(n_dense_layers=cfg.n_layers))  # all layers dense
    assert dense.moe_layers() == [] and dense(_tokens(2, 5)).expert_load == []


# --- size, determinism, training -----------------------------------------------------------------

def test_parameter_count_baseline():
    cfg = get_preset("baseline")
    V, D, L, H, Dh, F = cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.attn_head_dim, cfg.inter_dim
    per_layer = 2 * D + 4 * D * H * Dh + 3 * D * F  # two norms, wq/wk/wv/wo, w1/w2/w3
    expected = 2 * V * D + D + L * per_layer  # embedding, untied head, final norm
    assert expected == 2_557_632  # 2048*192*2 + 192 + 4 * (384 + 147456 + 294912)
    model = Transformer(cfg)
    assert model.num_parameters() == expected
    assert model.num_parameters(trainable_only=True) == expected
    gqa = _cfg("gqa")  # kv heads 2 of width 8: wk, wv are (16, 32)
    per_layer = 2 * 32 + 2 * 32 * 32 + 2 * 32 * 2 * 8 + 3 * 32 * 48
    assert Transformer(gqa).num_parameters() == 2 * 97 * 32 + 32 + 2 * per_layer


@torch.no_grad()
def test_determinism_with_seed():
    cfg = _cfg("gqa")
    a, b, c = _model(cfg, seed=3), _model(cfg, seed=3), _model(cfg, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    tokens = _tokens(2, 9)
    assert torch.equal(a(tokens).logits, b(tokens).logits)
    assert _max_diff(a(tokens).logits, c(tokens).logits) > 1e-2


def test_init_scales():
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=8, n_heads=4, inter_dim=256)
    model = _model(cfg)
    std = cfg.init_std
    assert abs(model.embed.weight.std().item() - std) < 0.1 * std
    assert abs(model.layers[0].attn.wq.weight.std().item() - std) < 0.1 * std
    scaled = std / (2 * 8) ** 0.5  # output projections: 1/sqrt(2 * n_layers)
    assert abs(model.layers[0].attn.wo.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(model.layers[0].ffn.w2.weight.std().item() - scaled) < 0.1 * scaled
    assert torch.equal(model.norm.weight.detach(), torch.ones(64))


def test_tiny_model_overfits_one_batch():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, inter_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.3)  # ~uniform at init
    assert losses[-1] < 0.2 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 50 steps"


def test_empty_sequence_is_a_value_error() -> None:
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, inter_dim=64, max_seq_len=16))
    with pytest.raises(ValueError, match="at least one position"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_a_cache_of_another_model_is_refused_by_name():
    model = _model(_cfg("mha"))
    other = _model(_cfg("mha").replace(n_layers=1))
    with pytest.raises(ValueError, match="ModelCache of this model's 2 layers"):
        model(_tokens(1, 3), other.new_cache(1))
    with pytest.raises(ValueError, match="got KVCache"):
        model(_tokens(1, 3), model.new_cache(1).layers[0])
