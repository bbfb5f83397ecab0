"""Tests of deepseek_edu.analysis: KV-cache accounting (DeepSeek-V2 Table 1) for any ModelConfig.

Checks: the V2 Table 1 formulas per attention kind on small hand-computed configs (MHA 2·n_h·d_h·l,
GQA 2·n_g·d_h·l, MQA 2·d_h·l, MLA (d_c + d_h^R)·l) and the head widths used when a baseline kind is
applied to an MLA config; the real shapes (DeepSeek-V3: 576 × 61 = 35,136 elements = 70,272 bytes
per token in BF16; V2 and V2-Lite; MHA of V3's heads 2·128·128 per layer; MLA = GQA with 2.25
groups); the ordering MHA > GQA > MQA and MQA < MLA < GQA(8) < MHA for the DeepSeek shapes; the
bytes a real `new_cache` allocates equal the formula for every kind in fp32 and bf16; V2's 93.3%
reduction versus DeepSeek 67B (bytes as deployed: 6-bit cache against BF16; 82.2% in elements);
ValueError on a bad kind or impossible arguments.
Parameter and FLOP accounting (`count_params`): V3's 671.03B total / 37.55B activated (36.63B without
the embedding) and its ~11.6B MTP module, V2's 235.74B / 21.38B, exact agreement with
`Transformer(cfg).num_parameters()` for small configs of every kind (MLA with and without query
compression, MHA/GQA/MQA, dense and MoE, tied head), a hand-computed MoE block, and training FLOPs
per token at 4K (3 × forward: V3 ≈ 250 GFLOPs, V2 ≈ 155 GFLOPs).
"""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.analysis import (
    count_params,
    deepseek_llm_67b_config,
    dtype_bytes,
    flops_per_token,
    kv_cache_bytes_per_token,
    kv_cache_elements_per_token,
    kv_cache_elements_per_token_per_layer,
    kv_cache_reduction,
    kv_cache_reduction_v2_vs_67b,
    measured_cache_bytes,
    mtp_module_params,
)
from deepseek_edu.config import ModelConfig, get_preset
from deepseek_edu.model import Transformer

SMALL = dict(vocab_size=61, dim=64, n_layers=3, n_heads=8, inter_dim=64, max_seq_len=16)


def test_v3_cache_per_token():
    v3 = get_preset("deepseek-v3")
    assert kv_cache_elements_per_token_per_layer(v3) == 512 + 64 == 576
    assert kv_cache_elements_per_token(v3) == 576 * 61 == 35_136
    assert kv_cache_bytes_per_token(v3) == 70_272  # BF16 by default
    assert kv_cache_bytes_per_token(v3, bytes_per_element=1) == 35_136  # FP8
    assert kv_cache_bytes_per_token(v3, bytes_per_element=4) == 140_544  # FP32


def test_v2_and_v2_lite_cache_per_token():
    assert kv_cache_elements_per_token(get_preset("deepseek-v2")) == 576 * 60 == 34_560
    assert kv_cache_elements_per_token(get_preset("deepseek-v2-lite")) == 576 * 27 == 15_552


def test_v3_against_baselines_of_the_same_heads():
    v3 = get_preset("deepseek-v3")
    # V2 Table 1 / §2.1: MHA with n_h = 128, d_h = 128 caches 2·128·128 = 32,768 per token per layer
    assert kv_cache_elements_per_token_per_layer(v3, "mha") == 2 * 128 * 128 == 32_768
    assert kv_cache_elements_per_token(v3, "mha") == 32_768 * 61
    assert kv_cache_elements_per_token_per_layer(v3, "gqa", n_kv_heads=8) == 2 * 8 * 128
    assert kv_cache_elements_per_token_per_layer(v3, "mqa") == 2 * 128
    # MLA = GQA with 2.25 groups (V2 Table 1: (9/2)·d_h·l with d_c = 4 d_h, d_h^R = d_h / 2)
    assert kv_cache_elements_per_token(v3, "mla") / kv_cache_elements_per_token(v3, "mqa") == 2.25
    assert kv_cache_elements_per_token_per_layer(v3) == 4.5 * 128


def test_small_config_formulas_hand_computed():
    gqa = ModelConfig(**SMALL, attention="gqa", n_kv_heads=2)  # d_h = 64 / 8 = 8, l = 3
    assert kv_cache_elements_per_token(gqa) == 2 * 2 * 8 * 3 == 96  # default kind = cfg.attention
    assert kv_cache_elements_per_token(gqa, "mha") == 2 * 8 * 8 * 3 == 384
    assert kv_cache_elements_per_token(gqa, "gqa", n_kv_heads=4) == 2 * 4 * 8 * 3 == 192
    assert kv_cache_elements_per_token(gqa, "mqa") == 2 * 8 * 3 == 48
    assert kv_cache_elements_per_token(gqa, "mha", head_dim=16) == 2 * 8 * 16 * 3 == 768
    # a baseline config evaluated as MLA uses its (default) MLA fields: d_c = 64, d_h^R = 16
    assert kv_cache_elements_per_token(gqa, "mla") == (64 + 16) * 3 == 240
    assert kv_cache_bytes_per_token(gqa, bytes_per_element=4) == 96 * 4

    mla = ModelConfig(**SMALL, attention="mla", kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4,
                      v_head_dim=10)
    assert kv_cache_elements_per_token(mla) == (12 + 4) * 3 == 48
    # baselines of the same heads: keys qk_nope_head_dim = 6 wide, values v_head_dim = 10 wide
    assert kv_cache_elements_per_token(mla, "mha") == 8 * (6 + 10) * 3 == 384
    assert kv_cache_elements_per_token(mla, "gqa", n_kv_heads=2) == 2 * (6 + 10) * 3 == 96
    assert kv_cache_elements_per_token(mla, "mqa") == (6 + 10) * 3 == 48
    assert kv_cache_elements_per_token(mla, "mha", head_dim=8) == 2 * 8 * 8 * 3 == 384


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite"])
def test_ordering(preset):
    cfg = get_preset(preset)
    mha, mqa, mla = (kv_cache_elements_per_token(cfg, k) for k in ("mha", "mqa", "mla"))
    gqa8 = kv_cache_elements_per_token(cfg, "gqa", n_kv_heads=8)
    assert mqa < mla < gqa8 <= mha, (mqa, mla, gqa8, mha)
    small = ModelConfig(**SMALL, attention="gqa", n_kv_heads=2)
    sizes = [kv_cache_elements_per_token(small, k) for k in ("mha", "gqa", "mqa")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3


KIND_CONFIGS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10),
    "mla_q_lora": dict(attention="mla", q_lora_rank=16, kv_lora_rank=7, qk_nope_head_dim=5,
                       qk_rope_head_dim=6, v_head_dim=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(KIND_CONFIGS))
def test_measured_equals_formula(name, dtype):
    cfg = ModelConfig(**SMALL, **KIND_CONFIGS[name])
    model = Transformer(cfg)
    B, T = 3, 10
    measured = measured_cache_bytes(model, B, T, dtype)
    assert measured == B * T * kv_cache_bytes_per_token(cfg, bytes_per_element=dtype_bytes(dtype))
    cache = model.new_cache(B, T, dtype=dtype)
    assert [layer.elements_per_token for layer in cache.layers] == \
        [kv_cache_elements_per_token_per_layer(cfg)] * cfg.n_layers


def test_dtype_bytes():
    assert [dtype_bytes(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [4, 2, 2]


def test_deepseek_67b_shapes():
    cfg = deepseek_llm_67b_config()
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim) == (95, 8192, 64, 8, 128)
    assert cfg.attention == "gqa"
    assert kv_cache_elements_per_token(cfg) == 2 * 8 * 128 * 95 == 194_560


def test_v2_reduction_vs_67b_is_93_3_percent_in_bytes():
    r = kv_cache_reduction_v2_vs_67b()
    print(f"\nV2 vs 67B KV cache per token: elements {r.elements} vs {r.baseline_elements} "
          f"({100 * r.element_reduction:.2f}% less); bytes {r.bytes} (6-bit) vs {r.baseline_bytes} (BF16) "
          f"({100 * r.byte_reduction:.2f}% less)")
    assert (r.baseline_elements, r.elements) == (194_560, 34_560)
    assert (r.baseline_bytes, r.bytes) == (389_120, 25_920)  # BF16: 2 bytes; 6 bits = 0.75 bytes
    assert round(100 * r.byte_reduction, 1) == 93.3  # the paper's number is in bytes as deployed
    assert round(100 * r.element_reduction, 1) == 82.2  # the architecture alone
    # the same two models both in BF16: the reduction is the element reduction
    same = kv_cache_reduction(deepseek_llm_67b_config(), get_preset("deepseek-v2"))
    assert same.byte_reduction == pytest.approx(r.element_reduction, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="MLA"), "kind="),
    (dict(kind="mla2"), "kind="),
    (dict(kind=""), "kind="),
    (dict(kind="gqa", n_kv_heads=3), "n_kv_heads=3"),  # does not divide n_heads = 8
    (dict(kind="gqa", n_kv_heads=0), "n_kv_heads=0"),
    (dict(kind="gqa", n_kv_heads=16), "n_kv_heads=16"),
    (dict(kind="gqa"), "n_kv_heads"),  # an mha config has no groups to default to
    (dict(kind="mha", n_kv_heads=2), "n_kv_heads=2"),
    (dict(kind="mqa", n_kv_heads=2), "n_kv_heads=2"),
    (dict(kind="mla", n_kv_heads=2), "n_kv_heads"),
    (dict(kind="mla", head_dim=8), "head_dim"),
    (dict(kind="mha", head_dim=0), "head_dim=0"),
])
def test_bad_arguments(kwargs, match):
    cfg = ModelConfig(**SMALL)
    with pytest.raises(ValueError, match=match):
        kv_cache_elements_per_token(cfg, **kwargs)
    with pytest.raises(ValueError, match=match):
        kv_cache_bytes_per_token(cfg, **kwargs)


def test_bad_bytes_and_mla_without_nope_width():
    cfg = ModelConfig(**SMALL)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="bytes_per_element"):
            kv_cache_bytes_per_token(cfg, bytes_per_element=bad)
    rope_only = ModelConfig(**SMALL, attention="mla", qk_nope_head_dim=0)
    with pytest.raises(ValueError, match="head_dim"):
        kv_cache_elements_per_token(rope_only, "mha")
    assert kv_cache_elements_per_token(rope_only, "mha", head_dim=8) == 2 * 8 * 8 * 3


# --- count_params -------------------------------------------------------------------------------


def test_v3_total_and_activated_parameters():
    pc = count_params(get_preset("deepseek-v3"))
    assert round(pc.total / 1e9, 2) == 671.03  # V3 §4.2: 671B total
    assert round(pc.activated / 1e9, 2) == 37.55  # 37B activated, embedding and head included
    assert round(pc.activated_non_embedding / 1e9, 2) == 36.63
    assert pc.embedding == pc.head == 129280 * 7168
    assert round(pc.mtp_total / 1e9, 1) == 11.6  # the MTP module, embedding and head shared
    assert sum(pc.parts.values()) == pc.total


def test_v2_total_and_activated_parameters():
    pc = count_params(get_preset("deepseek-v2"))
    assert round(pc.total / 1e9, 2) == 235.74  # V2: 236B total
    assert round(pc.activated / 1e9, 2) == 21.38  # 21B activated (20.85B without the input embedding)
    assert round(pc.activated_non_embedding / 1e9, 2) == 20.85
    assert pc.mtp_total == 0


def test_v2_lite_total_parameters():
    pc = count_params(get_preset("deepseek-v2-lite"))
    assert round(pc.total / 1e9, 1) == 15.7
    # V2 App. B: 2.4B activated -- the count without the input embedding (2.45B), not with it (2.66B)
    assert round(pc.activated_non_embedding / 1e9, 2) == 2.45 and round(pc.activated / 1e9, 2) == 2.66


@pytest.mark.parametrize("name", ["tiny", "dense-tiny", "baseline", "moe-tiny"])
def test_count_equals_instantiated_model(name):
    cfg = get_preset(name).replace(n_mtp_depth=0)  # MTP modules are counted separately (mtp_total)
    assert count_params(cfg).total == Transformer(cfg).num_parameters()


@pytest.mark.parametrize("changes", [
    dict(attention="mla", q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
         kv_lora_rank=16),
    dict(attention="gqa", n_kv_heads=2),
    dict(attention="mqa"),
    dict(tie_embeddings=True),
    dict(n_routed_experts=8, n_shared_experts=0, n_activated_experts=3, moe_inter_dim=16, n_dense_layers=2),
    dict(attention="mla", kv_lora_rank=16, n_routed_experts=4, n_shared_experts=2, n_activated_experts=1,
         moe_inter_dim=8, n_dense_layers=0, tie_embeddings=True),
])
def test_count_equals_instantiated_model_variants(changes):
    cfg = ModelConfig(**SMALL).replace(**changes)
    assert count_params(cfg).total == Transformer(cfg).num_parameters()


def test_hand_computed_moe_model():
    # D=8, V=10, 2 blocks: block 0 dense (I=16), block 1 MoE: E=4 routed + 1 shared of width 4, K=2;
    # MHA with 2 heads
    cfg = ModelConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, inter_dim=16, max_seq_len=8,
                      n_dense_layers=1,
                      n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=4)
    attn = 4 * 8 * 8  # wq, wk, wv, wo: (8, 8) each
    norms = 2 * 8
    expert = 3 * 8 * 4
    dense_block = norms + attn + 3 * 8 * 16
    moe_total = norms + attn + 4 * 8 + expert + 4 * expert
    moe_active = norms + attn + 4 * 8 + expert + 2 * expert
    pc = count_params(cfg)
    assert pc.total == 10 * 8 + dense_block + moe_total + 8 + 10 * 8
    assert pc.activated == 10 * 8 + dense_block + moe_active + 8 + 10 * 8
    assert pc.parts["moe"] == 4 * 8 + 5 * expert


def test_mtp_module_hand_computed_and_range():
    cfg = get_preset("tiny")  # n_mtp_depth = 1; the MTP block is numbered after the 4 main blocks: MoE
    D = cfg.dim
    total, active = mtp_module_params(cfg, 0)
    moe_block = count_params(cfg).total - count_params(cfg.replace(n_layers=3)).total  # one MoE block
    assert total == 3 * D + 2 * D * D + moe_block
    assert count_params(cfg).mtp_total == total and count_params(cfg).mtp_activated == active < total
    with pytest.raises(ValueError, match="depth=1"):
        mtp_module_params(cfg, 1)


def test_mtp_count_equals_the_real_modules():
    cfg = get_preset("tiny")  # one MTP module
    model = Transformer(cfg)
    if not hasattr(model, "mtp"):
        pytest.skip("Transformer has no MTP modules on this branch yet")
    pc = count_params(cfg)
    assert sum(p.numel() for p in model.mtp.parameters()) == pc.mtp_total
    assert model.num_parameters() == pc.total + pc.mtp_total  # embedding and head shared, counted once


def test_training_flops_per_token_at_4k():
    # forward: 2 · activated non-embedding params + attention over (4096 + 1) / 2 keys on average; training 3x
    v3 = count_params(get_preset("deepseek-v3"))
    assert v3.seq_len == 4096
    attn = 2 * 61 * 128 * (192 + 128) * (4096 + 1) / 2
    assert v3.forward_flops == pytest.approx(2 * v3.activated_non_embedding + attn)
    assert round(v3.train_flops / 1e9) == 250  # ~250 GFLOPs per training token
    assert round(count_params(get_preset("deepseek-v2")).train_flops / 1e9) == 155


def test_flops_per_token_decode_and_errors():
    cfg = get_preset("tiny")
    pc = count_params(cfg)
    assert flops_per_token(cfg, 0) == 2 * pc.activated_non_embedding
    slope = flops_per_token(cfg, 11) - flops_per_token(cfg, 10)
    assert slope == pytest.approx(2 * cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim))
    with pytest.raises(ValueError, match="context_len"):
        flops_per_token(cfg, -1)
    with pytest.raises(ValueError, match="seq_len"):
        count_params(cfg, seq_len=0)
