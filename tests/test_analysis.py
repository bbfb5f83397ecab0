"""Tests of deepseek_edu.analysis: KV-cache accounting (DeepSeek-V2 Table 1) for any ModelConfig.

Checks: the V2 Table 1 formulas per attention kind on small hand-computed configs (MHA 2·n_h·d_h·l,
GQA 2·n_g·d_h·l, MQA 2·d_h·l, MLA (d_c + d_h^R)·l) and the head widths used when a baseline kind is
applied to an MLA config; the real shapes (DeepSeek-V3: 576 × 61 = 35,136 elements = 70,272 bytes
per token in BF16; V2 and V2-Lite; MHA of V3's heads 2·128·128 per layer; MLA = GQA with 2.25
groups); the ordering MHA > GQA > MQA and MQA < MLA < GQA(8) < MHA for the DeepSeek shapes; the
bytes a real `new_cache` allocates equal the formula for every kind in fp32 and bf16; V2's 93.3%
reduction versus DeepSeek 67B (bytes as deployed: 6-bit cache against BF16; 82.2% in elements);
ValueError on a bad kind or impossible arguments.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.analysis import (
    deepseek_llm_67b_config,
    dtype_bytes,
    kv_cache_bytes_per_token,
    kv_cache_elements_per_token,
    kv_cache_elements_per_token_per_layer,
    kv_cache_reduction,
    kv_cache_reduction_v2_vs_67b,
    measured_cache_bytes,
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
