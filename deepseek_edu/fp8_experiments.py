"""The three FP8 experiments of chapter 08, shared by `benchmarks/fp8_*.py` and the notebook.

1. `granularity_errors`: quantisation error of real activations at four granularities (V3 §3.3.1).
2. `accumulation_sweep`: the emulated limited-precision GEMM against K, with and without promotion
   (V3 §3.3.2: "nearly 2%" at K = 4096 without it).
3. `train_run`: the same tiny DeepSeek, same seed, same batches, trained in FP32, in FP8 with V3's
   fine-grained scaling and in FP8 with tensorwise scaling (V3 §3.3, App. B.1: relative loss error
   below 0.25%).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .data import BatchSampler
from .evaluation import trailing_mean
from .fp8 import (
    FP8_BLOCK,
    act_dequant_ref,
    act_quant_ref,
    limited_precision_matmul,
    max_relative_error,
    quantize_rowwise,
    quantize_tensorwise,
    to_fp8,
    weight_dequant_ref,
    weight_quant_ref,
)
from .model import Transformer
from .optim import optimizer_step
from .train import lm_loss

GRANULARITY_NAMES = ("tensorwise", "per-row", "1x128", "128x128")
PRECISIONS = ("fp32", "fp8", "fp8-tensorwise", "fp32-perturbed")
# the control arm: FP32 with every initial weight multiplied by (1 + PERTURBATION * N(0, 1)), a change about
# 10^5 times smaller than an E4M3 rounding, to measure how far two FP32 runs drift apart by chaos alone
PERTURBATION = 1e-6


def dequantized(x: Tensor, granularity: str, block_size: int = FP8_BLOCK) -> Tensor:
    """x (N, K) quantised to E4M3 at `granularity` (one of GRANULARITY_NAMES) and dequantised, fp32."""
    if granularity == "tensorwise":
        y, s = quantize_tensorwise(x)
        return y.float() * s
    if granularity == "per-row":
        y, s = quantize_rowwise(x)
        return y.float() * s
    if granularity == "1x128":
        return act_dequant_ref(*act_quant_ref(x, block_size), block_size)
    if granularity == "128x128":
        return weight_dequant_ref(*weight_quant_ref(x, block_size), block_size)
    raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITY_NAMES}")


def granularity_errors(x: Tensor, block_size: int = FP8_BLOCK) -> dict[str, dict[str, float]]:
    """Per granularity: relative error ||x - dq(q(x))|| / ||x|| and the fraction of nonzeros flushed to 0.

    Args:
        x: (N, K) activations (fp32).
    """
    out = {}
    nonzero = x != 0
    for g in GRANULARITY_NAMES:
        d = dequantized(x, g, block_size)
        out[g] = {"rel_error": float((d - x).norm() / x.norm()),
                  "flushed_to_zero": float(((d == 0) & nonzero).sum() / nonzero.sum().clamp_min(1))}
    return out


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    """Inputs (N, K) of every nn.Linear of `model` on one forward of `tokens` (B, S), keyed by module name."""
    inputs: dict[str, Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, name=name):
                if name not in inputs:  # the first call (an expert may run on an empty block later)
                    inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float().clone()
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def accumulation_sweep(ks: list[int], seeds: list[int], m: int = 64, n: int = 64, mantissa_bits: int = 14,
                       n_c: int = 128) -> list[dict[str, float]]:
    """Max relative error of the emulated GEMM against an exact (fp64) one, for each K and seed.

    Inputs: standard normal (M, K) and (K, N), cast to E4M3 (the GEMM's inputs are FP8 values);
    the reference multiplies those same FP8 values in fp64. Error: `max_relative_error`.
    Returns one dict per (K, seed): k, seed, no_promotion, promotion.
    """
    rows = []
    for k in ks:
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn).float()
            b = torch.randn(k, n, generator=g).to(torch.float8_e4m3fn).float()
            ref = a.double() @ b.double()
            rows.append({"k": k, "seed": seed,
                         "no_promotion": max_relative_error(limited_precision_matmul(a, b, mantissa_bits), ref),
                         "promotion": max_relative_error(limited_precision_matmul(a, b, mantissa_bits, n_c), ref)})
    return rows


def make_model(model_cfg: ModelConfig, precision: str, seed: int, block_size: int = FP8_BLOCK) -> Transformer:
    """A fresh `Transformer` from `seed`, in `precision` (one of PRECISIONS); same weights for every precision.

    "fp32-perturbed" is the FP32 model with its initial weights perturbed by a relative PERTURBATION (the
    control arm: how much two FP32 runs that differ in the sixth digit of their weights end up apart).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
    torch.manual_seed(seed)
    model = Transformer(copy.deepcopy(model_cfg))
    for m in model.modules():
        if hasattr(m, "dispatch_impl"):
            m.dispatch_impl = "loop"  # the same expert path for every precision
    if precision == "fp32-perturbed":
        g = torch.Generator().manual_seed(seed + 10_000)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=g))
    elif precision != "fp32":
        to_fp8(model, "tensorwise" if precision == "fp8-tensorwise" else "blockwise", block_size)
    return model


def train_run(model_cfg: ModelConfig, train_tokens: Tensor, val_tokens: Tensor, precision: str, seed: int,
              steps: int, batch_size: int, seq_len: int, lr: float = 3e-3, data_seed: int = 0,
              block_size: int = FP8_BLOCK, val_batches: int = 8, return_model: bool = False) -> dict[str, object]:
    """Train `steps` AdamW steps from `seed` on batches from `data_seed`; per-step loss and final val loss.

    FP32 master weights and optimizer state in every precision; only the FP8Linear GEMM inputs change.
    Returns: {"precision", "seed", "loss": [per step, the total training loss], "val_loss": float}
    (and "model", the trained model, with `return_model`).
    """
    model = make_model(model_cfg, precision, seed, block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = BatchSampler(train_tokens, batch_size, seq_len, seed=data_seed)
    losses = []
    model.train()
    for step in range(steps):
        x, y = sampler.batch(step)
        loss, metrics = lm_loss(model(x), y, model_cfg.mtp_loss_weight if model_cfg.n_mtp_depth else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clip, skip a non-finite gradient (FP8 GEMMs can make one), step, move the router biases
        optimizer_step(model, opt, grad_clip=1.0)
        losses.append(metrics["loss"])
    model.eval()
    val = BatchSampler(val_tokens, batch_size, seq_len, seed=12345)
    with torch.no_grad():
        vl = [float(torch.nn.functional.cross_entropy(model(x, mtp=False).logits.flatten(0, 1), y.flatten()))
              for x, y in (val.batch(i) for i in range(val_batches))]
    out = {"precision": precision, "seed": seed, "loss": losses, "val_loss": sum(vl) / len(vl)}
    return {**out, "model": model} if return_model else out


def channel_outliers(x: Tensor) -> dict[str, float]:
    """x (N, K): per-channel max |x|; the largest over the median (how far the outlier channels stand out)."""
    amax = x.abs().amax(dim=0)  # (K,)
    return {"max_over_median": float(amax.max() / amax.median().clamp_min(1e-30)),
            "top_channel": int(amax.argmax()), "max_abs": float(amax.max())}


def relative_loss_error(loss: list[float], ref: list[float], window: int = 1) -> list[float]:
    """|L - L_ref| / L_ref step by step, after a trailing mean over `window` steps of both curves."""
    a, b = trailing_mean(loss, window), trailing_mean(ref, window)
    return [abs(x - y) / y if math.isfinite(x) else float("inf") for x, y in zip(a, b)]
