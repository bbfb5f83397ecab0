"""Causal self-attention baselines -- MHA, GQA, MQA -- and the KV cache they share with MLA.

All three are one module with a different number of key/value heads (Shazeer 2019; Ainslie et al.
2023): multi-head attention keeps one key and one value per query head (H), grouped-query attention
shares each key/value head among H / n_kv_heads query heads, multi-query attention keeps a single
one. The cache holds exactly what the kind needs per token per layer, 2 * n_kv_heads * head_dim
numbers (DeepSeek-V2 Table 1); MLA (mla.py) caches kv_lora_rank + qk_rope_head_dim instead.

`KVCache` is the one cache interface of the project: preallocated buffers (B, T_max, ...) for one
layer, a fill `length`, `update` to append the new positions, `truncate` to roll back (speculative
decoding), and `nbytes` for the accounting notebook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .rope import apply_rotary_emb


class KVCache:
    """Preallocated cache of one attention layer: named buffers of shape (B, T_max, *feature).

    Args:
        batch_size: B, rows of the batch the cache serves.
        max_len: T_max, most positions it can hold.
        spec: name -> feature shape, e.g. {"k": (H_kv, Dh), "v": (H_kv, Dh)} for MHA or
            {"kv": (C,), "pe": (R,)} for MLA.
        dtype, device: of the buffers (the cache's bytes depend on the dtype).
    """

    def __init__(self, batch_size: int, max_len: int, spec: dict[str, tuple[int, ...]],
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.buffers = {
            name: torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device)
            for name, shape in spec.items()
        }
        self.length = 0  # positions filled so far

    def update(self, **new: Tensor) -> dict[str, Tensor]:
        """Append S new positions to every buffer and return views of all positions so far.

        Args:
            **new: one (B, S, *feature) tensor per buffer name.
        Returns:
            name -> (B, length + S, *feature) view (no copy).
        Raises:
            ValueError: on a missing/unknown name, a batch-size mismatch, or overflow of max_len.
        """
        if set(new) != set(self.buffers):
            raise ValueError(f"KVCache.update needs exactly {sorted(self.buffers)}, got {sorted(new)}")
        for name, t in new.items():  # validate everything before writing anything
            buf = self.buffers[name]
            if t.dim() != buf.dim() or t.shape[0] != self.batch_size or t.shape[2:] != buf.shape[2:]:
                raise ValueError(f"KVCache.update: {name} has shape {tuple(t.shape)}, cache expects "
                                 f"({self.batch_size}, S, {', '.join(map(str, buf.shape[2:]))})")
        seqs = {t.shape[1] for t in new.values()}
        S = seqs.pop()
        if seqs:
            raise ValueError("KVCache.update: all new tensors must have the same number of positions")
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {S} new positions > max_len={self.max_len}")
        out = {}
        for name, t in new.items():
            buf = self.buffers[name]
            buf[:, self.length:end] = t.to(buf.dtype)
            out[name] = buf[:, :end]
        self.length = end
        return out

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (roll back after a rejected draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}) outside [0, {self.length}]")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the buffers (B * T_max * elements per token * bytes per element)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    @property
    def elements_per_token(self) -> int:
        """Numbers cached per token (per batch row) in this layer."""
        return sum(math.prod(b.shape[2:]) for b in self.buffers.values())


def causal_mask(start_pos: int, S: int, device: torch.device | None = None) -> Tensor:
    """Boolean (S, start_pos + S) mask, True where query start_pos + i may see key j (j <= start_pos + i)."""
    q_pos = torch.arange(start_pos, start_pos + S, device=device)
    k_pos = torch.arange(start_pos + S, device=device)
    return k_pos[None, :] <= q_pos[:, None]


ATTENTION_IMPLS = ("auto", "sdpa")  # Attention.impl; "auto" = "sdpa" (torch's scaled_dot_product_attention)


class Attention(nn.Module):
    """Causal multi-head attention with n_kv_heads key/value heads: MHA, GQA or MQA by `cfg.attention`.

    Rotary embedding (interleaved pairs) is applied to the whole query and key heads.

    Shapes: x (B, S, D) -> (B, S, D). Weights: wq (H*Dh, D), wk/wv (H_kv*Dh, D), wo (D, H*Dh).

    Attribute `impl`, one of `ATTENTION_IMPLS` (the package's convention for choosing an implementation
    path, as `mla.MLA.impl` and `moe.MoE.impl`): only "sdpa" today; "auto" picks it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.attention not in ("mha", "gqa", "mqa"):
            raise ValueError(f"Attention handles attention in ('mha', 'gqa', 'mqa'), got {cfg.attention!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        self.softmax_scale = cfg.softmax_scale
        H, Hkv, Dh, D = self.n_heads, self.n_kv_heads, self.head_dim, cfg.dim
        self.wq = nn.Linear(D, H * Dh, bias=False)
        self.wk = nn.Linear(D, Hkv * Dh, bias=False)
        self.wv = nn.Linear(D, Hkv * Dh, bias=False)
        self.wo = nn.Linear(H * Dh, D, bias=False)
        self.impl = "auto"  # ATTENTION_IMPLS

    def resolve_impl(self, impl: str | None = None) -> str:
        """The path a call with `impl` (None = `self.impl`) takes. Raises ValueError for an unknown impl."""
        impl = self.impl if impl is None else impl
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl={impl!r} must be one of ATTENTION_IMPLS = {ATTENTION_IMPLS}")
        return "sdpa" if impl == "auto" else impl

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        """What one token costs in the cache: a key and a value per KV head."""
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x: Tensor, freqs_cis: Tensor, cache: KVCache | None = None, impl: str | None = None) -> Tensor:
        """Attend from the S new positions of `x` to every earlier position and themselves.

        Args:
            x: (B, S, D) hidden states of the new positions.
            freqs_cis: (S, Dh/2) complex rotary factors for those positions.
            cache: this layer's cache, or None for a stateless forward over positions 0..S-1.
            impl: one of `ATTENTION_IMPLS` for this call (None = `self.impl`).
        Returns:
            (B, S, D).
        Raises:
            ValueError: on an unknown `impl`.
        """
        self.resolve_impl(impl)  # one path today ("sdpa"); checked so that a typo is an error
        B, S, _ = x.shape
        start_pos = cache.length if cache is not None else 0
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)  # (B, S, H, Dh)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, Hkv, Dh)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, Hkv, Dh)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        if cache is not None:
            kv = cache.update(k=k, v=v)
            k, v = kv["k"].to(q.dtype), kv["v"].to(q.dtype)  # (B, T, Hkv, Dh), T = start_pos + S
        G = self.n_heads // self.n_kv_heads  # query heads per KV head (consecutive heads share one)
        # Fold each KV head's G query heads into the query axis instead of copying K and V G times:
        # the cache is read once per KV head, which is the whole point of GQA/MQA at decode time.
        q = q.view(B, S, self.n_kv_heads, G, self.head_dim).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, S, Dh)
        q = q.reshape(B, self.n_kv_heads, G * S, self.head_dim)  # (B, Hkv, G*S, Dh)
        # One new position sees every cached one: no mask needed (and SDPA is faster without).
        mask = causal_mask(start_pos, S, device=x.device).repeat(G, 1) if S > 1 else None  # (G*S, T)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2),  # (B, Hkv, G*S | T, Dh)
            attn_mask=mask, scale=self.softmax_scale,
        )  # (B, Hkv, G*S, Dh)
        out = out.view(B, self.n_kv_heads, G, S, self.head_dim).permute(0, 3, 1, 2, 4)  # (B, S, Hkv, G, Dh)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float, start_pos: int = 0) -> Tensor:
    """Plain softmax attention for tests: q (B, S, H, Dh), k/v (B, T, H, Dh) -> (B, S, H, Dh)."""
    scores = torch.einsum("bshd,bthd->bsht", q.float(), k.float()) * scale  # (B, S, H, T)
    mask = causal_mask(start_pos, q.shape[1], device=q.device)  # (S, T)
    scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
    return torch.einsum("bsht,bthd->bshd", scores.softmax(-1), v.float()).to(q.dtype)
