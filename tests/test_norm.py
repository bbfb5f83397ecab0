"""Tests of deepseek_edu.norm.RMSNorm.

Checks: the output equals the hand formula x / sqrt(mean(x^2) + eps) * weight and
`torch.nn.RMSNorm` with the same eps and weight (fp32, within 1e-6); shapes and dtype are kept;
a bf16 input has its statistic computed in fp32 (output bitwise equal to the fp32 computation
cast once to bf16, and within bf16 tolerance of the fp32 reference); a wrong last dimension raises
ValueError.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.norm import RMSNorm

FP32_TOL = dict(atol=1e-6, rtol=1e-6)  # same formula, only summation order may differ
BF16_TOL = dict(atol=1e-2, rtol=1.6e-2)  # bf16 has 8 mantissa bits: one rounding of the output


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _rmsnorm_hand(x, weight, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def _norm(dim, eps, seed=0):
    torch.manual_seed(seed)
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))  # a non-trivial weight catches a forgotten scale
    return norm


def test_hand_formula():
    norm = _norm(24, 1e-6)
    x = torch.randn(3, 5, 24) * 3
    y = norm(x)
    ref = _rmsnorm_hand(x, norm.weight, 1e-6).float()
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, **FP32_TOL, msg=lambda m: f"max diff {_max_diff(y, ref)}\n{m}")


def test_eps_is_inside_the_square_root():
    # For a tiny vector eps dominates: the output is x / sqrt(eps) * w, not x / (rms + eps) * w.
    norm = RMSNorm(4, eps=1e-2)
    x = torch.full((1, 4), 1e-4)
    y = norm(x)
    expected = 1e-4 / (1e-8 + 1e-2) ** 0.5
    torch.testing.assert_close(y, torch.full_like(y, expected), atol=1e-9, rtol=1e-6)


def test_matches_torch_rmsnorm():
    for eps in (1e-6, 1e-5, 0.1):
        ours = _norm(32, eps)
        theirs = torch.nn.RMSNorm(32, eps=eps)
        with torch.no_grad():
            theirs.weight.copy_(ours.weight)
        x = torch.randn(4, 7, 32)
        a, b = ours(x), theirs(x)
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m: f"eps={eps}: max diff {_max_diff(a, b)}\n{m}")


def test_bf16_statistic_in_fp32():
    norm = _norm(256, 1e-6)
    # large offset + small spread: the mean square is where bf16 arithmetic would lose bits
    x = (torch.randn(8, 256) * 0.1 + 30.0).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # Exactly the fp32 computation rounded once to bf16.
    once = (norm.weight * x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(y, once), f"bf16 output is not the fp32 result rounded once; max diff {_max_diff(y, once)}"
    ref = _rmsnorm_hand(x.float(), norm.weight, 1e-6)  # fp64 reference of the same bf16 input
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL,
                               msg=lambda m: f"max diff {_max_diff(y, ref)}\n{m}")


def test_bf16_module_weights():
    norm = _norm(64, 1e-6).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = norm(x)
    ref = _rmsnorm_hand(x.float(), norm.weight.float(), 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL, msg=lambda m: f"max diff {_max_diff(y, ref)}\n{m}")


def test_wrong_last_dim_raises():
    norm = RMSNorm(16)
    with pytest.raises(ValueError, match=r"16.*15"):
        norm(torch.randn(2, 15))


def test_weight_starts_at_one_and_is_trainable():
    norm = RMSNorm(8)
    assert torch.equal(norm.weight.detach(), torch.ones(8))
    x = torch.randn(3, 8, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is not None and x.grad is not None
