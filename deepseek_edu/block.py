"""One pre-norm Transformer block: attention, then a dense FFN or DeepSeekMoE.

    x -> x + attn(attn_norm(x)) -> x + ffn(ffn_norm(x))

Its own module so that both the main stack (`model.Transformer`) and the MTP modules (`mtp.MTPModule`,
DeepSeek-V3 §2.2: each depth is one more Transformer block) build on it without importing each other.
Attention is `mla.MLA` or `attention.Attention` (`cfg.attention`); the FFN is DeepSeekMoE from layer
`n_dense_layers` on when the config uses MoE, else a dense SwiGLU `ffn.MLP`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import Attention, KVCache
from .config import ModelConfig
from .ffn import MLP
from .mla import MLA
from .moe import MoE, MoEOutput
from .norm import RMSNorm


def _attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attention == "mla" else Attention(cfg)


def _ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    if cfg.uses_moe and layer_id >= cfg.n_dense_layers:
        return MoE(cfg)
    return MLP(cfg.dim, cfg.inter_dim)


class Block(nn.Module):
    """One pre-norm Transformer block: attention, then a dense FFN or DeepSeekMoE.

    Shapes: (B, S, D) -> ((B, S, D), the layer's `MoEOutput` or None for a dense FFN).
    """

    def __init__(self, layer_id: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = _attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = _ffn(cfg, layer_id)

    def forward(self, x: Tensor, freqs_cis: Tensor, cache: KVCache | None = None,
                attn_impl: str | None = None) -> tuple[Tensor, MoEOutput | None]:
        h = self.attn_norm(x)
        x = x + self.attn(h, freqs_cis, cache, impl=attn_impl)  # every attention class takes `impl`
        f = self.ffn(self.ffn_norm(x))
        if isinstance(f, MoEOutput):
            return x + f.y, f
        return x + f, None
