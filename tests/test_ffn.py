"""Tests of deepseek_edu.ffn.MLP, the SwiGLU feed-forward network.

Checks: MLP(x) = w2(silu(w1 x) * w3 x) computed by hand with silu(z) = z * sigmoid(z), in fp32
(within 1e-5) and bf16 (within bf16 tolerance of the fp32 result); weight shapes; the gate is w1,
not w3 (swapping them changes the output); shapes (..., dim) -> (..., dim) for any leading dims.
"""

from __future__ import annotations

import torch

from deepseek_edu.ffn import MLP

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 matmuls of width <= 64
BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # bf16: 8 mantissa bits through three matmuls


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _mlp(dim=16, inter=40, seed=0):
    torch.manual_seed(seed)
    mlp = MLP(dim, inter)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.5)
    return mlp


def _hand(mlp, x):
    x = x.double()
    w1, w2, w3 = (getattr(mlp, n).weight.double() for n in ("w1", "w2", "w3"))
    g = x @ w1.T
    return ((g * torch.sigmoid(g)) * (x @ w3.T)) @ w2.T


def test_weight_shapes():
    mlp = MLP(16, 40)
    assert mlp.w1.weight.shape == (40, 16) and mlp.w3.weight.shape == (40, 16) and mlp.w2.weight.shape == (16, 40)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))


def test_swiglu_by_hand_fp32():
    mlp = _mlp()
    x = torch.randn(3, 5, 16)
    y = mlp(x)
    ref = _hand(mlp, x).float()
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, **FP32_TOL, msg=lambda m: f"max diff {_max_diff(y, ref)}\n{m}")


def test_gate_is_w1():
    mlp = _mlp()
    x = torch.randn(4, 16)
    swapped = _mlp()
    with torch.no_grad():
        swapped.w1.weight.copy_(mlp.w3.weight)
        swapped.w3.weight.copy_(mlp.w1.weight)
    assert _max_diff(mlp(x), swapped(x)) > 1e-2, "silu must gate w1 x, not w3 x"


def test_swiglu_bf16():
    mlp = _mlp()
    x = torch.randn(2, 7, 16)
    ref = _hand(mlp, x).float()
    y = mlp.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    scale = ref.abs().max()
    torch.testing.assert_close(y.float() / scale, ref / scale, **BF16_TOL,
                               msg=lambda m: f"max diff {_max_diff(y, ref)} (max |y| {scale:.3f})\n{m}")


def test_any_leading_shape():
    mlp = _mlp()
    for shape in ((16,), (2, 16), (2, 3, 4, 16)):
        x = torch.randn(shape)
        assert mlp(x).shape == shape
