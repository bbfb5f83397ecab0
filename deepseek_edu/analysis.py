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

**Parameters** (`count_params`, notebook 06). Every weight matrix and norm vector of the model that
`Transformer(cfg)` builds, counted from the shapes: the input embedding V·D, each block (two RMSNorms,
the attention, a dense FFN or DeepSeekMoE), the final norm, the output head V·D (absent when tied).
*Activated* parameters are those one token's forward pass multiplies with: everything except the
routed experts it is not sent to (the gate, the shared experts and K of the E routed experts count).
`total` and `activated` include the embedding and the head (V3: 671.03B total, 37.55B activated);
the papers' activated figures -- V3 37B, V2 21B, V2-Lite 2.4B -- match the count without the input
embedding, `activated_non_embedding` (36.63B, 20.85B, 2.45B; with it V2-Lite would be 2.66B). The MTP
modules (V3 §2.2) are reported separately: they share the embedding and the head with the main
model, and the V3 paper's 671B excludes its one module (about 11.6B; the 685B on the hub counts it
with its copies of embedding and head).

**FLOPs per token** (`flops_per_token`, `ParamCount.forward_flops`). Matmul FLOPs of the forward pass,
one multiply-add = 2 FLOPs, in two terms:

    weights    2 · N_act      N_act = activated parameters without the input embedding (a lookup,
                              not a matmul); norms are counted as if they were weights (negligible)
    attention  2 · l · n_h · (d_qk + d_v) · t   scores q·k (d_qk = qk_nope + qk_rope for MLA, d_h for
                              MHA/GQA/MQA) and the weighted sum of values (d_v) over t keys, as the
                              naive (up-projected) path computes them

where t is the number of keys the token sees. `ParamCount` reports it averaged over the positions of
one causal training sequence of `seq_len` tokens, t = (seq_len + 1) / 2, and training FLOPs as
3 × forward (backward ≈ 2 × forward). Softmax, norms' arithmetic, routing and the MTP modules are
left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


# --- parameters and FLOPs (notebook 06; DeepSeek-V3 §4.2, V2 §3.1) --------------------------------

def _attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention module (its internal norms included)."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attention == "mla":
        qk, C, R = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank == 0:
            q = D * H * qk  # wq
        else:
            q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk  # wq_a, q_norm, wq_b
        kv = D * (C + R) + C + C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # wkv_a, kv_norm, wkv_b
        return q + kv + H * cfg.v_head_dim * D  # + wo
    Dh, Hkv = cfg.attn_head_dim, cfg.kv_heads
    return D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D  # wq, wk and wv, wo


def _ffn_params(cfg: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(total, activated) parameters of the FFN of block `layer_id`: dense SwiGLU or DeepSeekMoE."""
    D = cfg.dim
    if not (cfg.uses_moe and layer_id >= cfg.n_dense_layers):
        return 3 * D * cfg.inter_dim, 3 * D * cfg.inter_dim  # w1, w2, w3
    expert = 3 * D * cfg.moe_inter_dim
    gate = cfg.n_routed_experts * D  # the selection bias is a buffer, not a parameter
    shared = cfg.n_shared_experts * expert  # one SwiGLU of width n_shared * moe_inter_dim
    return (gate + shared + cfg.n_routed_experts * expert,
            gate + shared + cfg.n_activated_experts * expert)


def _block_params(cfg: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(total, activated) parameters of `Block(layer_id, cfg)`: two norms, attention, FFN."""
    attn = 2 * cfg.dim + _attention_params(cfg)
    total, active = _ffn_params(cfg, layer_id)
    return attn + total, attn + active


def mtp_module_params(cfg: ModelConfig, depth: int = 0) -> tuple[int, int]:
    """(total, activated) parameters of MTP module `depth` (DeepSeek-V3 §2.2), shared parts excluded.

    The module holds `enorm` (D), `hnorm` (D), `eh_proj` (D, 2D), one Transformer block -- numbered
    after the main ones, so it is a DeepSeekMoE block whenever the model uses MoE, as V3's layer 61 --
    and its output norm (D). The embedding and the output head are the main model's.

    Raises:
        ValueError: if depth is not in [0, n_mtp_depth).
    """
    if not 0 <= depth < cfg.n_mtp_depth:
        raise ValueError(f"depth={depth} must be in [0, n_mtp_depth={cfg.n_mtp_depth})")
    D = cfg.dim
    own = 2 * D + 2 * D * D + D  # enorm, hnorm, eh_proj, norm
    total, active = _block_params(cfg, cfg.n_layers + depth)
    return own + total, own + active


def flops_per_token(cfg: ModelConfig, context_len: float) -> float:
    """Forward matmul FLOPs for one token that attends to `context_len` keys (module docstring).

    Args:
        cfg: the model's shapes.
        context_len: keys the token sees (its position + 1), in tokens; may be fractional (an average).
    Returns:
        float FLOPs: 2 · (activated parameters without the input embedding) + 2 · l · n_h ·
        (d_qk + d_v) · context_len. MTP modules are not included.
    Raises:
        ValueError: if context_len < 0.
    """
    if context_len < 0:
        raise ValueError(f"context_len={context_len} must be >= 0")
    pc = count_params(cfg)
    d_qk = cfg.qk_head_dim
    d_v = cfg.v_head_dim if cfg.attention == "mla" else cfg.attn_head_dim
    return 2.0 * pc.activated_non_embedding + 2.0 * cfg.n_layers * cfg.n_heads * (d_qk + d_v) * context_len


@dataclass(frozen=True)
class ParamCount:
    """Parameters and FLOPs of one `ModelConfig` (all counts are numbers of scalars, not bytes).

    Attributes:
        total: every parameter of the main model, embedding and head included (a tied head once);
            equals `Transformer(cfg).num_parameters()` without MTP modules.
        activated: parameters one token uses, embedding and head included (V3: 37.55B).
        embedding: the input embedding, V·D.
        head: the output head, V·D (0 when tied to the embedding).
        mtp_total, mtp_activated: all MTP modules together, embedding and head not repeated.
        seq_len: training sequence length the FLOPs are averaged over (t = (seq_len + 1) / 2 keys).
        forward_flops: forward matmul FLOPs per token at that length (module docstring).
        parts: total parameters by part: "embedding", "attention", "dense_ffn", "moe" (gates, shared
            and routed experts), "norms" (block and final norms), "head".
    """

    total: int
    activated: int
    embedding: int
    head: int
    mtp_total: int
    mtp_activated: int
    seq_len: int
    forward_flops: float
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def activated_non_embedding(self) -> int:
        """Activated parameters without the input embedding: the matmul weights of a token.

        The papers' activated counts: V3 36.63B ("37B"), V2 20.85B ("21B"), V2-Lite 2.45B ("2.4B").
        """
        return self.activated - self.embedding

    @property
    def train_flops(self) -> float:
        """Training FLOPs per token: 3 × forward (the backward pass costs about twice the forward)."""
        return 3.0 * self.forward_flops


def count_params(cfg: ModelConfig, seq_len: int | None = None) -> ParamCount:
    """Count total and activated parameters and FLOPs per token of `cfg` (no model is built).

    DeepSeek-V3 §4.2 (671B total, 37B activated per token), DeepSeek-V2 §3.1 (236B / 21B).

    Args:
        cfg: any `ModelConfig` (mha/gqa/mqa or mla; dense or DeepSeekMoE; tied or untied head).
        seq_len: training sequence length for `forward_flops`; default min(max_seq_len,
            original_seq_len) (V3: 4096, its pre-training length).
    Returns:
        `ParamCount`. `total` equals `Transformer(cfg).num_parameters()` when n_mtp_depth == 0
        (tests/test_analysis.py), and `mtp_total` equals the parameters of its MTP modules.
    Raises:
        ValueError: if seq_len < 1.
    """
    seq_len = min(cfg.max_seq_len, cfg.original_seq_len) if seq_len is None else seq_len
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    D, V = cfg.dim, cfg.vocab_size
    embedding = V * D
    head = 0 if cfg.tie_embeddings else V * D
    parts = {"embedding": embedding, "attention": 0, "dense_ffn": 0, "moe": 0, "norms": D, "head": head}
    activated = embedding + head + D  # the final norm
    for i in range(cfg.n_layers):
        ffn_total, ffn_active = _ffn_params(cfg, i)
        parts["attention"] += _attention_params(cfg)
        parts["moe" if cfg.uses_moe and i >= cfg.n_dense_layers else "dense_ffn"] += ffn_total
        parts["norms"] += 2 * D
        activated += 2 * D + _attention_params(cfg) + ffn_active
    total = sum(parts.values())
    mtp = [mtp_module_params(cfg, k) for k in range(cfg.n_mtp_depth)]
    d_qk = cfg.qk_head_dim
    d_v = cfg.v_head_dim if cfg.attention == "mla" else cfg.attn_head_dim
    avg_keys = (seq_len + 1) / 2  # causal: position p (0-based) sees p + 1 keys
    forward = 2.0 * (activated - embedding) + 2.0 * cfg.n_layers * cfg.n_heads * (d_qk + d_v) * avg_keys
    return ParamCount(total=total, activated=activated, embedding=embedding, head=head,
                      mtp_total=sum(t for t, _ in mtp), mtp_activated=sum(a for _, a in mtp),
                      seq_len=seq_len, forward_flops=forward, parts=parts)
