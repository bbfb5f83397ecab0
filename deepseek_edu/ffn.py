"""The SwiGLU feed-forward network (Shazeer 2020), DeepSeek's `MLP`.

FFN(x) = w2( silu(w1 x) * w3 x ): a gated linear unit with the SiLU gate. DeepSeek uses it for
the dense layers (width `inter_dim`) and for every expert of DeepSeekMoE (width `moe_inter_dim`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """SwiGLU FFN. Shapes: (..., dim) -> (..., dim); weights w1, w3 (inter_dim, dim), w2 (dim, inter_dim)."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate projection
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up projection

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
