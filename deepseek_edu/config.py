"""Configuration dataclasses: one per concern, each field documented, each rule checked.

`ModelConfig` carries the whole DeepSeek field set from the first chapter on, with the names of
DeepSeek's own `ModelArgs` (DeepSeek-V3 `inference/model.py`): a baseline dense decoder is simply a
config whose `attention` is ``"mha"`` and whose `n_routed_experts` is 0. Later chapters switch
features on; they never rename a field.

Every invalid combination raises `ValueError` naming the fields and the rule broken, e.g.
``"dim=100 is not divisible by n_heads=3"``.

Beside them: `config_base.py` (the dict round trip and the checks every config shares) and
`grpo_config.py` (`GRPOConfig`, re-exported here, so that every config class imports from `config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from .config_base import _check, _ConfigDict, _is_int, _is_real
from .grpo_config import (  # noqa: F401 -- re-exported: config is where every config class is imported from
    GRPO_TASKS,
    GRPO_VARIANTS,
    GRPOConfig,
)

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
LR_SCHEDULES = ("cosine", "wsd", "constant")
MAX_SEQ_LEN_LIMIT = 1 << 20  # positions; DeepSeek-V3 with YaRN needs 163,840


@dataclass
class ModelConfig(_ConfigDict):
    """Shape and features of a decoder-only Transformer, DeepSeek field names.

    Defaults describe the course's small dense baseline (notebook 02). The real DeepSeek shapes
    are in `PRESETS` (values from DeepSeek-V2 Table/Appendix and DeepSeek-V3 §4.2).
    """

    # --- vocabulary and trunk ---------------------------------------------------------------
    vocab_size: int = 2048  # V: token ids are in [0, vocab_size)
    dim: int = 192  # D: width of the residual stream
    n_layers: int = 4  # number of Transformer blocks
    n_heads: int = 6  # H: attention (query) heads
    max_seq_len: int = 256  # longest sequence the model (and its KV cache) accepts, in tokens
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the embedding matrix with the output head (DeepSeek: untied)
    init_std: float = 0.02  # std of the normal init of every weight matrix

    # --- attention ------------------------------------------------------------------------------
    attention: str = "mha"  # "mha" | "gqa" | "mqa" (baselines, attention.py) or "mla" (mla.py)
    head_dim: int = 0  # per-head width for mha/gqa/mqa; 0 means dim // n_heads
    n_kv_heads: int = 0  # key/value heads for gqa; 0 means n_heads (mha) -- mqa uses 1
    # MLA (DeepSeek-V2 §2.1): query and KV compression ranks and per-head widths
    q_lora_rank: int = 0  # d'_c: query latent rank; 0 = no query compression (V2-Lite)
    kv_lora_rank: int = 64  # d_c (C): KV latent rank, cached per token
    qk_nope_head_dim: int = 32  # per-head query/key width without rotary (N)
    qk_rope_head_dim: int = 16  # R: decoupled rotary width, one shared rotary key per token
    v_head_dim: int = 32  # per-head value width

    # --- rotary embedding and YaRN (DeepSeek-V3 `precompute_freqs_cis`) -----------------------
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_factor: float = 1.0  # YaRN context-extension factor s; 1 = no extension
    original_seq_len: int = 4096  # context length of pre-training; YaRN applies beyond it
    beta_fast: int = 32  # YaRN: rotations above which frequencies are kept (high frequency)
    beta_slow: int = 1  # YaRN: rotations below which frequencies are fully interpolated
    mscale: float = 1.0  # YaRN attention temperature coefficient (softmax scale x mscale^2)

    # --- feed-forward and DeepSeekMoE (DeepSeekMoE §3, V3 §2.1.2) -----------------------------
    inter_dim: int = 512  # hidden width of the dense SwiGLU FFN
    n_dense_layers: int = 1  # the first n_dense_layers blocks use the dense FFN, the rest MoE
    n_routed_experts: int = 0  # E: routed experts per MoE layer; 0 = dense model throughout
    n_shared_experts: int = 0  # experts every token passes through
    n_activated_experts: int = 0  # K: routed experts chosen per token (top-k)
    moe_inter_dim: int = 128  # hidden width of one (fine-grained) expert
    n_expert_groups: int = 1  # experts are split into this many groups for group-limited routing
    n_limited_groups: int = 1  # groups kept per token (device-limited routing)
    score_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3) affinity scores
    group_score: str = "top2_sum"  # group score: sum of two largest (V3) or "max" (V2)
    route_scale: float = 1.0  # multiplies the routed weights once (V3: 2.5, V2: 16.0)
    norm_topk_prob: bool = True  # normalise the chosen weights to sum 1 (V3 sigmoid gate)
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing; 0 = off
    seq_aux_loss_alpha: float = 0.0001  # alpha of the complementary sequence-wise balance loss
    expert_aux_loss_alpha: float = 0.0  # alpha_1 of DeepSeekMoE's expert-level aux loss (comparison)

    # --- Multi-Token Prediction (DeepSeek-V3 §2.2) ----------------------------------------------
    n_mtp_depth: int = 0  # D: extra tokens predicted per position; 0 = no MTP modules
    mtp_loss_weight: float = 0.3  # lambda: weight of the MTP loss (V3: 0.3 early, 0.1 later)

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def uses_moe(self) -> bool:
        """True when blocks after `n_dense_layers` use DeepSeekMoE instead of a dense FFN."""
        return self.n_routed_experts > 0

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the baseline attention kinds (MLA has none in the cache)."""
        if self.attention == "mqa":
            return 1
        if self.attention == "gqa":
            return self.n_kv_heads or self.n_heads
        return self.n_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head width of mha/gqa/mqa: `head_dim`, or dim // n_heads when 0."""
        return self.head_dim or self.dim // max(self.n_heads, 1)

    @property
    def rope_dim(self) -> int:
        """Width that carries rotary position: the whole head (mha/gqa/mqa) or qk_rope_head_dim (mla)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head used in the attention score (MLA: nope + rope)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.attn_head_dim

    @property
    def softmax_scale(self) -> float:
        """Score scale 1/sqrt(qk_head_dim), times mscale^2 when YaRN extends the context.

        DeepSeek-V3 `MLA.__init__`: mscale = 0.1 * mscale * ln(rope_factor) + 1 applied *squared*,
        once on the query and once on the key side of YaRN's temperature.
        """
        scale = self.qk_head_dim**-0.5
        if self.max_seq_len > self.original_seq_len and self.rope_factor > 1:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    # Validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every rule; raise one `ValueError` listing all broken rules with field names."""
        e: list[str] = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "inter_dim"):
            value = getattr(self, name)
            _check(e, _is_int(value) and value > 0, f"{name}={value!r} must be a positive integer")
        _check(e, not _is_int(self.max_seq_len) or self.max_seq_len <= MAX_SEQ_LEN_LIMIT,
               f"max_seq_len={self.max_seq_len!r} exceeds {MAX_SEQ_LEN_LIMIT:,} (the rotary table is built for "
               f"every position)")
        for name in (
            "head_dim", "n_kv_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "original_seq_len", "beta_fast", "beta_slow", "n_dense_layers", "n_routed_experts",
            "n_shared_experts", "n_activated_experts", "moe_inter_dim", "n_expert_groups", "n_limited_groups",
            "n_mtp_depth",
        ):
            value = getattr(self, name)
            _check(e, _is_int(value) and value >= 0, f"{name}={value!r} must be an integer >= 0")
        for name in ("norm_eps", "init_std", "rope_theta", "rope_factor", "mscale", "route_scale",
                     "bias_update_speed", "seq_aux_loss_alpha", "expert_aux_loss_alpha", "mtp_loss_weight"):
            value = getattr(self, name)
            _check(e, _is_real(value), f"{name}={value!r} must be a finite number")
        for name in ("tie_embeddings", "norm_topk_prob"):
            _check(e, isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be a bool")
        for name, allowed in (("attention", ATTENTION_KINDS), ("score_func", SCORE_FUNCS),
                              ("group_score", GROUP_SCORES)):
            value = getattr(self, name)
            _check(e, isinstance(value, str) and value in allowed, f"{name}={value!r} must be one of {allowed}")
        if e:  # the rules below assume sane basic types
            raise ValueError("invalid ModelConfig: " + "; ".join(e))
        _check(e, self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")
        _check(e, self.init_std > 0, f"init_std={self.init_std} must be > 0")

        if self.attention in ("mha", "gqa", "mqa"):
            if not self.head_dim:
                _check(e, self.dim % self.n_heads == 0,
                       f"dim={self.dim} is not divisible by n_heads={self.n_heads} (set head_dim to decouple them)")
            _check(e, self.attn_head_dim % 2 == 0,
                   f"head width {self.attn_head_dim} (head_dim or dim // n_heads) must be even for rotary pairs")
            if self.attention == "gqa":
                _check(e, self.n_kv_heads >= 1,
                       "attention='gqa' needs n_kv_heads >= 1 (the number of key/value heads; 0 would be MHA)")
                _check(e, self.n_kv_heads == 0 or (self.kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0),
                       f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads} (gqa)")
            elif self.attention == "mha":
                _check(e, self.n_kv_heads in (0, self.n_heads),
                       f"n_kv_heads={self.n_kv_heads} must be 0 or n_heads={self.n_heads} when attention='mha'")
            else:  # mqa
                _check(e, self.n_kv_heads in (0, 1),
                       f"n_kv_heads={self.n_kv_heads} must be 0 or 1 when attention='mqa' (one shared KV head)")
        else:  # mla
            _check(e, self.kv_lora_rank > 0, f"kv_lora_rank={self.kv_lora_rank} must be > 0 when attention='mla'")
            _check(e, self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                   f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and > 0 when attention='mla'")
            _check(e, self.qk_nope_head_dim >= 0, f"qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
            _check(e, self.v_head_dim > 0, f"v_head_dim={self.v_head_dim} must be > 0 when attention='mla'")

        # RoPE / YaRN
        _check(e, self.rope_theta > 1, f"rope_theta={self.rope_theta} must be > 1")
        _check(e, self.rope_factor >= 1, f"rope_factor={self.rope_factor} must be >= 1 (1 = no YaRN)")
        _check(e, self.original_seq_len > 0, f"original_seq_len={self.original_seq_len} must be > 0")
        _check(e, self.beta_fast > self.beta_slow > 0,
               f"beta_fast={self.beta_fast} must be > beta_slow={self.beta_slow} > 0 (YaRN ramp)")
        _check(e, self.mscale > 0, f"mscale={self.mscale} must be > 0")

        # DeepSeekMoE
        _check(e, self.n_dense_layers <= self.n_layers,
               f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}")
        _check(e, self.route_scale > 0, f"route_scale={self.route_scale} must be > 0")
        _check(e, self.bias_update_speed >= 0, f"bias_update_speed={self.bias_update_speed} must be >= 0")
        _check(e, self.seq_aux_loss_alpha >= 0, f"seq_aux_loss_alpha={self.seq_aux_loss_alpha} must be >= 0")
        _check(e, self.expert_aux_loss_alpha >= 0,
               f"expert_aux_loss_alpha={self.expert_aux_loss_alpha} must be >= 0")
        if self.n_routed_experts > 0:
            E, K = self.n_routed_experts, self.n_activated_experts
            G, M = self.n_expert_groups, self.n_limited_groups
            _check(e, self.moe_inter_dim > 0, f"moe_inter_dim={self.moe_inter_dim} must be > 0 with routed experts")
            _check(e, 1 <= K <= E, f"n_activated_experts={K} must be in [1, n_routed_experts={E}]")
            _check(e, G >= 1, f"n_expert_groups={G} must be >= 1")
            if G >= 1:
                _check(e, E % G == 0, f"n_routed_experts={E} is not divisible by n_expert_groups={G}")
                _check(e, 1 <= M <= G, f"n_limited_groups={M} must be in [1, n_expert_groups={G}]")
                if E % G == 0 and 1 <= M <= G:
                    _check(e, K <= M * (E // G),
                           f"n_activated_experts={K} exceeds the {M * (E // G)} experts that "
                           f"n_limited_groups={M} groups of {E // G} hold")
                    if self.group_score == "top2_sum" and G > 1:
                        _check(e, E // G >= 2,
                               f"group_score='top2_sum' needs >= 2 experts per group, "
                               f"n_routed_experts={E} / n_expert_groups={G} = {E // G}")
        else:
            _check(e, self.n_activated_experts == 0 and self.n_shared_experts == 0,
                   f"n_activated_experts={self.n_activated_experts} and n_shared_experts="
                   f"{self.n_shared_experts} need n_routed_experts > 0")

        # MTP
        _check(e, self.mtp_loss_weight >= 0, f"mtp_loss_weight={self.mtp_loss_weight} must be >= 0")
        if e:
            raise ValueError("invalid ModelConfig: " + "; ".join(e))

    # Serialisation -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class TrainConfig(_ConfigDict):
    """How to train: optimiser, schedule, batching, evaluation and checkpoints.

    Defaults are the course's CPU run: a few minutes on 2 cores (README quick start).
    """

    corpus: str = "shakespeare"  # "shakespeare" (fetched once) or "python-docs" (offline)
    vocab_size: int = 2048  # tokenizer vocabulary (must equal the model's vocab_size)
    seq_len: int = 128  # tokens per training window
    batch_size: int = 16  # windows per optimizer step
    max_steps: int = 300  # optimizer steps
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final learning rate / peak
    warmup_steps: int = 30  # linear warmup from 0
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    decay_frac: float = 0.2  # wsd: fraction of steps spent in the final linear decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    max_skipped_steps: int = 10  # stop with NonFiniteError after this many non-finite-gradient skips in a row
    eval_every: int = 100  # steps between validation evaluations; 0 = only at the end
    eval_batches: int = 8  # validation batches per evaluation
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    seed: int = 1337  # seeds model init, batch order and sampling
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    threads: int = 0  # torch CPU threads; 0 = torch default
    out_dir: str = "runs/default"  # where checkpoints and metrics go

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        e: list[str] = []
        for name in ("vocab_size", "seq_len", "batch_size", "max_steps", "eval_batches"):
            value = getattr(self, name)
            _check(e, _is_int(value) and value > 0, f"{name}={value!r} must be a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "threads", "seed"):
            value = getattr(self, name)
            _check(e, _is_int(value) and value >= 0, f"{name}={value!r} must be an integer >= 0")
        for name in ("lr", "min_lr_ratio", "decay_frac", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            _check(e, _is_real(value), f"{name}={value!r} must be a finite number")
        _check(e, isinstance(self.bf16, bool), f"bf16={self.bf16!r} must be a bool")
        for name in ("corpus", "schedule", "device", "out_dir"):
            value = getattr(self, name)
            _check(e, isinstance(value, str), f"{name}={value!r} must be a string")
        if e:  # the rules below compare numbers
            raise ValueError("invalid TrainConfig: " + "; ".join(e))
        _check(e, self.lr > 0, f"lr={self.lr!r} must be a finite number > 0")
        _check(e, 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(e, self.schedule in LR_SCHEDULES, f"schedule={self.schedule!r} must be one of {LR_SCHEDULES}")
        _check(e, 0 < self.decay_frac <= 1, f"decay_frac={self.decay_frac} must be in (0, 1]")
        _check(e, self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _check(e, 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        _check(e, self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0")
        _check(e, _is_int(self.max_skipped_steps) and self.max_skipped_steps >= 1,
               f"max_skipped_steps={self.max_skipped_steps!r} must be an integer >= 1")
        _check(e, self.device in ("auto", "cpu", "cuda"), f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if isinstance(self.warmup_steps, int) and isinstance(self.max_steps, int):
            _check(e, self.warmup_steps <= self.max_steps,
                   f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        if e:
            raise ValueError("invalid TrainConfig: " + "; ".join(e))

    def check_model(self, model: ModelConfig) -> None:
        """Rules that tie training to the model: vocabulary and window length."""
        e: list[str] = []
        _check(e, self.vocab_size == model.vocab_size,
               f"TrainConfig.vocab_size={self.vocab_size} != ModelConfig.vocab_size={model.vocab_size}")
        _check(e, self.seq_len <= model.max_seq_len,
               f"TrainConfig.seq_len={self.seq_len} exceeds ModelConfig.max_seq_len={model.max_seq_len}")
        _check(e, self.seq_len > model.n_mtp_depth,
               f"TrainConfig.seq_len={self.seq_len} must exceed ModelConfig.n_mtp_depth={model.n_mtp_depth} "
               f"(MTP depth k predicts from windows longer than k)")
        if e:
            raise ValueError("TrainConfig does not fit ModelConfig: " + "; ".join(e))


def _real(**kw: Any) -> ModelConfig:
    """A real DeepSeek shape (for accounting: parameters, FLOPs, KV bytes -- never instantiated on CPU)."""
    common = dict(attention="mla", qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  kv_lora_rank=512, max_seq_len=163840, original_seq_len=4096, tie_embeddings=False)
    common.update(kw)
    return ModelConfig(**common)


# Presets: name -> ModelConfig. The real shapes follow REFERENCE.md (V3 §4.2, V2 §3.1 / appendix).
PRESETS: dict[str, ModelConfig] = {
    # The dense MHA baseline of notebook 02 and the first training run (CPU, minutes).
    "baseline": ModelConfig(),
    # The tiny DeepSeekMoE of notebook 04 and benchmarks/moe_balance.py (CPU, seconds per 100 steps):
    # MHA, one dense block then two MoE blocks of 8 routed experts (top-2) + 1 shared, the V3 sigmoid
    # gate, no groups. Activated FFN width (2 + 1) x 64 = inter_dim of the dense block. Balanced the
    # auxiliary-loss-free way only (no sequence-wise loss), with gamma = 0.01 instead of V3's 0.001:
    # the bias moves at most gamma per step, and runs of a few hundred to a few thousand steps need
    # it to cross the spread of the scores within tens of steps (notebook 04 shows why).
    "moe-tiny": ModelConfig(
        vocab_size=2048, dim=64, n_layers=3, n_heads=4, inter_dim=192, max_seq_len=128, n_dense_layers=1,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=64, n_expert_groups=1,
        n_limited_groups=1, score_func="sigmoid", group_score="top2_sum", route_scale=1.0, norm_topk_prob=True,
        bias_update_speed=0.01, seq_aux_loss_alpha=0.0, expert_aux_loss_alpha=0.0,
    ),
    # The course's DeepSeek (notebooks 06-07, the CLI default): every V3 feature at CPU scale. MLA
    # without query compression (as V2-Lite), one dense block then DeepSeekMoE blocks of 8 fine-grained
    # routed experts (top-2, 4 groups of which 2 are kept) + 1 shared, the V3 sigmoid gate with
    # auxiliary-loss-free balancing (gamma as in moe-tiny) and the sequence-wise loss at V3's alpha,
    # and one MTP module (D = 1, lambda = 0.3). Activated FFN width (2 + 1) x 96 = inter_dim.
    "tiny": ModelConfig(
        vocab_size=2048, dim=96, n_layers=4, n_heads=4, inter_dim=288, max_seq_len=256, n_dense_layers=1,
        attention="mla", q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=24, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=96,
        n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", group_score="top2_sum",
        route_scale=1.0, norm_topk_prob=True, bias_update_speed=0.01, seq_aux_loss_alpha=0.0001,
        expert_aux_loss_alpha=0.0, n_mtp_depth=1, mtp_loss_weight=0.3,
    ),
    # "tiny" with a dense SwiGLU FFN of the same activated width in every block: the ablation baseline
    # at equal activated parameters (attention, MTP and everything else identical).
    "dense-tiny": ModelConfig(
        vocab_size=2048, dim=96, n_layers=4, n_heads=4, inter_dim=288, max_seq_len=256, n_dense_layers=4,
        attention="mla", q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=24, n_mtp_depth=1, mtp_loss_weight=0.3,
    ),
    # One GPU: about 0.1B total parameters, 16 routed experts (top-2, 4 groups, 2 kept) + 1 shared,
    # query compression on. benchmarks/train_throughput.py compares it with "small" made dense.
    "small": ModelConfig(
        vocab_size=8192, dim=512, n_layers=8, n_heads=8, inter_dim=1536, max_seq_len=1024, n_dense_layers=1,
        attention="mla", q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=512,
        n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", group_score="top2_sum",
        route_scale=1.0, norm_topk_prob=True, bias_update_speed=0.001, seq_aux_loss_alpha=0.0001,
        n_mtp_depth=1, mtp_loss_weight=0.3,
    ),
    "deepseek-v3": _real(
        vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, inter_dim=18432, n_heads=128,
        q_lora_rank=1536, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
        moe_inter_dim=2048, n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
        group_score="top2_sum", route_scale=2.5, norm_topk_prob=True, rope_factor=40.0,
        beta_fast=32, beta_slow=1, mscale=1.0, n_mtp_depth=1, mtp_loss_weight=0.3,
    ),
    "deepseek-v2": _real(
        vocab_size=102400, dim=5120, n_layers=60, n_dense_layers=1, inter_dim=12288, n_heads=128,
        q_lora_rank=1536, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
        moe_inter_dim=1536, n_expert_groups=8, n_limited_groups=3, score_func="softmax",
        group_score="max", route_scale=16.0, norm_topk_prob=False, bias_update_speed=0.0, rope_factor=40.0,
        mscale=0.707,
    ),
    "deepseek-v2-lite": _real(
        vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, inter_dim=10944, n_heads=16,
        q_lora_rank=0, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
        moe_inter_dim=1408, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
        group_score="max", route_scale=1.0, norm_topk_prob=False, bias_update_speed=0.0, rope_factor=40.0,
        mscale=0.707,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of preset `name`; unknown names raise `ValueError` listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
