"""Conversion to and from `transformers`' DeepseekV3 / DeepseekV2 models: config, weights, folders.

The course's `Transformer` and `transformers`' `DeepseekV3ForCausalLM` compute the same function
with different names for the same tensors. This module holds **one table** (`NAME_TABLE`) from our
state-dict keys (DeepSeek's `inference/model.py` names) to the names of DeepSeek's released
checkpoints, which are also what `transformers` reads and writes with `save_pretrained`:

    ours                                  released checkpoint / transformers
    embed.weight                          model.embed_tokens.weight
    layers.{i}.attn.wkv_a.weight          model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight
    layers.{i}.ffn.experts.{j}.w1.weight  model.layers.{i}.mlp.experts.{j}.gate_proj.weight
    mtp.{k}.eh_proj.weight                model.layers.{n_layers + k}.eh_proj.weight
    ...

Everything else is a small, named step around that table:

- **Which class.** The sigmoid gate with a selection bias and top-2-sum group scores is
  `DeepseekV3ForCausalLM` (V3 §2.1.2); the softmax gate with max group scores and no normalisation
  is `DeepseekV2ForCausalLM` (V2 §2.2). `hf_config` raises `ValueError` for what neither can
  express (see `unsupported_reasons`).
- **Fused experts.** `transformers` >= 5 keeps each layer's experts in memory as two 3-D tensors,
  `mlp.experts.gate_up_proj` (E, 2I, D) = [gate; up] and `mlp.experts.down_proj` (E, D, I); its
  `save_pretrained` writes them back as one tensor per expert. `to_hf` / `from_hf` fuse and split
  only when the installed model has them.
- **RoPE layout** (docs/pitfalls.md kind C). Our rotary pairs are adjacent channels (x[2j], x[2j+1]),
  DeepSeek's layout. `DeepseekV3Config.rope_interleave=True` (its default, and what we write) reads
  the same layout, and V2 rotates complex pairs as we do, so the weights are copied unchanged. With
  `rope_interleave=False` transformers pairs channel j with j + R/2 (Llama's `rotate_half`); then
  the rotary rows of the query projection and of `kv_a_proj_with_mqa` are permuted with
  `rope.interleaved_to_half` on the way out and `rope.half_to_interleaved` on the way in.
- **YaRN** (V2 §2.1, V3 §4.3). `rope_factor`, `original_seq_len`, `beta_fast`, `beta_slow` map to
  `rope_scaling` {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
  "beta_slow"}. Our `mscale` is DeepSeek's softmax-scale coefficient, transformers'
  `mscale_all_dim` (scale × (0.1·mscale_all_dim·ln s + 1)²); transformers' `mscale` additionally
  scales cos/sin by m(s, mscale) / m(s, mscale_all_dim), which is 1 only when the two are equal --
  so both are written as our `mscale` (DeepSeek's own configs: 1.0/1.0 for V3, 0.707/0.707 for V2).
  We apply YaRN only when max_seq_len > original_seq_len (DeepSeek's `precompute_freqs_cis`);
  transformers whenever the type is "yarn", so a config with a factor but no longer context is
  written without `rope_scaling`.
- **MTP** (V3 §2.2). DeepSeek's checkpoints store MTP module k as the extra decoder layer
  `model.layers.{n_layers + k}` holding `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the usual
  layer weights, and copies of the embedding (`embed_tokens`) and the head (`shared_head.head`);
  `num_nextn_predict_layers` in the config counts them. `transformers` builds no MTP layer and
  ignores those tensors when loading (tests/test_hf.py checks: no error, same logits).

`save_pretrained` / `load_pretrained` write and read a folder that `transformers` loads with
`DeepseekV3ForCausalLM.from_pretrained(folder)`: config.json, model.safetensors (never pickle; no
`trust_remote_code`), and deepseek_edu.json with our whole `ModelConfig` (the training-only fields
such as `bias_update_speed` have no `transformers` equivalent).
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig
from .model import Transformer
from .rope import half_to_interleaved, interleaved_to_half

WEIGHTS_NAME = "model.safetensors"  # transformers' file name for an unsharded checkpoint
INDEX_NAME = "model.safetensors.index.json"  # ... and the index of a sharded one
CONFIG_NAME = "config.json"
OURS_NAME = "deepseek_edu.json"  # our full ModelConfig, next to transformers' config.json
TRANSFORMERS_NORM_EPS = 1e-6  # eps of transformers' q_a_layernorm / kv_a_layernorm (not rms_norm_eps)

# --- the one name table ------------------------------------------------------------------------
# (scope, our key, checkpoint key, rotary rows). Scopes: "model" keys are used as they are; "layer" keys
# sit under `layers.{i}.` (ours) and `model.layers.{i}.` (theirs); "mtp" keys under `mtp.{k}.` and
# `model.layers.{n_layers + k}.`; "layer" keys also serve inside an MTP module as `mtp.{k}.block.<key>`.
# {j} is an expert index. The last column names the rows that carry rotary channels (see `_rope_rows`).
NAME_TABLE: list[tuple[str, str, str, str | None]] = [
    ("model", "embed.weight", "model.embed_tokens.weight", None),
    ("model", "norm.weight", "model.norm.weight", None),
    ("model", "head.weight", "lm_head.weight", None),
    ("layer", "attn_norm.weight", "input_layernorm.weight", None),
    ("layer", "attn.wq.weight", "self_attn.q_proj.weight", "q"),
    ("layer", "attn.wq_a.weight", "self_attn.q_a_proj.weight", None),
    ("layer", "attn.q_norm.weight", "self_attn.q_a_layernorm.weight", None),
    ("layer", "attn.wq_b.weight", "self_attn.q_b_proj.weight", "q"),
    ("layer", "attn.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight", "kv"),
    ("layer", "attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight", None),
    ("layer", "attn.wkv_b.weight", "self_attn.kv_b_proj.weight", None),
    ("layer", "attn.wo.weight", "self_attn.o_proj.weight", None),
    ("layer", "ffn_norm.weight", "post_attention_layernorm.weight", None),
    ("layer", "ffn.w1.weight", "mlp.gate_proj.weight", None),  # dense SwiGLU: w1 gate, w3 up, w2 down
    ("layer", "ffn.w3.weight", "mlp.up_proj.weight", None),
    ("layer", "ffn.w2.weight", "mlp.down_proj.weight", None),
    ("layer", "ffn.gate.weight", "mlp.gate.weight", None),
    ("layer", "ffn.gate.bias", "mlp.gate.e_score_correction_bias", None),  # V3 only: selection bias
    ("layer", "ffn.experts.{j}.w1.weight", "mlp.experts.{j}.gate_proj.weight", None),
    ("layer", "ffn.experts.{j}.w3.weight", "mlp.experts.{j}.up_proj.weight", None),
    ("layer", "ffn.experts.{j}.w2.weight", "mlp.experts.{j}.down_proj.weight", None),
    ("layer", "ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", None),
    ("layer", "ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", None),
    ("layer", "ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", None),
    ("mtp", "enorm.weight", "enorm.weight", None),  # RMSNorm of the embedding of token i + k + 1
    ("mtp", "hnorm.weight", "hnorm.weight", None),  # RMSNorm of the previous depth's hidden state
    ("mtp", "eh_proj.weight", "eh_proj.weight", None),  # (D, 2D), input [enorm(emb); hnorm(h)]
    ("mtp", "norm.weight", "shared_head.norm.weight", None),
]
# config.json fields that fix the weights' shapes and the function (checked against deepseek_edu.json).
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "first_k_dense_replace", "n_group", "topk_group",
                "routed_scaling_factor", "norm_topk_prob", "tie_word_embeddings", "max_position_embeddings",
                "rope_parameters", "rope_scaling", "rms_norm_eps", "rope_interleave",
                "num_nextn_predict_layers")
# Copies of shared tensors that DeepSeek's checkpoints repeat in every MTP layer (written, checked on read).
MTP_SHARED_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{j}"), r"(?P<j>\d+)") + "$")


_LAYER_OURS = [(_pattern(o), t, rope) for s, o, t, rope in NAME_TABLE if s == "layer"]
_LAYER_THEIRS = [(_pattern(t), o, rope) for s, o, t, rope in NAME_TABLE if s == "layer"]
_MTP_OWN = {o: t for s, o, t, _ in NAME_TABLE if s == "mtp"}
_MODEL = {o: t for s, o, t, _ in NAME_TABLE if s == "model"}


def _convert_layer_key(rest: str, table: list) -> tuple[str, str | None] | None:
    for pattern, target, rope in table:
        m = pattern.match(rest)
        if m:
            return target.replace("{j}", m.group("j")) if "j" in m.groupdict() else target, rope
    return None


def hf_key(key: str, n_layers: int) -> tuple[str, str | None]:
    """Checkpoint name of our state-dict `key`, and which rotary rows it carries ("q", "kv" or None).

    Raises:
        KeyError: for a key the table does not know.
    """
    if key in _MODEL:
        return _MODEL[key], None
    m = re.match(r"layers\.(\d+)\.(.+)$", key)
    if m and (hit := _convert_layer_key(m.group(2), _LAYER_OURS)):
        return f"model.layers.{m.group(1)}.{hit[0]}", hit[1]
    m = re.match(r"mtp\.(\d+)\.(.+)$", key)
    if m:
        layer = n_layers + int(m.group(1))
        if m.group(2) in _MTP_OWN:
            return f"model.layers.{layer}.{_MTP_OWN[m.group(2)]}", None
        b = re.match(r"block\.(.+)$", m.group(2))
        if b and (hit := _convert_layer_key(b.group(1), _LAYER_OURS)):
            return f"model.layers.{layer}.{hit[0]}", hit[1]
    raise KeyError(f"no transformers name for {key!r} in hf.NAME_TABLE")


def our_key(key: str, n_layers: int) -> tuple[str, str | None] | None:
    """Our state-dict name of checkpoint `key` (inverse of `hf_key`); None for an MTP copy of a shared tensor.

    Raises:
        KeyError: for a key the table does not know.
    """
    inverse = {t: o for o, t in _MODEL.items()}
    if key in inverse:
        return inverse[key], None
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i >= n_layers:  # an MTP module
            k = i - n_layers
            if rest in MTP_SHARED_COPIES:
                return None
            own = {t: o for o, t in _MTP_OWN.items()}
            if rest in own:
                return f"mtp.{k}.{own[rest]}", None
            if hit := _convert_layer_key(rest, _LAYER_THEIRS):
                return f"mtp.{k}.block.{hit[0]}", hit[1]
        elif hit := _convert_layer_key(rest, _LAYER_THEIRS):
            return f"layers.{i}.{hit[0]}", hit[1]
    raise KeyError(f"no deepseek_edu name for {key!r} in hf.NAME_TABLE")


def _rope_rows(w: Tensor, rope: str, cfg: ModelConfig, to_half: bool) -> Tensor:
    """Permute the rotary output rows of a query (`rope="q"`) or `wkv_a` (`"kv"`) weight between layouts.

    q: (H*(N+R), in) -- the last R rows of each head; kv: (C+R, D) -- the last R rows.
    """
    move = interleaved_to_half if to_half else half_to_interleaved
    R = cfg.qk_rope_head_dim
    if rope == "q":
        w = w.view(cfg.n_heads, cfg.qk_head_dim, -1)  # (H, N+R, in)
        return torch.cat([w[:, :-R], move(w[:, -R:], dim=1)], dim=1).flatten(0, 1)
    return torch.cat([w[:-R], move(w[-R:], dim=0)], dim=0)


def to_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig, rope_interleave: bool = True,
                     mtp_copies: bool = True) -> dict[str, Tensor]:
    """Our state dict -> checkpoint names (one tensor per expert), as DeepSeek's released files.

    Args:
        state: our keys (a `Transformer` state dict; MTP keys `mtp.{k}.*` are mapped as well).
        cfg: the model's config (n_layers places the MTP layers; shapes for the RoPE permutation).
        rope_interleave: False permutes the rotary rows to transformers' half-split layout.
        mtp_copies: add each MTP layer's copies of the embedding and head (as DeepSeek's files do).
    Returns:
        dict of the same tensors (views where no permutation is needed).
    Raises:
        KeyError: on a key missing from `NAME_TABLE`.
    """
    out: dict[str, Tensor] = {}
    mtp_layers = set()
    for key, value in state.items():
        name, rope = hf_key(key, cfg.n_layers)
        if rope is not None and not rope_interleave:
            value = _rope_rows(value, rope, cfg, to_half=True)
        out[name] = value
        if key.startswith("mtp."):
            mtp_layers.add(cfg.n_layers + int(key.split(".")[1]))
    if mtp_copies:
        for layer in sorted(mtp_layers):
            for copy, ours in MTP_SHARED_COPIES.items():
                if ours in state:
                    out[f"model.layers.{layer}.{copy}"] = state[ours]
    return out


def from_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig,
                       rope_interleave: bool = True) -> dict[str, Tensor]:
    """Checkpoint names -> our state dict (inverse of `to_hf_state_dict`).

    Fused expert tensors (`mlp.experts.gate_up_proj` / `down_proj`) are split first. The MTP layers'
    copies of the embedding and head are dropped after checking that they equal the shared tensors.

    Raises:
        KeyError: on a key missing from `NAME_TABLE`.
        ValueError: if an MTP layer's copy of the embedding or head differs from the main one.
    """
    state = _split_experts(state)
    out: dict[str, Tensor] = {}
    copies: list[tuple[str, Tensor]] = []
    for key, value in state.items():
        hit = our_key(key, cfg.n_layers)
        if hit is None:
            copies.append((key, value))
            continue
        name, rope = hit
        if rope is not None and not rope_interleave:
            value = _rope_rows(value, rope, cfg, to_half=False)
        out[name] = value
    for key, value in copies:
        shared = MTP_SHARED_COPIES[key.split(".", 3)[3]]
        main = out.get(shared, out.get("embed.weight") if shared == "head.weight" else None)
        if main is not None and not torch.equal(main, value):
            raise ValueError(f"{key} differs from the main model's {shared}: our MTP modules share it")
    return out


def _split_experts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fused (E, 2I, D) gate_up_proj and (E, D, I) down_proj -> one tensor per expert (checkpoint form)."""
    out = {}
    for key, value in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for j, w in enumerate(value):  # w (2I, D) = [gate; up]
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}{j}.gate_proj.weight"], out[f"{prefix}{j}.up_proj.weight"] = gate, up
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for j, w in enumerate(value):  # w (D, I)
                out[f"{prefix}{j}.down_proj.weight"] = w
        else:
            out[key] = value
    return out


def _fuse_experts(state: dict[str, Tensor], n_experts: int) -> dict[str, Tensor]:
    """One tensor per expert -> transformers' in-memory (E, 2I, D) gate_up_proj and (E, D, I) down_proj."""
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    prefixes = sorted({k.split("mlp.experts.")[0] for k in state if ".mlp.experts." in k})
    for p in prefixes:
        e = f"{p}mlp.experts."
        gate_up = [torch.cat([state[f"{e}{j}.gate_proj.weight"], state[f"{e}{j}.up_proj.weight"]])  # (2I, D)
                   for j in range(n_experts)]
        out[e + "gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, D)
        out[e + "down_proj"] = torch.stack([state[f"{e}{j}.down_proj.weight"] for j in range(n_experts)])
    return out


# --- configs -------------------------------------------------------------------------------------


def _hf_classes(kind: str):
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is in requirements.txt
        raise ImportError("deepseek_edu.hf needs `transformers` (pip install 'transformers>=4.57')") from exc
    if kind == "v3":
        return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM


def hf_kind(cfg: ModelConfig) -> str:
    """Which transformers class fits: "v3" (sigmoid gate, or a dense model) or "v2" (softmax gate)."""
    return "v2" if cfg.uses_moe and cfg.score_func == "softmax" else "v3"


def unsupported_reasons(cfg: ModelConfig) -> list[str]:
    """Why `transformers`' DeepseekV3/V2 cannot express `cfg` (empty list: it can).

    The rules, each checked against the installed modeling code:
    attention must be MLA; norm_eps must be 1e-6 (transformers builds the q/kv latent norms with its
    default eps, not rms_norm_eps); the V3 router always scores with a sigmoid and sums the top two
    scores of a group (it needs >= 2 experts per group, also with one group); the V2 router uses a
    softmax, the max of a group, never normalises the chosen weights and has no selection bias;
    DeepseekV2Config requires dim % n_heads == 0 and has no MTP field.
    """
    r = []
    if cfg.attention != "mla":
        r.append(f"attention={cfg.attention!r}: transformers' DeepseekV3/V2 implement MLA only "
                 f"(attention='mla')")
    if cfg.norm_eps != TRANSFORMERS_NORM_EPS:
        r.append(f"norm_eps={cfg.norm_eps}: transformers' q_a_layernorm/kv_a_layernorm use eps=1e-6 whatever "
                 f"rms_norm_eps says")
    if not cfg.uses_moe:
        return r
    E, G = cfg.n_routed_experts, cfg.n_expert_groups
    if cfg.score_func == "sigmoid":
        if cfg.group_score == "max" and G > 1:
            r.append("score_func='sigmoid' with group_score='max': DeepseekV3's router sums the top two "
                     "scores of each group (group_score='top2_sum')")
        if E // G < 2:
            r.append(f"n_routed_experts={E} / n_expert_groups={G} < 2: DeepseekV3's router takes the top two "
                     f"scores of every group")
    else:
        if cfg.norm_topk_prob:
            r.append("score_func='softmax' with norm_topk_prob=True: DeepseekV2's router never normalises "
                     "the chosen weights (and DeepseekV3's only scores with a sigmoid)")
        if cfg.group_score == "top2_sum" and G > 1:
            r.append("score_func='softmax' with group_score='top2_sum': DeepseekV2's group-limited router "
                     "scores a group by its max")
        if cfg.dim % cfg.n_heads:
            r.append(f"dim={cfg.dim} is not divisible by n_heads={cfg.n_heads} "
                     f"(DeepseekV2Config requires it)")
        if cfg.n_mtp_depth:
            r.append(f"n_mtp_depth={cfg.n_mtp_depth}: DeepseekV2Config has no num_nextn_predict_layers")
    return r


def _check_expressible(cfg: ModelConfig) -> None:
    reasons = unsupported_reasons(cfg)
    if reasons:
        raise ValueError("transformers cannot express this ModelConfig: " + "; ".join(reasons))


def _uses_yarn(cfg: ModelConfig) -> bool:
    return cfg.max_seq_len > cfg.original_seq_len and cfg.rope_factor > 1  # as rope.yarn_inv_freq


def hf_config(cfg: ModelConfig, rope_interleave: bool = True):
    """The `transformers` config of a model built from `cfg`.

    Args:
        cfg: an MLA config `transformers` can express (`unsupported_reasons`).
        rope_interleave: V3 only; True keeps DeepSeek's interleaved rotary layout (weights unchanged).
    Returns:
        `DeepseekV3Config` (sigmoid gate or dense) or `DeepseekV2Config` (softmax gate). Field names:
        dim -> hidden_size, n_layers -> num_hidden_layers, n_heads -> num_attention_heads (and
        num_key_value_heads), inter_dim -> intermediate_size, moe_inter_dim -> moe_intermediate_size,
        n_activated_experts -> num_experts_per_tok, n_expert_groups -> n_group, n_limited_groups ->
        topk_group, route_scale -> routed_scaling_factor, n_dense_layers -> first_k_dense_replace
        (n_layers for a dense model), q_lora_rank 0 -> None, max_seq_len -> max_position_embeddings,
        norm_eps -> rms_norm_eps, init_std -> initializer_range, tie_embeddings ->
        tie_word_embeddings, n_mtp_depth -> num_nextn_predict_layers, YaRN -> rope_scaling.
    Raises:
        ValueError: listing every reason `transformers` cannot express `cfg`.
    """
    _check_expressible(cfg)
    kind = hf_kind(cfg)
    config_cls, _ = _hf_classes(kind)
    rope_scaling = None
    if _uses_yarn(cfg):
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": float(cfg.rope_factor),
                        "original_max_position_embeddings": cfg.original_seq_len,
                        "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                        "mscale": float(cfg.mscale), "mscale_all_dim": float(cfg.mscale)}
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu", attention_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if cfg.uses_moe:
        kw.update(n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                  num_experts_per_tok=cfg.n_activated_experts, moe_intermediate_size=cfg.moe_inter_dim,
                  n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
                  routed_scaling_factor=float(cfg.route_scale), first_k_dense_replace=cfg.n_dense_layers,
                  norm_topk_prob=cfg.norm_topk_prob)
    else:  # every block dense
        kw.update(first_k_dense_replace=cfg.n_layers, n_routed_experts=1, n_shared_experts=0,
                  num_experts_per_tok=1, n_group=1, topk_group=1)
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta),
                                 **(rope_scaling or {})}
        kw["rope_parameters"].pop("type", None)
    else:  # transformers 4.x: rope_theta and rope_scaling
        kw.update(rope_theta=float(cfg.rope_theta), rope_scaling=rope_scaling)
    if kind == "v3":
        kw.update(rope_interleave=rope_interleave, num_nextn_predict_layers=cfg.n_mtp_depth)
    else:
        groups = cfg.uses_moe and cfg.n_expert_groups > 1
        kw.update(topk_method="group_limited_greedy" if groups else "greedy")
    hf = config_cls(**kw)
    hf.architectures = [f"Deepseek{kind.upper()}ForCausalLM"]
    return hf


def _rope_dict(hf) -> dict[str, Any]:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    return dict(params)


def config_from_hf(hf, **training_fields: Any) -> ModelConfig:
    """Our `ModelConfig` from a `transformers` DeepseekV3Config / DeepseekV2Config (inverse of `hf_config`).

    Args:
        hf: the transformers config (e.g. `model.config`).
        training_fields: values for fields transformers does not carry (bias_update_speed,
            seq_aux_loss_alpha, mtp_loss_weight, ...); defaults otherwise.
    Returns:
        a validated `ModelConfig` with attention="mla".
    Raises:
        ValueError: for a model_type other than deepseek_v3/deepseek_v2, attention or MLP biases, an
            activation other than SiLU, attention dropout, moe_layer_freq != 1, a V3 topk_method other
            than noaux_tc or scoring_func other than sigmoid, a V2 scoring_func other than softmax or
            norm_topk_prob=True, num_key_value_heads != num_attention_heads, a RoPE type other
            than default/yarn, YaRN that our rotary code cannot reproduce (mscale != mscale_all_dim, an
            explicit attention_factor, no context extension), or a V2 topk_method we do not know.
    """
    kind = {"deepseek_v3": "v3", "deepseek_v2": "v2"}.get(getattr(hf, "model_type", None))
    e = []
    if kind is None:
        raise ValueError(f"model_type={getattr(hf, 'model_type', None)!r}: expected 'deepseek_v3' or "
                         f"'deepseek_v2'")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        e.append("attention_bias/mlp_bias=True: our projections have no bias")
    if getattr(hf, "hidden_act", "silu") != "silu":
        e.append(f"hidden_act={hf.hidden_act!r}: our SwiGLU uses SiLU")
    if float(getattr(hf, "attention_dropout", 0.0) or 0.0) != 0.0:
        e.append(f"attention_dropout={hf.attention_dropout}: our attention has no dropout")
    if (getattr(hf, "moe_layer_freq", 1) or 1) != 1:
        e.append(f"moe_layer_freq={hf.moe_layer_freq}: every layer from first_k_dense_replace on is MoE here")
    # Fields DeepSeek's own config.json carries and transformers' modeling code fixes: accepted only at
    # the value both agree on, so that the model we build computes what the config says.
    expected = {"v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
                "v2": {"scoring_func": "softmax"}}[kind]
    for name, value in expected.items():
        if getattr(hf, name, value) != value:
            e.append(f"{name}={getattr(hf, name)!r}: a {hf.model_type} router uses {name}={value!r}")
    if kind == "v2" and getattr(hf, "norm_topk_prob", False):
        e.append("norm_topk_prob=True: DeepseekV2's router never normalises the top-k weights (transformers "
                 "ignores the field), so the config asks for what no V2 model computes")
    if (hf.num_key_value_heads or hf.num_attention_heads) != hf.num_attention_heads:
        e.append(f"num_key_value_heads={hf.num_key_value_heads} != "
                 f"num_attention_heads={hf.num_attention_heads}")
    rope = _rope_dict(hf)
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    yarn: dict[str, Any] = {}
    if rope_type == "yarn":
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if not mscale or mscale != mscale_all or rope.get("attention_factor") not in (None, 1, 1.0):
            e.append(f"yarn mscale={mscale}, mscale_all_dim={mscale_all}, attention_factor="
                     f"{rope.get('attention_factor')}: we scale the softmax by (0.1·mscale·ln s + 1)² and "
                     f"never cos/sin, which needs mscale == mscale_all_dim and no attention_factor")
        if rope.get("truncate", True) is False:
            e.append("yarn truncate=False: our correction range is truncated (DeepSeek's code)")
        original = rope.get("original_max_position_embeddings", hf.max_position_embeddings)
        if hf.max_position_embeddings <= original:
            e.append(f"yarn with max_position_embeddings={hf.max_position_embeddings} <= "
                     f"original_max_position_embeddings={original}: we apply YaRN only to a longer context")
        yarn = dict(rope_factor=float(rope["factor"]), original_seq_len=int(original),
                    beta_fast=int(rope.get("beta_fast") or 32), beta_slow=int(rope.get("beta_slow") or 1),
                    mscale=float(mscale or 1.0))
    elif rope_type != "default":
        e.append(f"rope_type={rope_type!r}: only 'default' and 'yarn' are supported")
    n_layers = hf.num_hidden_layers
    moe: dict[str, Any] = dict(n_routed_experts=0, n_shared_experts=0, n_activated_experts=0,
                               n_dense_layers=n_layers)
    if (hf.first_k_dense_replace or 0) < n_layers and hf.n_routed_experts:
        groups, limited = hf.n_group or 1, hf.topk_group or 1
        if kind == "v2":
            method = getattr(hf, "topk_method", "greedy")
            if method == "greedy":
                groups = limited = 1
            elif method != "group_limited_greedy":
                e.append(f"topk_method={method!r}: expected 'greedy' or 'group_limited_greedy'")
        moe = dict(n_routed_experts=hf.n_routed_experts, n_shared_experts=hf.n_shared_experts or 0,
                   n_activated_experts=hf.num_experts_per_tok, moe_inter_dim=hf.moe_intermediate_size,
                   n_dense_layers=hf.first_k_dense_replace or 0, n_expert_groups=groups,
                   n_limited_groups=limited,
                   route_scale=float(hf.routed_scaling_factor),
                   score_func="sigmoid" if kind == "v3" else "softmax",
                   group_score="top2_sum" if kind == "v3" else "max",
                   norm_topk_prob=bool(hf.norm_topk_prob) if kind == "v3" else False)
        if kind == "v2":
            moe["bias_update_speed"] = 0.0  # V2 has no selection bias to update
    if e:
        raise ValueError("cannot express this transformers config as a ModelConfig: " + "; ".join(e))
    values = dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=n_layers, n_heads=hf.num_attention_heads,
        max_seq_len=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps, init_std=hf.initializer_range,
        tie_embeddings=bool(hf.tie_word_embeddings), attention="mla", q_lora_rank=hf.q_lora_rank or 0,
        kv_lora_rank=hf.kv_lora_rank, qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim, inter_dim=hf.intermediate_size, rope_theta=float(theta),
        n_mtp_depth=int(getattr(hf, "num_nextn_predict_layers", 0) or 0) if kind == "v3" else 0,
    )
    values.update(yarn)
    values.update(moe)
    values.update(training_fields)
    return ModelConfig(**values)


# --- models --------------------------------------------------------------------------------------


def _gate_bias_check(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    if hf_kind(cfg) == "v2":
        for key, value in state.items():
            if key.endswith("ffn.gate.bias") and bool(value.ne(0).any()):
                raise ValueError(f"{key} is nonzero, but DeepseekV2's softmax router has no selection bias "
                                 f"(train with bias_update_speed=0 or use score_func='sigmoid')")


def _main_state(model: Transformer) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}


def to_hf(model: Transformer, rope_interleave: bool = True):
    """A `transformers` model holding `model`'s weights (same logits; MTP modules left out).

    Args:
        model: our `Transformer` (attention="mla").
        rope_interleave: V3 only; False stores the rotary rows in transformers' half-split layout.
    Returns:
        `DeepseekV3ForCausalLM` (sigmoid gate or dense) or `DeepseekV2ForCausalLM` (softmax gate),
        in eval mode, in the dtype of `model.embed.weight` except the routers (fp32, weight and bias).
    Raises:
        ValueError: if transformers cannot express the config (`unsupported_reasons`), or a softmax
            gate carries a nonzero selection bias (V2 has none).
    """
    cfg = model.cfg
    config = hf_config(cfg, rope_interleave)
    _, model_cls = _hf_classes(hf_kind(cfg))
    with warnings.catch_warnings():  # zero-width shared experts (n_shared_experts=0): nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        hf = model_cls(config)
    ours = _main_state(model)
    _gate_bias_check(ours, cfg)
    state = to_hf_state_dict(ours, cfg, rope_interleave=rope_interleave)
    if hf_kind(cfg) == "v2":
        state = {k: v for k, v in state.items() if not k.endswith("e_score_correction_bias")}
    expected = hf.state_dict()
    if any(k.endswith("mlp.experts.gate_up_proj") for k in expected):
        state = _fuse_experts(state, cfg.n_routed_experts)
    for key, value in expected.items():  # zero-width shared experts (n_shared_experts=0) hold no numbers
        if key not in state and value.numel() == 0:
            state[key] = value
    hf.load_state_dict(state, strict=True)
    # Routers stay fp32, as ours (a bf16 bias loses 1e-3 steps): keep their fp32 tensors across the cast.
    routers = {n: (m, {k: v.clone() for k, v in m.state_dict().items()})
               for n, m in hf.named_modules() if n.endswith("mlp.gate")}
    hf.to(model.embed.weight.dtype)
    for module, fp32 in routers.values():
        module.float().load_state_dict(fp32)
    return hf.eval()


def from_hf(hf_model, **training_fields: Any) -> Transformer:
    """Our `Transformer` with the weights of a `transformers` DeepseekV3/V2 causal LM.

    Args:
        hf_model: `DeepseekV3ForCausalLM` or `DeepseekV2ForCausalLM`.
        training_fields: passed to `config_from_hf`.
    Returns:
        `Transformer` in eval mode, fp32 (its default dtype). When the transformers model holds no
        MTP weights (it builds no MTP layer, whatever num_nextn_predict_layers says), n_mtp_depth is 0.
    Raises:
        ValueError: as `config_from_hf`.
    """
    cfg = config_from_hf(hf_model.config, **training_fields)
    interleave = bool(getattr(hf_model.config, "rope_interleave", True))
    state = {k: v for k, v in hf_model.state_dict().items() if v.numel() > 0 or "shared_experts" not in k}
    ours = from_hf_state_dict(state, cfg, rope_interleave=interleave)
    if not any(k.startswith("mtp.") for k in ours):
        cfg = cfg.replace(n_mtp_depth=0)
    model = Transformer(cfg)
    if cfg.uses_moe and hf_kind(cfg) == "v2":  # V2 has no selection bias: ours stays zero
        ours.update({k: v for k, v in model.state_dict().items() if k.endswith("ffn.gate.bias")})
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    return model.eval()


# --- folders -------------------------------------------------------------------------------------


def save_pretrained(model: Transformer, folder: str | Path, state: dict[str, Tensor] | None = None) -> Path:
    """Write `model` as a `transformers` folder: config.json, model.safetensors, deepseek_edu.json.

    `transformers` loads it with `DeepseekV3ForCausalLM.from_pretrained(folder)` (V2 for a softmax
    gate). Tensors use the released checkpoints' names, one per expert; a tied head is stored once
    (as transformers does); MTP modules (`mtp.{k}.*` keys) become layers n_layers + k with the
    copies of embedding and head that DeepSeek's files carry.

    Args:
        model: our `Transformer`.
        folder: created if needed; existing files of the same names are replaced.
        state: the state dict to write instead of `model.state_dict()` (same keys, plus `mtp.*`).
    Returns:
        the folder as a Path.
    Raises:
        ValueError: as `to_hf`.
    """
    import safetensors.torch

    cfg = model.cfg
    config = hf_config(cfg)
    state = model.state_dict() if state is None else state
    _gate_bias_check(state, cfg)
    tensors = to_hf_state_dict(state, cfg)
    if hf_kind(cfg) == "v2":
        tensors = {k: v for k, v in tensors.items() if not k.endswith("e_score_correction_bias")}
    if cfg.tie_embeddings:  # one storage, one name (safetensors refuses two)
        tied = ("lm_head.weight", "shared_head.head.weight")
        tensors = {k: v for k, v in tensors.items() if not k.endswith(tied)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    ours_json = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    (folder / OURS_NAME).write_text(ours_json, encoding="utf-8")
    copies = tuple(MTP_SHARED_COPIES)  # the MTP layers' copies share storage with the originals: clone them
    tensors = {k: v.detach().cpu().clone() if k.endswith(copies) else v.detach().contiguous().cpu()
               for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def read_pretrained(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Our config and state dict (our names, `mtp.*` included) from a `save_pretrained` folder.

    Reads folders written by `save_pretrained` above or by transformers' own `save_pretrained`
    (unsharded or sharded safetensors). The config comes from deepseek_edu.json when present (checked
    against config.json, which someone may have edited), else from config.json via `config_from_hf`.

    Raises:
        FileNotFoundError: if config.json or the safetensors weights are missing (no pickle fallback).
        ValueError: as `config_from_hf` / `from_hf_state_dict`, or if deepseek_edu.json and config.json
            describe different shapes.
    """
    import safetensors.torch

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_NAME} not found")
    raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    kind = {"deepseek_v3": "v3", "deepseek_v2": "v2"}.get(raw.get("model_type"))
    if kind is None:
        raise ValueError(f"{folder / CONFIG_NAME}: model_type={raw.get('model_type')!r}, "
                         f"expected deepseek_v3 or deepseek_v2")
    config_cls, _ = _hf_classes(kind)
    hf = config_cls.from_pretrained(folder)
    if (folder / OURS_NAME).is_file():
        cfg = ModelConfig.from_dict(json.loads((folder / OURS_NAME).read_text(encoding="utf-8")))
        ours, theirs = hf_config(cfg).to_dict(), hf.to_dict()
        differ = [k for k in SHAPE_FIELDS if ours.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f"{folder}: {OURS_NAME} and {CONFIG_NAME} disagree on "
                             + ", ".join(f"{k} ({ours.get(k)} vs {theirs.get(k)})" for k in differ))
    else:
        cfg = config_from_hf(hf)
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder} (only safetensors is read)")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(safetensors.torch.load_file(str(f)))
    interleave = bool(getattr(hf, "rope_interleave", True))
    state = from_hf_state_dict(tensors, cfg, rope_interleave=interleave)
    if cfg.tie_embeddings:
        state.setdefault("head.weight", state["embed.weight"])
    return cfg, state


def load_pretrained(folder: str | Path, mtp: bool = True) -> Transformer:
    """Our `Transformer` from a `save_pretrained` folder (ours or transformers').

    Args:
        folder: the folder.
        mtp: False loads the main model only: n_mtp_depth is set to 0 and MTP weights are skipped
            (e.g. a folder written by transformers, which keeps no MTP weights, of an MTP config).

    Returns:
        `Transformer` in eval mode, fp32, every key loaded strictly.
    Raises:
        FileNotFoundError / ValueError: as `read_pretrained`; ValueError if the folder holds MTP
            weights that this `Transformer` has no modules for, or lacks weights it needs.
    """
    cfg, state = read_pretrained(folder)
    if not mtp:
        cfg = cfg.replace(n_mtp_depth=0)
        state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    model = Transformer(cfg)
    wanted = model.state_dict()
    missing = sorted(k for k in wanted if k not in state and not k.endswith("ffn.gate.bias"))
    extra = sorted(k for k in state if k not in wanted)
    if missing or extra:
        mtp = " (MTP modules)" if any(k.startswith("mtp.") for k in extra) else ""
        hint = ("; a folder written by transformers keeps no MTP weights: load_pretrained(folder, mtp=False) "
                "loads the main model" if any(k.startswith("mtp.") for k in missing) else "")
        raise ValueError(f"{folder}: weights do not fit Transformer({cfg.n_layers} layers): "
                         f"missing {missing[:5]}, unexpected {extra[:5]}{mtp}{hint}")
    for k in wanted:  # V2 folders have no selection bias: ours stays zero
        state.setdefault(k, wanted[k])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
