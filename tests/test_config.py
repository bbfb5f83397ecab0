"""Tests of deepseek_edu.config: validation rules, presets, serialisation and the softmax scale.

Checks that every validation rule of `ModelConfig` and `TrainConfig` (and `TrainConfig.check_model`)
raises `ValueError` whose message names the fields involved; that every preset validates and
round-trips through `to_dict` / `from_dict` (and JSON); that unknown fields are rejected; and that
`softmax_scale` is 1/sqrt(qk_head_dim) without YaRN and is multiplied by mscale^2 with YaRN
(hand-computed for DeepSeek-V3: (0.1 ln 40 + 1)^2 / sqrt(192)), YaRN being off whenever
max_seq_len <= original_seq_len (pitfalls kind D).
"""

from __future__ import annotations

import json
import math

import pytest

from deepseek_edu.config import PRESETS, ModelConfig, TrainConfig, get_preset

# A valid MoE config to break one rule at a time: 8 experts in 4 groups of 2, 2 groups kept, top-2.
MOE = dict(n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2, n_layers=2)

# (id, kwargs that break exactly one rule, field names the message must contain)
BAD_MODEL_CONFIGS = [
    ("dim_not_divisible_by_heads", dict(dim=100, n_heads=3), ["dim=100", "n_heads=3"]),
    ("odd_head_width_derived", dict(dim=30, n_heads=10), ["head_dim", "n_heads", "dim"]),
    ("odd_head_width_explicit", dict(head_dim=33), ["head_dim"]),
    ("gqa_heads_not_divisible", dict(attention="gqa", n_heads=6, n_kv_heads=4), ["n_heads=6", "n_kv_heads=4"]),
    ("gqa_more_kv_heads_than_heads", dict(attention="gqa", n_heads=6, n_kv_heads=12),
     ["n_heads=6", "n_kv_heads=12"]),
    ("mha_with_other_kv_heads", dict(attention="mha", n_kv_heads=2), ["n_kv_heads=2", "n_heads"]),
    ("unknown_attention", dict(attention="flash"), ["attention"]),
    ("dense_layers_exceed_layers", dict(n_layers=2, n_dense_layers=3), ["n_dense_layers=3", "n_layers=2"]),
    ("bad_score_func", dict(score_func="relu"), ["score_func"]),
    ("bad_group_score", dict(group_score="mean"), ["group_score"]),
    ("experts_not_divisible_by_groups", dict(MOE, n_expert_groups=3, n_limited_groups=1),
     ["n_routed_experts=8", "n_expert_groups=3"]),
    ("kept_groups_exceed_groups", dict(MOE, n_limited_groups=5), ["n_limited_groups=5", "n_expert_groups=4"]),
    ("kept_groups_zero", dict(MOE, n_limited_groups=0), ["n_limited_groups=0"]),
    # 4 groups of 2, one group kept -> only 2 experts reachable, top-3 impossible
    ("topk_exceeds_experts_in_kept_groups", dict(MOE, n_limited_groups=1, n_activated_experts=3),
     ["n_activated_experts=3", "n_limited_groups=1"]),
    ("topk_exceeds_experts", dict(MOE, n_expert_groups=1, n_limited_groups=1, n_activated_experts=9),
     ["n_activated_experts=9", "n_routed_experts=8"]),
    ("topk_zero_with_experts", dict(MOE, n_activated_experts=0), ["n_activated_experts=0", "n_routed_experts"]),
    ("top2_sum_with_one_expert_per_group", dict(MOE, n_expert_groups=8, n_limited_groups=4, group_score="top2_sum"),
     ["group_score", "n_routed_experts=8", "n_expert_groups=8"]),
    ("beta_fast_equal_beta_slow", dict(beta_fast=4, beta_slow=4), ["beta_fast=4", "beta_slow=4"]),
    ("beta_fast_below_beta_slow", dict(beta_fast=1, beta_slow=32), ["beta_fast=1", "beta_slow=32"]),
    ("rope_factor_below_one", dict(rope_factor=0.5), ["rope_factor=0.5"]),
    ("rope_theta_not_above_one", dict(rope_theta=1.0), ["rope_theta"]),
    ("negative_mscale", dict(mscale=-1.0), ["mscale"]),
    ("negative_seq_aux_alpha", dict(seq_aux_loss_alpha=-1e-4), ["seq_aux_loss_alpha"]),
    ("negative_expert_aux_alpha", dict(expert_aux_loss_alpha=-0.01), ["expert_aux_loss_alpha"]),
    ("negative_bias_update_speed", dict(bias_update_speed=-1e-3), ["bias_update_speed"]),
    ("negative_route_scale", dict(route_scale=-2.5), ["route_scale"]),
    ("negative_mtp_loss_weight", dict(mtp_loss_weight=-0.3), ["mtp_loss_weight"]),
    ("activated_experts_without_routed", dict(n_activated_experts=2), ["n_activated_experts=2", "n_routed_experts"]),
    ("shared_experts_without_routed", dict(n_shared_experts=1), ["n_shared_experts=1", "n_routed_experts"]),
    ("zero_dim", dict(dim=0), ["dim=0"]),
    ("float_n_layers", dict(n_layers=2.0), ["n_layers"]),
    ("negative_vocab", dict(vocab_size=-5), ["vocab_size=-5"]),
    ("negative_head_dim", dict(head_dim=-2), ["head_dim=-2"]),
    ("zero_norm_eps", dict(norm_eps=0.0), ["norm_eps"]),
    ("mla_zero_kv_rank", dict(attention="mla", kv_lora_rank=0), ["kv_lora_rank=0"]),
    ("mla_odd_rope_dim", dict(attention="mla", qk_rope_head_dim=15), ["qk_rope_head_dim=15"]),
    ("mla_zero_v_head_dim", dict(attention="mla", v_head_dim=0), ["v_head_dim=0"]),
]


@pytest.mark.parametrize("kwargs, fields", [c[1:] for c in BAD_MODEL_CONFIGS],
                         ids=[c[0] for c in BAD_MODEL_CONFIGS])
def test_model_config_rule_raises_with_field_names(kwargs, fields):
    with pytest.raises(ValueError) as info:
        ModelConfig(**kwargs)
    message = str(info.value)
    for name in fields:
        assert name in message, f"message {message!r} does not name {name!r}"


def test_valid_moe_base_config_validates():
    # The base of the MoE cases above must itself be valid, or the cases prove nothing.
    cfg = ModelConfig(**MOE)
    assert cfg.uses_moe


def test_all_broken_rules_are_listed_together():
    with pytest.raises(ValueError) as info:
        ModelConfig(dim=100, n_heads=3, beta_fast=1, beta_slow=2, rope_factor=0.5)
    message = str(info.value)
    for name in ("dim=100", "beta_fast=1", "rope_factor=0.5"):
        assert name in message, f"{name!r} missing from {message!r}"


def test_replace_validates():
    with pytest.raises(ValueError, match="n_dense_layers"):
        ModelConfig().replace(n_dense_layers=99)


def test_head_dim_decouples_dim_from_heads():
    cfg = ModelConfig(dim=100, n_heads=3, head_dim=16)
    assert cfg.attn_head_dim == 16 and cfg.qk_head_dim == 16 and cfg.rope_dim == 16


@pytest.mark.parametrize("attention, n_kv_heads, expected", [
    ("mha", 0, 6), ("mha", 6, 6), ("gqa", 2, 2), ("gqa", 6, 6), ("mqa", 0, 1),
])
def test_kv_heads(attention, n_kv_heads, expected):
    assert ModelConfig(attention=attention, n_kv_heads=n_kv_heads).kv_heads == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = get_preset(name)
    cfg.validate()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_get_preset_returns_a_copy_and_rejects_unknown_names():
    cfg = get_preset("baseline")
    cfg.dim = 64  # mutate the copy
    assert PRESETS["baseline"].dim == 192
    with pytest.raises(ValueError, match="deepseek-v3"):  # lists the known presets
        get_preset("deepseek-v4")


def test_preset_shapes_match_reference_sheet():
    v3 = get_preset("deepseek-v3")
    assert (v3.vocab_size, v3.dim, v3.n_layers, v3.n_dense_layers, v3.n_heads) == (129280, 7168, 61, 3, 128)
    assert (v3.n_routed_experts, v3.n_shared_experts, v3.n_activated_experts) == (256, 1, 8)
    assert (v3.n_expert_groups, v3.n_limited_groups, v3.score_func, v3.route_scale) == (8, 4, "sigmoid", 2.5)
    assert (v3.kv_lora_rank, v3.qk_rope_head_dim, v3.qk_head_dim) == (512, 64, 192)
    v2 = get_preset("deepseek-v2")
    assert (v2.dim, v2.n_layers, v2.n_routed_experts, v2.n_activated_experts, v2.group_score) == (
        5120, 60, 160, 6, "max")
    lite = get_preset("deepseek-v2-lite")
    assert (lite.dim, lite.n_heads, lite.q_lora_rank, lite.n_routed_experts) == (2048, 16, 0, 64)


def test_from_dict_rejects_unknown_fields_by_name():
    values = ModelConfig().to_dict() | {"n_experts": 8, "hidden_size": 64}
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict(values)
    assert "n_experts" in str(info.value) and "hidden_size" in str(info.value), str(info.value)


def test_from_dict_partial_uses_defaults():
    cfg = ModelConfig.from_dict({"dim": 64, "n_heads": 4})
    assert cfg == ModelConfig(dim=64, n_heads=4)


# --- softmax scale (pitfalls kind D) --------------------------------------------------------------------

def test_softmax_scale_without_yarn():
    cfg = ModelConfig()  # mha, head 192 / 6 = 32
    assert cfg.softmax_scale == pytest.approx(1 / math.sqrt(32), rel=1e-12)
    mla = ModelConfig(attention="mla", qk_nope_head_dim=32, qk_rope_head_dim=16)
    assert mla.softmax_scale == pytest.approx(1 / math.sqrt(48), rel=1e-12)


def test_softmax_scale_deepseek_v3_with_yarn_hand_computed():
    # V3 with its 128K context (HF config: max_position_embeddings 163840, original 4096, factor 40).
    cfg = get_preset("deepseek-v3").replace(max_seq_len=163840)
    expected = (0.1 * math.log(40) + 1.0) ** 2 / math.sqrt(192)  # mscale applied squared
    assert cfg.softmax_scale == pytest.approx(expected, rel=1e-12), (cfg.softmax_scale, expected)
    # an error of the kind "mscale applied once" would be off by a factor 1.368
    assert abs(cfg.softmax_scale - expected / (0.1 * math.log(40) + 1.0)) > 0.01


def test_softmax_scale_mscale_coefficient():
    cfg = get_preset("deepseek-v2").replace(max_seq_len=163840)  # mscale 0.707
    expected = (0.1 * 0.707 * math.log(40) + 1.0) ** 2 / math.sqrt(192)
    assert cfg.softmax_scale == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("max_seq_len", [1024, 4096])
def test_yarn_off_when_context_not_extended(max_seq_len):
    cfg = get_preset("deepseek-v3").replace(max_seq_len=max_seq_len)  # original_seq_len 4096, factor 40
    assert cfg.softmax_scale == pytest.approx(1 / math.sqrt(192), rel=1e-12)


def test_yarn_off_when_factor_is_one():
    cfg = ModelConfig(max_seq_len=8192, original_seq_len=4096, rope_factor=1.0)
    assert cfg.softmax_scale == pytest.approx(1 / math.sqrt(32), rel=1e-12)


# --- TrainConfig -------------------------------------------------------------------------------

BAD_TRAIN_CONFIGS = [
    ("zero_vocab", dict(vocab_size=0), ["vocab_size=0"]),
    ("zero_seq_len", dict(seq_len=0), ["seq_len=0"]),
    ("zero_batch", dict(batch_size=0), ["batch_size=0"]),
    ("zero_steps", dict(max_steps=0), ["max_steps=0"]),
    ("zero_eval_batches", dict(eval_batches=0), ["eval_batches=0"]),
    ("negative_warmup", dict(warmup_steps=-1), ["warmup_steps=-1"]),
    ("negative_eval_every", dict(eval_every=-1), ["eval_every=-1"]),
    ("negative_save_every", dict(save_every=-1), ["save_every=-1"]),
    ("negative_threads", dict(threads=-1), ["threads=-1"]),
    ("zero_lr", dict(lr=0.0), ["lr=0.0"]),
    ("min_lr_ratio_above_one", dict(min_lr_ratio=1.5), ["min_lr_ratio=1.5"]),
    ("bad_schedule", dict(schedule="linear"), ["schedule"]),
    ("zero_decay_frac", dict(decay_frac=0.0), ["decay_frac"]),
    ("negative_weight_decay", dict(weight_decay=-0.1), ["weight_decay"]),
    ("beta1_one", dict(beta1=1.0), ["beta1"]),
    ("beta2_negative", dict(beta2=-0.5), ["beta2"]),
    ("negative_grad_clip", dict(grad_clip=-1.0), ["grad_clip"]),
    ("bad_device", dict(device="tpu"), ["device"]),
    ("warmup_exceeds_steps", dict(max_steps=10, warmup_steps=20), ["warmup_steps=20", "max_steps=10"]),
]


@pytest.mark.parametrize("kwargs, fields", [c[1:] for c in BAD_TRAIN_CONFIGS],
                         ids=[c[0] for c in BAD_TRAIN_CONFIGS])
def test_train_config_rule_raises_with_field_names(kwargs, fields):
    with pytest.raises(ValueError) as info:
        TrainConfig(**kwargs)
    message = str(info.value)
    for name in fields:
        assert name in message, f"message {message!r} does not name {name!r}"


def test_train_config_check_model():
    model = ModelConfig(vocab_size=2048, max_seq_len=256)
    TrainConfig(vocab_size=2048, seq_len=256).check_model(model)  # fits exactly
    with pytest.raises(ValueError) as info:
        TrainConfig(vocab_size=1000, seq_len=128).check_model(model)
    assert "vocab_size=1000" in str(info.value) and "vocab_size=2048" in str(info.value), str(info.value)
    with pytest.raises(ValueError) as info:
        TrainConfig(vocab_size=2048, seq_len=512).check_model(model)
    assert "seq_len=512" in str(info.value) and "max_seq_len=256" in str(info.value), str(info.value)


def test_train_config_round_trip_and_unknown_fields():
    cfg = TrainConfig(lr=1e-3, schedule="wsd")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="max_steps"):
        cfg.replace(max_steps=0)


def test_default_train_config_fits_default_model():
    TrainConfig().check_model(ModelConfig())


def test_mqa_rejects_several_kv_heads_and_bools_are_not_ints() -> None:
    with pytest.raises(ValueError, match=r"n_kv_heads=4 must be 0 or 1 when attention='mqa'"):
        ModelConfig(attention="mqa", n_kv_heads=4)
    with pytest.raises(ValueError, match=r"n_layers=True must be a positive integer"):
        ModelConfig(n_layers=True)
    with pytest.raises(ValueError, match=r"tie_embeddings=1 must be a bool"):
        ModelConfig(tie_embeddings=1)


def test_real_presets_enable_yarn_beyond_the_pretraining_context() -> None:
    v3 = get_preset("deepseek-v3")
    assert (v3.max_seq_len, v3.original_seq_len, v3.rope_factor) == (163840, 4096, 40.0)
    expected = (0.1 * math.log(40.0) + 1.0) ** 2 / math.sqrt(192)
    assert v3.softmax_scale == pytest.approx(expected, rel=1e-12)


def test_learning_rate_must_be_finite() -> None:
    for bad in (float("inf"), float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="lr=.* must be a finite number"):
            TrainConfig(lr=bad)


# --- wrong types and non-finite numbers are named, never a bare TypeError -----------------------

@pytest.mark.parametrize("field, value", [
    ("norm_eps", "x"), ("norm_eps", float("nan")), ("init_std", float("inf")), ("rope_theta", None),
    ("route_scale", True), ("mtp_loss_weight", float("-inf")), ("bias_update_speed", "0.001"),
    ("kv_lora_rank", 64.0), ("qk_rope_head_dim", 16.5), ("moe_inter_dim", "128"), ("n_expert_groups", 1.0),
    ("beta_fast", float("nan")), ("original_seq_len", None), ("score_func", 1), ("group_score", None),
    ("attention", ["mla"]),
])
def test_model_config_wrong_types_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("lr", float("nan")), ("min_lr_ratio", "0.1"), ("weight_decay", None), ("beta1", float("inf")),
    ("grad_clip", "1"), ("decay_frac", [0.2]), ("bf16", 1), ("schedule", None), ("device", 0), ("out_dir", None),
])
def test_train_config_wrong_types_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_gqa_needs_explicit_kv_heads():
    with pytest.raises(ValueError, match="attention='gqa' needs n_kv_heads >= 1"):
        ModelConfig(attention="gqa")
    assert ModelConfig(attention="gqa", n_kv_heads=2).kv_heads == 2
