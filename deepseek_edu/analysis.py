"""Accounting for any `ModelConfig`: what a model costs, computed from its shapes alone.

Every function here is a small pure function of a config (no model is built, no tensor allocated),
so it applies equally to the course's tiny models and to the real DeepSeek shapes in `PRESETS`,
which are far too large to instantiate on a laptop. The one exception, `measured_cache_bytes`,
measures a real cache so that a notebook can put the formula next to the allocation.

**KV cache** (DeepSeek-V2 §2.1, Table 1). Per token and per layer, an attention kind caches:

    MHA  2 · n_h · d_h          a key and a value for every head
    GQA  2 · n_g · d_h          a key and a value for each of n_g groups of heads
    MQA  2 · d_h                one key and one value shared by all heads
    MLA  d_c + d_h^R            one latent (kv_lora_rank) + one shared rotary key (qk_rope_head_dim)

and a whole model caches that times the number of layers l. For DeepSeek-V3 (d_c = 512,
d_h^R = 64, l = 61) that is 576 · 61 = 35,136 numbers, 70,272 bytes in BF16, per token.

**Head width of a baseline kind on an MLA config.** Comparing MLA with "MHA of the same heads", V2
Table 1 uses one per-head width d_h for keys and values (V2: n_h = 128, d_h = 128, so MHA caches
2 · 128 · 128 = 32,768 numbers per token per layer). An MLA config has three per-head widths; here
the baseline's keys are `qk_nope_head_dim` wide and its values `v_head_dim` wide: the decoupled
rotary width d_h^R = `qk_rope_head_dim` is MLA's own device (V2 §2.1.3; d_h^R = d_h / 2), whereas
an MHA rotates its whole d_h-wide key. In every DeepSeek preset both widths are 128 = d_h, so this
is exactly V2's 2 · n_h · d_h. Pass `head_dim` to use one explicit width for keys and values.

Later chapters add parameter and FLOP counts here, in the same style.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ATTENTION_KINDS, ModelConfig, get_preset

BF16_BYTES = 2.0  # bytes per element of a BF16 (or FP16) cache
V2_KV_CACHE_BITS = 6.0  # DeepSeek-V2 §3.2.3: deployed KV cache quantised to ~6 bits per element on average


def _kv_widths(cfg: ModelConfig, head_dim: int | None) -> tuple[int, int]:
    """(key width, value width) per head of a baseline kind (mha/gqa/mqa) for `cfg`."""
    if head_dim is not None:
        if head_dim <= 0:
            raise ValueError(f"head_dim={head_dim} must be > 0")
        return head_dim, head_dim
    if cfg.attention != "mla":
        return cfg.attn_head_dim, cfg.attn_head_dim
    # MLA config compared with a baseline of the same heads: keys d_h = N wide, values Dv wide (module doc).
    if cfg.qk_nope_head_dim == 0:
        raise ValueError("qk_nope_head_dim=0: this MLA config has no per-head key width d_h to compare a "
                         "baseline attention kind with; pass head_dim explicitly")
    return cfg.qk_nope_head_dim, cfg.v_head_dim


def _n_kv_heads(cfg: ModelConfig, kind: str, n_kv_heads: int | None) -> int:
    """Key/value heads that `kind` caches: n_h (mha), n_g (gqa), 1 (mqa)."""
    if kind == "mha":
        if n_kv_heads not in (None, cfg.n_heads):
            raise ValueError(f"n_kv_heads={n_kv_heads} contradicts kind='mha' "
                             f"(n_heads={cfg.n_heads} KV heads)")
        return cfg.n_heads
    if kind == "mqa":
        if n_kv_heads not in (None, 1):
            raise ValueError(f"n_kv_heads={n_kv_heads} contradicts kind='mqa' (one KV head)")
        return 1
    # gqa: the argument, else the config's own groups
    if n_kv_heads is None:
        if cfg.attention == "gqa":
            n_kv_heads = cfg.kv_heads
        elif cfg.n_kv_heads:
            n_kv_heads = cfg.n_kv_heads
        else:
            raise ValueError(f"kind='gqa' on a config with attention={cfg.attention!r} and n_kv_heads=0 "
                             f"needs n_kv_heads (the number of groups n_g)")
    if not (isinstance(n_kv_heads, int) and 1 <= n_kv_heads <= cfg.n_heads and cfg.n_heads % n_kv_heads == 0):
        raise ValueError(f"n_kv_heads={n_kv_heads!r} must be a divisor of n_heads={cfg.n_heads} "
                         f"for kind='gqa'")
    return n_kv_heads


def kv_cache_elements_per_token_per_layer(cfg: ModelConfig, kind: str | None = None,
                                          n_kv_heads: int | None = None, head_dim: int | None = None) -> int:
    """Numbers one layer caches for one token (one batch row): V2 Table 1 without the factor l.

    Args:
        cfg: the model's shapes.
        kind: "mha", "gqa", "mqa" or "mla"; None = `cfg.attention`. A baseline kind applied to an
            MLA config means "the same heads with that attention" (head widths: module docstring).
        n_kv_heads: GQA's number of groups n_g; default the config's (`cfg.kv_heads` for a gqa
            config, else `cfg.n_kv_heads`). For mha/mqa it may only restate n_heads / 1.
        head_dim: one explicit per-head width for keys and values of mha/gqa/mqa (overrides the
            config's); not used by mla.
    Returns:
        int: 2·n_h·d_h (mha), 2·n_g·d_h (gqa), 2·d_h (mqa), kv_lora_rank + qk_rope_head_dim (mla);
        with keys and values of different widths, n·(d_k + d_v) in place of 2·n·d_h.
    Raises:
        ValueError: on an unknown kind, n_kv_heads that contradicts the kind or does not divide
            n_heads, head_dim <= 0, or head_dim/n_kv_heads given for kind="mla".
    """
    kind = cfg.attention if kind is None else kind
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {ATTENTION_KINDS}")
    if kind == "mla":
        if n_kv_heads is not None or head_dim is not None:
            raise ValueError("n_kv_heads and head_dim do not apply to kind='mla' (it caches one latent "
                             "and one shared rotary key, no per-head keys)")
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim  # d_c + d_h^R
    d_k, d_v = _kv_widths(cfg, head_dim)
    return _n_kv_heads(cfg, kind, n_kv_heads) * (d_k + d_v)  # = 2 · n · d_h when d_k = d_v = d_h


def kv_cache_elements_per_token(cfg: ModelConfig, kind: str | None = None,
                                n_kv_heads: int | None = None, head_dim: int | None = None) -> int:
    """Numbers cached per token over ALL layers (DeepSeek-V2 Table 1: ... · l).

    Same arguments and errors as `kv_cache_elements_per_token_per_layer`; the result is that times
    `cfg.n_layers`. DeepSeek-V3: (512 + 64) · 61 = 35,136; MHA of the same heads: 2·128·128·61.
    """
    return kv_cache_elements_per_token_per_layer(cfg, kind, n_kv_heads, head_dim) * cfg.n_layers


def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str | None = None, bytes_per_element: float = BF16_BYTES,
                             n_kv_heads: int | None = None, head_dim: int | None = None) -> float:
    """Bytes cached per token over all layers: elements (all layers) × bytes per element.

    Args:
        bytes_per_element: 2 for BF16/FP16 (default), 4 for FP32, 1 for FP8, 0.75 for a 6-bit cache.
        others: as in `kv_cache_elements_per_token_per_layer`.
    Returns:
        float bytes. DeepSeek-V3 in BF16: 35,136 × 2 = 70,272.
    Raises:
        ValueError: if bytes_per_element <= 0, or as `kv_cache_elements_per_token_per_layer`.
    """
    if not bytes_per_element > 0:
        raise ValueError(f"bytes_per_element={bytes_per_element} must be > 0")
    return kv_cache_elements_per_token(cfg, kind, n_kv_heads, head_dim) * float(bytes_per_element)


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (bf16 -> 2, fp32 -> 4), for `bytes_per_element`."""
    return torch.empty((), dtype=dtype).element_size()


def measured_cache_bytes(model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes actually allocated by `model.new_cache(batch_size, max_len, dtype)` (`ModelCache.nbytes`).

    The notebook puts this next to batch_size × max_len × `kv_cache_bytes_per_token(cfg, ...,
    dtype_bytes(dtype))`; tests/test_analysis.py checks they are equal for every attention kind.
    """
    return model.new_cache(batch_size, max_len, dtype=dtype).nbytes


# --- DeepSeek-V2's headline: 93.3% less KV cache than DeepSeek 67B ---------------------------------

def deepseek_llm_67b_config() -> ModelConfig:
    """DeepSeek LLM 67B (arXiv 2401.02954, Table 2; hub config.json): the dense GQA model V2 compares with.

    95 layers, hidden 8192, 64 query heads of width 128, GQA with 8 key/value heads, FFN 22016,
    vocabulary 102400, context 4096. For accounting only.
    """
    return ModelConfig(vocab_size=102400, dim=8192, n_layers=95, n_heads=64, attention="gqa", n_kv_heads=8,
                       head_dim=128, inter_dim=22016, max_seq_len=4096, original_seq_len=4096)


@dataclass(frozen=True)
class KVCacheReduction:
    """KV cache per token of a baseline and a new model, in elements and in bytes (all layers).

    Attributes:
        baseline_elements, elements: numbers cached per token.
        baseline_bytes, bytes: bytes cached per token at each model's bytes per element.
        element_reduction, byte_reduction: 1 - new / baseline, fractions in [0, 1).
    """

    baseline_elements: int
    elements: int
    baseline_bytes: float
    bytes: float

    @property
    def element_reduction(self) -> float:
        return 1.0 - self.elements / self.baseline_elements

    @property
    def byte_reduction(self) -> float:
        return 1.0 - self.bytes / self.baseline_bytes


def kv_cache_reduction(baseline: ModelConfig, cfg: ModelConfig,
                       baseline_bytes_per_element: float = BF16_BYTES,
                       bytes_per_element: float = BF16_BYTES) -> KVCacheReduction:
    """How much less KV cache per token `cfg` needs than `baseline`, each with its own attention kind."""
    return KVCacheReduction(
        baseline_elements=kv_cache_elements_per_token(baseline),
        elements=kv_cache_elements_per_token(cfg),
        baseline_bytes=kv_cache_bytes_per_token(baseline, bytes_per_element=baseline_bytes_per_element),
        bytes=kv_cache_bytes_per_token(cfg, bytes_per_element=bytes_per_element),
    )


def kv_cache_reduction_v2_vs_67b() -> KVCacheReduction:
    """DeepSeek-V2's "KV cache reduced by 93.3%" versus DeepSeek 67B, reproduced in bytes as deployed.

    Assumptions (DeepSeek-V2 §1 and §3.2.3; DeepSeek LLM Table 2):

    - DeepSeek 67B: 95 layers, GQA with 8 KV heads of width 128, BF16 (2 bytes):
      2 · 8 · 128 · 95 = 194,560 elements = 389,120 bytes per token.
    - DeepSeek-V2: MLA, (512 + 64) · 60 = 34,560 elements per token, cache quantised to 6 bits per
      element on average (V2 §3.2.3) = 25,920 bytes per token.

    Bytes: 1 - 25,920 / 389,120 = 93.34% (the paper's 93.3%). Elements alone: 1 - 34,560 / 194,560
    = 82.24% -- the architecture gives ~82%, the 6-bit cache the rest.
    """
    return kv_cache_reduction(deepseek_llm_67b_config(), get_preset("deepseek-v2"),
                              baseline_bytes_per_element=BF16_BYTES,
                              bytes_per_element=V2_KV_CACHE_BITS / 8)
