"""Multi-head Latent Attention (MLA): DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1, the survey's §III-A.

MHA caches a key and a value per head per token: 2 * H * Dh numbers. MLA caches one *latent*
c_kv = kv_norm(W_DKV h) of rank C = `kv_lora_rank` per token, from which every head's key and value
are up-projected (`wkv_b`), plus one rotary key k_pe of width R = `qk_rope_head_dim` shared by all
heads: C + R numbers per token per layer (576 in V3, against 2 * 128 * 128 = 32,768 for MHA of the
same heads).

**Why the rotary part is decoupled.** Without RoPE, the key up-projection W_UK can be folded into
the query: q_nope · (W_UK c) = (W_UK^T q_nope) · c, so attention can run against the cached latent
directly ("absorption"). A rotation R_m between them (q R_m · R_n W_UK c) depends on the positions
and cannot be folded into a fixed matrix. So MLA carries position on a separate, small part: per-head
rotary queries q_pe and one shared rotary key k_pe, concatenated to the position-free part.

**Two paths, one cache.** Both paths read the same latent cache:

- `_attend_naive`: up-project the cached latent to per-head keys and values (what training does).
- `_attend_absorbed`: fold W_UK into the query, score against the latent, sum the latent with the
  attention weights, then apply W_UV. The same numbers (tests/test_mla.py checks to 1e-5 in fp32),
  but decoding reads C + R numbers per cached token instead of up-projecting H * (N + Dv).
- `_attend_triton`: the absorbed path with the latent attention in one Triton kernel
  (`kernels.mla_decode`, notebook 09); "auto" uses it when decoding on CUDA with Triton installed.

Weight names are those of DeepSeek's `inference/model.py`: wq (or wq_a, q_norm, wq_b), wkv_a,
kv_norm, wkv_b, wo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, causal_mask
from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary_emb


def _has_triton() -> bool:
    from .kernels import HAS_TRITON
    return HAS_TRITON


MLA_IMPLS = ("auto", "naive", "absorbed", "triton")
TRITON_MAX_NEW = 16  # "auto" decodes with the Triton kernel up to this many new positions (not prefill)


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE and a latent KV cache.

    Shapes: x (B, S, D) -> (B, S, D). Cache per token: kv (C,) after `kv_norm`, pe (R,) after RoPE.

    Weights:
        wq (H*(N+R), D) when q_lora_rank == 0, else wq_a (Cq, D), q_norm (Cq,), wq_b (H*(N+R), Cq);
        wkv_a (C+R, D); kv_norm (C,); wkv_b (H*(N+Dv), C); wo (D, H*Dv).

    Args:
        cfg: a config with attention="mla".
    Raises:
        ValueError: if `cfg.attention != "mla"`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.attention != "mla":
            raise ValueError(f"MLA needs attention='mla', got attention={cfg.attention!r}")
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale  # 1/sqrt(N + R), x mscale^2 under YaRN -- never 1/sqrt(C)
        H, D = cfg.n_heads, cfg.dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(H * self.v_head_dim, D, bias=False)
        self.impl = "auto"  # "auto" = naive without a cache; decoding: triton on CUDA (Triton installed), else absorbed

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        """One token's cache entry: the normalised latent (C,) and the shared rotary key (R,)."""
        return {"kv": (self.kv_lora_rank,), "pe": (self.qk_rope_head_dim,)}

    def _queries(self, x: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, self.n_heads, self.qk_head_dim)  # (B, S, H, N+R)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)  # (B,S,H,N), (B,S,H,R)
        # contiguous: q_pe is a strided slice, and view_as_complex needs even strides (odd N + R would fail)
        return q_nope, apply_rotary_emb(q_pe.contiguous(), freqs_cis)

    def _latents(self, x: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # (B,S,C), (B,S,R)
        # one rotary key for all heads; contiguous for the same reason as q_pe (odd C + R)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2).contiguous(), freqs_cis).squeeze(2)
        return self.kv_norm(kv), k_pe

    def _split_wkv_b(self) -> tuple[Tensor, Tensor]:
        """W_UK (H, N, C) and W_UV (H, Dv, C), views of `wkv_b.weight`."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _attend_naive(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor, start_pos: int) -> Tensor:
        """Up-project the latents to per-head keys and values, then standard attention.

        q_nope (B,S,H,N), q_pe (B,S,H,R), kv (B,T,C), pe (B,T,R) -> (B,S,H,Dv).
        """
        B, T, _ = kv.shape
        kv_up = self.wkv_b(kv).view(B, T, self.n_heads, -1)  # (B, T, H, N+Dv)
        k_nope, v = kv_up.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B,T,H,N), (B,T,H,Dv)
        k = torch.cat([k_nope, pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)  # (B,T,H,N+R)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, S, H, N+R)
        mask = causal_mask(start_pos, q.shape[1], device=q.device)  # (S, T)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=self.softmax_scale)  # (B, H, S, Dv)
        return out.transpose(1, 2)

    def _attend_absorbed(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor, start_pos: int) -> Tensor:
        """Attend against the latent cache directly: W_UK folded into q, W_UV applied after the sum.

        q_nope (B,S,H,N), q_pe (B,S,H,R), kv (B,T,C), pe (B,T,R) -> (B,S,H,Dv).
        """
        w_uk, w_uv = self._split_wkv_b()  # (H, N, C), (H, Dv, C)
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)  # (B, S, H, C)
        scores = (torch.einsum("bshc,btc->bsht", q_latent, kv)
                  + torch.einsum("bshr,btr->bsht", q_pe, pe)) * self.softmax_scale  # (B, S, H, T)
        if q_nope.shape[1] > 1:  # one new token (decoding) sees every cached position: nothing to mask
            mask = causal_mask(start_pos, q_nope.shape[1], device=q_nope.device)  # (S, T)
            scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
        # Softmax in fp32 (dtype= casts inside the kernel: no separate fp32 copy of the (B,S,H,T) scores).
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)  # (B, S, H, T)
        o_latent = torch.einsum("bsht,btc->bshc", probs, kv)  # (B, S, H, C)
        return torch.einsum("bshc,hvc->bshv", o_latent, w_uv)  # (B, S, H, Dv)

    def resolve_impl(self, impl: str | None = None, cache: KVCache | None = None) -> str:
        """The path a call with `impl` (None = `self.impl`) takes; "auto" is naive without a cache and
        absorbed with one. Each value v but "auto" names a method `_attend_<v>`.

        Raises:
            ValueError: `impl` not in `MLA_IMPLS`.
        """
        impl = self.impl if impl is None else impl
        if impl not in MLA_IMPLS:
            raise ValueError(f"impl={impl!r} must be one of MLA_IMPLS = {MLA_IMPLS}")
        if impl == "auto":
            return "naive" if cache is None else "absorbed"  # forward() picks "triton" on CUDA when decoding
        return impl

    def _attend_triton(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor, start_pos: int) -> Tensor:
        """`_attend_absorbed` with the latent attention in a Triton kernel (`kernels.mla_decode`, chapter 09).

        q_nope (B,S,H,N), q_pe (B,S,H,R), kv (B,T,C), pe (B,T,R) -> (B,S,H,Dv); the S queries are the
        last S of the T positions (T = start_pos + S). Raises TritonUnavailableError without Triton.
        """
        from .kernels import mla_decode  # imports without Triton; the call raises if it is missing

        w_uk, w_uv = self._split_wkv_b()  # (H, N, C), (H, Dv, C)
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk).contiguous()  # (B, S, H, C)
        o_latent = mla_decode(q_latent, q_pe.contiguous(), kv, pe, self.softmax_scale)  # (B, S, H, C)
        return torch.einsum("bshc,hvc->bshv", o_latent, w_uv)  # (B, S, H, Dv)

    def forward(self, x: Tensor, freqs_cis: Tensor, cache: KVCache | None = None, impl: str | None = None) -> Tensor:
        """Attend from the S new positions of `x` to all cached positions and themselves.

        Args:
            x: (B, S, D).
            freqs_cis: (S, R/2) complex rotary factors of the new positions.
            cache: this layer's latent cache (extended in place), or None for positions 0..S-1.
            impl: "naive", "absorbed", "triton" or "auto" (None = `self.impl`); "auto" picks naive
                without a cache; with one, "triton" when decoding (S <= 16) on CUDA with Triton installed,
                else "absorbed".
        Returns:
            (B, S, D).
        Raises:
            ValueError: on an unknown `impl`.
        """
        requested = impl
        impl = self.resolve_impl(impl, cache)
        if ((self.impl if requested is None else requested) == "auto" and cache is not None
                and x.shape[1] <= TRITON_MAX_NEW and x.is_cuda and _has_triton()):
            impl = "triton"  # decoding one token, or a few drafted ones, on a GPU with Triton
        B, S, _ = x.shape
        start_pos = cache.length if cache is not None else 0
        q_nope, q_pe = self._queries(x, freqs_cis)
        kv, pe = self._latents(x, freqs_cis)  # (B, S, C), (B, S, R)
        if cache is not None:
            both = cache.update(kv=kv, pe=pe)
            kv, pe = both["kv"].to(x.dtype), both["pe"].to(x.dtype)  # (B, T, C), (B, T, R)
        attend = getattr(self, f"_attend_{impl}")  # one method per path: _attend_naive, _attend_absorbed, ...
        out = attend(q_nope, q_pe, kv, pe, start_pos)  # (B, S, H, Dv)
        return self.wo(out.reshape(B, S, self.n_heads * self.v_head_dim))
