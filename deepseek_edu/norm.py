"""RMSNorm: scale each vector by the reciprocal of its root mean square (Zhang & Sennrich, 2019).

DeepSeek uses RMSNorm everywhere a LayerNorm would sit (before attention, before the FFN, on the
KV latent `kv_norm` and the query latent `q_norm` of MLA, and in the MTP modules). There is no mean
subtraction and no bias: y = x / sqrt(mean(x^2) + eps) * weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.

    Shapes: (..., dim) -> (..., dim), same dtype as the input. The statistic is computed in fp32
    whatever the input dtype (bf16 mean squares lose too many bits), then cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expects last dimension {self.dim}, got shape {tuple(x.shape)}")
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
