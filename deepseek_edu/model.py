"""The decoder: `Transformer` (its `Block` lives in block.py). This module composes; attention, FFN and norms live elsewhere.

    tokens (B, S) -> embed -> [ Block: x + attn(attn_norm(x)); x + ffn(ffn_norm(x)) ] x n_layers
                  -> norm -> head -> logits (B, S, V)
                  (+ the MTP modules of `mtp.py` on the last hidden state -> mtp_logits, training only)

`Transformer.forward` always returns a `ModelOutput` (one fixed return type), whatever the
features switched on. Decoding passes a `ModelCache`; the positions of the new tokens are taken
from the cache, so a full forward, a prefill followed by token-by-token decoding, and a chunked
prefill all give the same logits (tests/test_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attention import KVCache
from .block import Block
from .config import ModelConfig
from .moe import MoE
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import precompute_freqs_cis

__all__ = ["Block", "ModelCache", "ModelOutput", "Transformer"]  # Block: re-exported (its home is block.py)


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns, always.

    Attributes:
        logits: (B, S, V) next-token logits, fp32.
        hidden: (B, S, D) last block's output before the final norm (the MTP modules start from it).
        aux_loss: () fp32 balancing loss already weighted by its alpha, MTP blocks' included; 0 for a
            dense model.
        mtp_logits: one tensor per MTP depth k = 1..D, of shape (B, S - k, V) fp32 (position i
            predicts t_{i+k+1}: its targets are y[:, k:], see `mtp.mtp_targets`); (B, 0, V) when
            S <= k; empty when the model has no MTP modules or they were not run (decoding with a
            cache, or ``mtp=False``).
        expert_load: one (E,) tensor of token counts per MoE layer that ran, in the order of
            `Transformer.moe_layers` (main layers, then the MTP blocks when they ran); empty for a
            dense model.
    """

    logits: Tensor
    hidden: Tensor
    aux_loss: Tensor
    mtp_logits: list[Tensor] = field(default_factory=list)
    expert_load: list[Tensor] = field(default_factory=list)


class ModelCache:
    """The KV caches of every layer of one model, filled in lock step.

    Attributes:
        layers: one `KVCache` per block.
    """

    def __init__(self, layers: list[KVCache]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        """Positions held (the position of the next token)."""
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Roll every layer back to `length` positions."""
        for layer in self.layers:
            layer.truncate(length)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers' buffers."""
        return sum(layer.nbytes for layer in self.layers)


class Transformer(nn.Module):
    """Decoder-only language model built from a `ModelConfig`.

    Weight names follow DeepSeek's `inference/model.py`: `embed`, `layers.{i}.attn_norm`,
    `layers.{i}.attn.*`, `layers.{i}.ffn_norm`, `layers.{i}.ffn.*`, `norm`, `head`.
    With `tie_embeddings` the head *is* the embedding matrix (one tensor, one parameter).
    With `n_mtp_depth` = D > 0, `mtp` is an `nn.ModuleList` of D `mtp.MTPModule`s (`mtp.{k-1}.enorm`,
    `.hnorm`, `.eh_proj`, `.block.*`, `.norm`); they use `embed` and `head` themselves, never copies.
    The main model's weights do not depend on whether MTP modules exist: with the same seed a model
    with and one without them start from the same main weights (the MTP modules are built with a
    forked RNG and initialised after every main parameter).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if cfg.n_mtp_depth > 0:
            # Construction draws random numbers that reset_parameters overwrites anyway; forking keeps the
            # main weights equal to those of the same config without MTP (a clean with/without ablation).
            with torch.random.fork_rng(devices=[]):
                self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.n_mtp_depth + 1))
        else:
            self.mtp = None
        # Rotary factors for every position; derived from cfg, so not part of the state dict.
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices; output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights keep their ones
            scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts complex buffers as well: to a real dtype that keeps only the cosine
        # and the rotary "rotation" silently becomes a scaling. Keep the complex64 table; move it only.
        freqs_cis = self._buffers.pop("freqs_cis")
        super()._apply(fn, recurse)
        self.register_buffer("freqs_cis", freqs_cis.to(self.embed.weight.device), persistent=False)
        return self

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> ModelCache:
        """Allocate an empty cache for `batch_size` sequences of up to `max_len` (default max_seq_len) tokens."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]")
        ref = self.embed.weight
        dtype = dtype or ref.dtype
        return ModelCache([KVCache(batch_size, max_len, layer.attn.cache_spec(), dtype, ref.device)
                           for layer in self.layers])

    def new_mtp_caches(self, batch_size: int, max_len: int | None = None,
                       dtype: torch.dtype | None = None) -> list[KVCache]:
        """One empty `KVCache` per MTP depth (speculative decoding); [] for a model without MTP.

        Each depth's cache has its own length: depth k lags the main cache (it needs the token k ahead).
        """
        if self.mtp is None:
            return []
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} must be in [1, max_seq_len={self.cfg.max_seq_len}]")
        ref = self.embed.weight
        return [KVCache(batch_size, max_len, m.block.attn.cache_spec(), dtype or ref.dtype, ref.device)
                for m in self.mtp]

    def _check_tokens(self, tokens: Tensor, start_pos: int) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"tokens must be an integer tensor of shape (B, S), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must hold at least one position and one row, got shape {tuple(tokens.shape)}")
        # The id range needs the values on the host: one read (a GPU sync) in eager mode. Under
        # torch.compile it is skipped, because a host read would split the graph; an id out of range
        # then fails in the embedding lookup instead, without the ValueError (on CPU a RuntimeError
        # "index out of bounds" from the compiled kernel, or an IndexError where the embedding runs
        # eagerly; a device assert on CUDA).
        if not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.stack(torch.aminmax(tokens)).tolist())
            if low < 0 or high >= self.cfg.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is out of range [0, vocab_size={self.cfg.vocab_size})")
        if start_pos + tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence too long: positions {start_pos}..{start_pos + tokens.shape[1] - 1} "
                             f"exceed max_seq_len={self.cfg.max_seq_len}")

    def forward(self, tokens: Tensor, cache: ModelCache | None = None, attn_impl: str | None = None,
                mtp: bool | None = None) -> ModelOutput:
        """Logits for every position of `tokens`.

        Args:
            tokens: (B, S) integer token ids in [0, vocab_size).
            cache: a `ModelCache` from `new_cache`; the tokens are placed after what it holds, and
                it is extended in place. None runs positions 0..S-1 without state.
            attn_impl: the attention path for this call, one of the attention class's IMPLS
                (`mla.MLA_IMPLS`, `attention.ATTENTION_IMPLS`); None = each layer's `impl`.
            mtp: run the MTP modules (DeepSeek-V3 §2.2) and fill `mtp_logits`. None (default) = when the
                model has them and no cache is given (training and evaluation forwards); decoding
                with a cache skips them. The main logits are the same either way.
        Returns:
            `ModelOutput` (logits (B, S, V) fp32, hidden (B, S, D), aux_loss (), mtp_logits: depth k
            (B, S - k, V), expert_load).
        Raises:
            ValueError: on ids out of range, a sequence longer than max_seq_len, cache overflow,
                an `attn_impl` its attention class does not have, or mtp=True with a cache or without MTP modules.
        """
        if attn_impl is not None:  # checked before any layer runs (each layer checks it again)
            try:
                self.layers[0].attn.resolve_impl(attn_impl)
            except ValueError as exc:
                raise ValueError(f"attn_impl={attn_impl!r} is not a path of attention={self.cfg.attention!r}: "
                                 f"{exc}") from None
        if mtp and (cache is not None or self.mtp is None):
            raise ValueError("mtp=True needs a model with MTP modules (n_mtp_depth > 0) and no cache; "
                             "speculative decoding drives them with their own caches (generate.py)")
        run_mtp = self.mtp is not None and cache is None if mtp is None else mtp
        if cache is not None and (not isinstance(cache, ModelCache) or len(cache.layers) != len(self.layers)):
            got = f"{len(cache.layers)} layers" if isinstance(cache, ModelCache) else type(cache).__name__
            raise ValueError(f"cache must be a ModelCache of this model's {len(self.layers)} layers "
                             f"(model.new_cache), got {got}")
        start_pos = cache.length if cache is not None else 0
        self._check_tokens(tokens, start_pos)
        S = tokens.shape[1]
        freqs_cis = self.freqs_cis[start_pos:start_pos + S]  # (S, R/2)
        h = self.embed(tokens.long())  # (B, S, D)
        aux_loss = torch.zeros((), device=h.device)
        expert_load = []
        for i, layer in enumerate(self.layers):
            h, moe = layer(h, freqs_cis, cache.layers[i] if cache is not None else None, attn_impl)
            if moe is not None:
                aux_loss = aux_loss + moe.aux_loss
                expert_load.append(moe.load)
        logits = self.head(self.norm(h)).float()  # (B, S, V)
        mtp_logits = []
        if run_mtp:
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                n = S - k  # depth k: positions 0..S-k-1, each reads the token k ahead, t_k..t_{S-1}
                if n <= 0:  # too short a window: nothing to predict at this depth or deeper
                    mtp_logits.extend(logits.new_zeros(tokens.shape[0], 0, logits.shape[-1])
                                      for _ in range(k, len(self.mtp) + 1))
                    break
                h_prev, depth_logits, moe = module(h_prev[:, :n], tokens[:, k:], self.embed, self.head,
                                                   self.freqs_cis[:n], None, attn_impl)  # (B,n,D), (B,n,V)
                mtp_logits.append(depth_logits)
                if moe is not None:
                    aux_loss = aux_loss + moe.aux_loss
                    expert_load.append(moe.load)
        return ModelOutput(logits=logits, hidden=h, aux_loss=aux_loss, mtp_logits=mtp_logits,
                           expert_load=expert_load)

    def moe_layers(self) -> list[MoE]:
        """The DeepSeekMoE layers: the main blocks' in depth order, then the MTP blocks' (empty for a dense model).

        The MTP blocks' MoE is included so that `update_router_biases` balances it too (its load is
        gathered whenever the MTP modules run in train mode).
        """
        blocks = list(self.layers) + ([m.block for m in self.mtp] if self.mtp is not None else [])
        return [block.ffn for block in blocks if isinstance(block.ffn, MoE)]

    def update_router_biases(self) -> list[Tensor]:
        """Auxiliary-loss-free balancing: call once per optimizer step, after `optimizer.step()`.

        Each MoE layer moves its selection bias by bias_update_speed * sign(mean load - load) using
        the tokens routed since the previous call (all micro-batches of the step). Returns those
        per-layer loads (E,) for logging (MaxVio).
        """
        return [moe.update_bias() for moe in self.moe_layers()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Distinct parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
