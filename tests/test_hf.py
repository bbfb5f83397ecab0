"""Tests of deepseek_edu.hf: our Transformer against `transformers`' DeepseekV3/V2 on the same weights.

Checks, on small random models whose weights have a std large enough that norms, routing and the
selection bias matter: logits agree within 1e-4 (max abs, fp32) for MLA with and without query
compression, group-limited routing on and off, a random nonzero selection bias (and that routing really
depends on it), YaRN at positions beyond original_seq_len (and that it changes the logits), V2-style
softmax gates against DeepseekV2ForCausalLM (with and without groups and YaRN), a dense model with a
tied head, no shared experts, and transformers' half-split rotary layout (rope_interleave=False, rows
permuted; unpermuted rows disagree); our -> HF -> our gives identical state dicts; save_pretrained /
load_pretrained and transformers' own from_pretrained / save_pretrained read each other's folders;
greedy `generate` of transformers equals ours; the MTP part of the name table (layers n_layers + k with
enorm, hnorm, eh_proj, shared_head.*, copies of embedding and head) round-trips through a folder and
transformers ignores those tensors (no error, same logits); configs transformers cannot express raise
ValueError.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from deepseek_edu import hf  # noqa: E402
from deepseek_edu.config import get_preset  # noqa: E402
from deepseek_edu.generate import generate  # noqa: E402
from deepseek_edu.model import Transformer  # noqa: E402

hf_logging.set_verbosity_error()  # "unexpected keys" reports are part of what we test, not noise
ATOL = 1e-4  # fp32, max abs over all logits

BASE = get_preset("tiny").replace(vocab_size=97, max_seq_len=48, n_mtp_depth=0)  # 4 groups of 2, keep 2
CONFIGS = {
    "tiny-groups": BASE,
    "q-lora-no-groups": BASE.replace(q_lora_rank=24, n_expert_groups=1, n_limited_groups=1),
    "yarn": BASE.replace(max_seq_len=96, original_seq_len=24, rope_factor=4.0, mscale=0.8),
    "v2-softmax-groups": BASE.replace(score_func="softmax", group_score="max", norm_topk_prob=False,
                                      route_scale=2.0, bias_update_speed=0.0),
    "v2-softmax-greedy-qlora": BASE.replace(score_func="softmax", group_score="max", norm_topk_prob=False,
                                            n_expert_groups=1, n_limited_groups=1, q_lora_rank=16,
                                            bias_update_speed=0.0),
    "v2-softmax-yarn": BASE.replace(score_func="softmax", group_score="max", norm_topk_prob=False,
                                    bias_update_speed=0.0, max_seq_len=96, original_seq_len=24,
                                    rope_factor=8.0, mscale=0.707),
    "dense-tied": get_preset("dense-tiny").replace(vocab_size=97, max_seq_len=48, n_mtp_depth=0,
                                                   tie_embeddings=True),
    "no-shared-unnormalised": BASE.replace(n_shared_experts=0, norm_topk_prob=False, route_scale=2.5),
}


def hf_class(name):
    return transformers.DeepseekV2ForCausalLM if name.startswith("v2") else transformers.DeepseekV3ForCausalLM


def random_model(cfg, seed=0, std=0.15):
    """Our model with N(0, std) matrices, norms 1 + N(0, 0.3) and, for sigmoid gates, a N(0, 0.5) bias."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * std if p.dim() > 1 else 1 + 0.3 * noise)
        if cfg.score_func == "sigmoid":
            for moe in model.moe_layers():
                moe.gate.bias.copy_(0.5 * torch.randn(moe.gate.bias.shape, generator=g))
    return model


def tokens(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=g)


def max_diff(ours, theirs, x):
    with torch.no_grad():
        return (ours(x).logits - theirs(x).logits.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_agree_and_round_trip(name):
    cfg = CONFIGS[name]
    ours = random_model(cfg)
    theirs = hf.to_hf(ours)
    expected = hf_class(name)
    assert type(theirs) is expected
    x = tokens(cfg)
    diff = max_diff(ours, theirs, x)
    assert diff < ATOL, f"{name}: max abs logit difference {diff:.2e}"
    back = hf.from_hf(theirs)
    assert back.cfg.to_dict() == cfg.replace(**{f: getattr(back.cfg, f) for f in (
        "bias_update_speed", "seq_aux_loss_alpha", "n_dense_layers")}).to_dict()
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_model_keeps_fp32_routers():
    ours = random_model(CONFIGS["tiny-groups"]).to(torch.bfloat16)
    theirs = hf.to_hf(ours)
    gate = theirs.model.layers[1].mlp.gate
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, ours.layers[1].ffn.gate.bias)


def test_routing_depends_on_the_selection_bias():
    cfg = CONFIGS["tiny-groups"]
    ours = random_model(cfg)
    theirs = hf.to_hf(ours)
    x = tokens(cfg)
    for layer in theirs.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert max_diff(ours, theirs, x) > 1e-2, "the random bias should change which experts are chosen"


def test_yarn_changes_logits_and_mscale_is_squared():
    cfg = CONFIGS["yarn"]
    ours = random_model(cfg)
    x = tokens(cfg)
    plain = Transformer(cfg.replace(rope_factor=1.0)).eval()
    plain.load_state_dict(ours.state_dict())
    assert max_diff(ours, plain, x) > 1e-2, "YaRN should matter beyond original_seq_len"
    theirs = hf.to_hf(ours)
    rope = getattr(theirs.config, "rope_parameters", None) or theirs.config.rope_scaling
    assert rope["factor"] == 4.0 and rope["mscale"] == rope["mscale_all_dim"] == 0.8
    assert rope["original_max_position_embeddings"] == 24
    for layer in theirs.model.layers:  # softmax scale x m^2, m = 0.1 * 0.8 * ln 4 + 1
        assert layer.self_attn.scaling == pytest.approx(cfg.softmax_scale)
    m = 0.1 * 0.8 * math.log(4.0) + 1
    assert cfg.softmax_scale == pytest.approx(24 ** -0.5 * m * m)


def test_half_split_rope_layout_needs_the_row_permutation():
    cfg = CONFIGS["q-lora-no-groups"]
    ours = random_model(cfg)
    x = tokens(cfg)
    half = hf.to_hf(ours, rope_interleave=False)
    assert half.config.rope_interleave is False
    assert max_diff(ours, half, x) < ATOL
    back = hf.from_hf(half)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    unpermuted = hf.to_hf(ours)
    unpermuted.config.rope_interleave = False  # same rows read in the other layout
    assert max_diff(ours, unpermuted, x) > 1e-3


def test_from_hf_of_an_mtp_config_holds_the_main_model():
    ours = random_model(CONFIGS["tiny-groups"].replace(n_mtp_depth=1))
    theirs = hf.to_hf(ours)
    assert theirs.config.num_nextn_predict_layers == 1  # the config says so, but no MTP weights exist
    back = hf.from_hf(theirs)
    assert back.cfg.n_mtp_depth == 0
    main = {k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in main.items())


def test_greedy_generate_matches_transformers():
    cfg = CONFIGS["tiny-groups"]
    ours = random_model(cfg, std=0.2)
    theirs = hf.to_hf(ours)
    prompt = tokens(cfg, batch=1)[:, :7]
    mine = generate(ours, prompt, max_new_tokens=10)
    with torch.no_grad():
        their_ids = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                    do_sample=False, pad_token_id=0)
    assert mine.tolist() == their_ids.tolist()


def test_save_pretrained_load_pretrained_and_transformers_reads_it(tmp_path):
    cfg = CONFIGS["tiny-groups"]
    ours = random_model(cfg)
    folder = hf.save_pretrained(ours, tmp_path / "ours")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    back = hf.load_pretrained(folder)
    assert back.cfg == cfg
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder)
    x = tokens(cfg)
    assert max_diff(ours, theirs, x) < ATOL
    # and the other way: transformers' own save_pretrained folder (no deepseek_edu.json)
    theirs.save_pretrained(tmp_path / "theirs")
    again = hf.load_pretrained(tmp_path / "theirs")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_edited_config_json_is_caught(tmp_path):
    folder = hf.save_pretrained(random_model(CONFIGS["tiny-groups"]), tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["routed_scaling_factor"] = 2.5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        hf.load_pretrained(folder)


def test_save_pretrained_v2_and_tied(tmp_path):
    for name in ("v2-softmax-groups", "dense-tied"):
        ours = random_model(CONFIGS[name])
        folder = hf.save_pretrained(ours, tmp_path / name)
        cls = hf_class(name)
        assert max_diff(ours, cls.from_pretrained(folder), tokens(CONFIGS[name])) < ATOL
        back = hf.load_pretrained(folder)
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
        if name == "dense-tied":
            assert back.head.weight is back.embed.weight


def test_mtp_names_round_trip_and_transformers_ignores_them(tmp_path):
    cfg = CONFIGS["tiny-groups"].replace(n_mtp_depth=1)
    ours = random_model(cfg)
    assert any(k.startswith("mtp.0.") for k in ours.state_dict())  # the real MTP module, randomised
    full = ours.state_dict()
    L = cfg.n_layers
    names = hf.to_hf_state_dict(full, cfg)
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight",
                "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight",
                "mlp.shared_experts.up_proj.weight", "input_layernorm.weight"):
        assert f"model.layers.{L}.{key}" in names, key
    assert names[f"model.layers.{L}.eh_proj.weight"].shape == (cfg.dim, 2 * cfg.dim)
    assert torch.equal(names[f"model.layers.{L}.shared_head.head.weight"], ours.head.weight)
    assert hf.from_hf_state_dict(names, cfg).keys() == full.keys()

    folder = hf.save_pretrained(ours, tmp_path / "mtp", state=full)
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1
    read_cfg, state = hf.read_pretrained(folder)
    assert read_cfg == cfg and state.keys() == full.keys()
    assert all(torch.equal(state[k], v) for k, v in full.items())
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder)  # extra layer L: ignored, no error
    assert len(theirs.model.layers) == L
    assert max_diff(ours, theirs, tokens(cfg)) < ATOL
    main_only = hf.load_pretrained(folder, mtp=False)  # the main model, MTP weights skipped
    assert main_only.cfg.n_mtp_depth == 0
    assert main_only.state_dict().keys() == {k for k in full if not k.startswith("mtp.")}
    assert all(torch.equal(v, full[k]) for k, v in main_only.state_dict().items())
    loaded = hf.load_pretrained(folder)  # the MTP module too, as the released checkpoints' extra layer
    assert loaded.state_dict().keys() == full.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
    x = tokens(cfg)
    with torch.no_grad():
        a, b = ours.eval()(x), loaded(x)
    assert len(a.mtp_logits) == len(b.mtp_logits) == 1 and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_mtp_copy_that_differs_is_rejected():
    cfg = CONFIGS["tiny-groups"].replace(n_mtp_depth=1)
    ours = random_model(cfg)
    names = hf.to_hf_state_dict(ours.state_dict(), cfg)  # holds the MTP module's weights
    names[f"model.layers.{cfg.n_layers}.embed_tokens.weight"] = names["model.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="embed_tokens"):
        hf.from_hf_state_dict(names, cfg)


@pytest.mark.parametrize("changes, match", [
    (dict(attention="mha", dim=96, n_heads=4), "attention='mha'"),
    (dict(group_score="max"), "group_score='max'"),
    (dict(score_func="softmax", group_score="max", norm_topk_prob=True), "never normalises"),
    (dict(score_func="softmax", group_score="top2_sum", norm_topk_prob=False), "by its max"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(n_routed_experts=4, n_activated_experts=1, n_expert_groups=4, n_limited_groups=1,
          group_score="max"),
     "< 2"),
])
def test_inexpressible_configs_raise(changes, match):
    cfg = BASE.replace(**changes)
    assert hf.unsupported_reasons(cfg)
    with pytest.raises(ValueError, match=match):
        hf.hf_config(cfg)


def test_v2_gate_with_a_bias_is_rejected():
    model = random_model(CONFIGS["v2-softmax-groups"])
    model.moe_layers()[0].gate.bias.fill_(0.1)
    with pytest.raises(ValueError, match="selection bias"):
        hf.to_hf(model)


def test_config_inverse_rejects_what_we_cannot_compute():
    config = hf.hf_config(CONFIGS["yarn"])
    rope = dict(config.rope_parameters if hasattr(config, "rope_parameters") else config.rope_scaling)
    rope["mscale_all_dim"] = 1.0  # cos/sin would be scaled by m(s, 0.8) / m(s, 1.0)
    setattr(config, "rope_parameters" if hasattr(config, "rope_parameters") else "rope_scaling", rope)
    with pytest.raises(ValueError, match="mscale"):
        hf.config_from_hf(config)
    c = CONFIGS["yarn"]
    training = dict(bias_update_speed=c.bias_update_speed, seq_aux_loss_alpha=c.seq_aux_loss_alpha)
    assert hf.config_from_hf(hf.hf_config(c), **training) == c


def test_real_configs_map_to_released_field_values():
    v3 = hf.hf_config(get_preset("deepseek-v3"))
    shape = (v3.hidden_size, v3.num_hidden_layers, v3.first_k_dense_replace, v3.n_group, v3.topk_group)
    assert shape == (7168, 61, 3, 8, 4)
    assert (v3.routed_scaling_factor, v3.num_nextn_predict_layers, v3.q_lora_rank) == (2.5, 1, 1536)
    v2_lite = hf.hf_config(get_preset("deepseek-v2-lite"))
    assert type(v2_lite).__name__ == "DeepseekV2Config" and v2_lite.q_lora_rank is None
    assert v2_lite.topk_method == "greedy"
    assert hf.hf_config(get_preset("deepseek-v2")).topk_method == "group_limited_greedy"
    assert hf.config_from_hf(v3).to_dict() == get_preset("deepseek-v3").replace(mtp_loss_weight=0.3).to_dict()


@pytest.mark.parametrize("preset, field, value, match", [
    ("deepseek-v3", "attention_bias", True, "attention_bias"),
    ("deepseek-v3", "mlp_bias", True, "mlp_bias"),
    ("deepseek-v3", "hidden_act", "gelu", "hidden_act"),
    ("deepseek-v3", "attention_dropout", 0.1, "attention_dropout"),
    ("deepseek-v3", "moe_layer_freq", 2, "moe_layer_freq"),
    ("deepseek-v3", "topk_method", "greedy", "topk_method"),
    ("deepseek-v3", "scoring_func", "softmax", "scoring_func"),
    ("deepseek-v3", "num_key_value_heads", 8, "num_key_value_heads"),
    ("deepseek-v2", "scoring_func", "sigmoid", "scoring_func"),
    ("deepseek-v2", "norm_topk_prob", True, "norm_topk_prob"),
    ("deepseek-v2", "topk_method", "noaux_tc", "topk_method"),
])
def test_every_field_we_cannot_compute_is_refused_by_name(preset, field, value, match):
    config = hf.hf_config(get_preset(preset))
    assert hf.config_from_hf(config).to_dict()  # the unedited config maps
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf(config)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "longrope", "llama3"])
def test_rope_types_we_do_not_implement_are_refused(rope_type):
    config = hf.hf_config(get_preset("deepseek-v3"))
    attr = "rope_parameters" if hasattr(config, "rope_parameters") else "rope_scaling"
    rope = dict(getattr(config, attr) or {})
    rope.update(rope_type=rope_type, type=rope_type, factor=2.0)
    setattr(config, attr, rope)
    with pytest.raises(ValueError, match="rope_type"):
        hf.config_from_hf(config)


def test_matching_fields_map_exactly():
    for preset in ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite"):
        cfg = get_preset(preset)
        config = hf.hf_config(cfg)
        back = hf.config_from_hf(config)
        for name in ("n_expert_groups", "n_limited_groups", "n_dense_layers", "route_scale", "norm_topk_prob",
                     "score_func", "tie_embeddings", "rope_theta", "rope_factor", "n_routed_experts"):
            assert getattr(back, name) == getattr(cfg, name), (preset, name)
