"""The three FP8 experiments of chapter 08, shared by `benchmarks/fp8_*.py` and the notebook.

1. `granularity_errors`: quantisation error of real activations at four granularities (V3 §3.3.1).
2. `accumulation_sweep`: the emulated limited-precision GEMM against K, with and without promotion
   (V3 §3.3.2: "nearly 2%" at K = 4096 without it).
3. `train_run`: the same tiny DeepSeek, same seed, same batches, trained in FP32, in FP8 with V3's
   fine-grained scaling and in FP8 with tensorwise scaling (V3 §3.3, App. B.1: relative loss error
   below 0.25%).
4. `gradient_errors`: at the FP32 run's own weights, how far each FP8 recipe's loss and gradient are from
   FP32's on the same batch. Loss curves of separate runs drift apart by chaos (any change, even one part in
   a million, moves them by tenths of a percent), so they cannot compare two recipes whose costs are smaller
   than that; the error of one backward pass at the same weights has no chaos in it.
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .data import BatchSampler
from .evaluation import trailing_mean
from .fp8 import (
    FP8_BLOCK,
    FP8Linear,
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


PROBE_RECIPES = {"fp8": "blockwise", "fp8-tensorwise": "tensorwise"}  # arm -> FP8Linear granularity
PROBE_SEED = 777  # the held-out batches every probe uses (`probe_batches_of`)
PROBE_FIELDS = ("step", *PROBE_RECIPES, "outlier_ratio")  # what one probe of `train_run` records


def probe_batches_of(val_tokens: Tensor, batch_size: int, seq_len: int, n: int) -> list[tuple[Tensor, Tensor]]:
    """The `n` held-out (x, y) batches, each (batch_size, seq_len) int64, on which `train_run` probes."""
    val = BatchSampler(val_tokens, batch_size, seq_len, seed=PROBE_SEED)
    return [val.batch(i) for i in range(n)]


def _loss_and_grad(model: nn.Module, x: Tensor, y: Tensor, mtp_loss_weight: float | None) -> tuple[float, Tensor]:
    model.zero_grad(set_to_none=True)
    loss, metrics = lm_loss(model(x), y, mtp_loss_weight)
    loss.backward()
    return metrics["loss"], torch.cat([p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel())
                                       for p in model.parameters()])


def _is_count(v: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _train_copy(model: nn.Module) -> nn.Module:
    """A deep copy in train mode whose MoE layers take the per-expert loop (the path `to_fp8` sets)."""
    twin = copy.deepcopy(model).train()
    for m in twin.modules():
        if hasattr(m, "dispatch_impl"):
            m.dispatch_impl = "loop"
    return twin


def gradient_errors(model: nn.Module, batches: list[tuple[Tensor, Tensor]], mtp_loss_weight: float | None = None,
                    block_size: int = FP8_BLOCK) -> dict[str, dict[str, list[float]]]:
    """Each FP8 recipe's loss and gradient against FP32's, at `model`'s weights, one training forward-backward per batch.

    Args:
        model: an FP32 `Transformer` (not changed: every pass runs on a deep copy in train mode, under a
            forked RNG).
        batches: [(x, y)], each (B, S) int64 token ids and targets; at least one.
        mtp_loss_weight: as `lm_loss` (None: no MTP term).
    Returns:
        {arm: {"grad_rel_error": [||g_q - g|| / ||g|| per batch], "loss_rel_error": [|L_q - L| / L per batch]}}
        for arm in PROBE_RECIPES, with g the gradient of every parameter (flattened, in FP32) and L the loss.
    Raises:
        ValueError: no batches, or a model that already has FP8 layers (its "FP32" reference would be FP8 too);
            an FP32 loss that is not finite and positive or an FP32 gradient that is zero or not finite (no
            relative error exists); an FP8 loss or gradient that is not finite (named by recipe and batch).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("gradient_errors needs at least one (x, y) batch")
    if any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("gradient_errors compares FP8 with FP32: pass the FP32 model, not one after to_fp8")
    out = {arm: {"grad_rel_error": [], "loss_rel_error": []} for arm in PROBE_RECIPES}
    with torch.random.fork_rng(devices=[]):
        for i, (x, y) in enumerate(batches):
            ref_loss, ref_grad = _loss_and_grad(_train_copy(model), x, y, mtp_loss_weight)
            ref_norm = float(ref_grad.norm())
            if not (math.isfinite(ref_loss) and ref_loss > 0 and math.isfinite(ref_norm) and ref_norm > 0):
                raise ValueError(f"batch {i}: the FP32 loss {ref_loss} or gradient norm {ref_norm} is not finite and "
                                 "positive, so the FP8 errors relative to it are undefined")
            for arm, granularity in PROBE_RECIPES.items():
                q = to_fp8(_train_copy(model), granularity, block_size)
                loss, grad = _loss_and_grad(q, x, y, mtp_loss_weight)
                if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
                    raise ValueError(f"batch {i}: the {arm} ({granularity}) loss or gradient is not finite")
                out[arm]["grad_rel_error"].append(float((grad - ref_grad).norm()) / ref_norm)
                out[arm]["loss_rel_error"].append(abs(loss - ref_loss) / ref_loss)
    return out


def linear_input_outliers(model: nn.Module, tokens: Tensor, min_rows: int = 16) -> dict[str, float]:
    """How far outlier channels stand out in the inputs of `model`'s linear layers, on one forward of `tokens`.

    Per linear layer with at least `min_rows` input rows (an expert may see few tokens), `channel_outliers`'
    max_over_median (largest channel's max |x| over the median channel's); returned: their "median" and "max"
    over layers. Runs on a deep copy under a forked RNG, so `model` is not changed.
    Raises:
        ValueError: min_rows < 1, or no linear layer saw `min_rows` rows.
    """
    if not _is_count(min_rows) or min_rows < 1:
        raise ValueError(f"min_rows={min_rows!r} must be an int >= 1")
    with torch.random.fork_rng(devices=[]):
        inputs = capture_linear_inputs(_train_copy(model), tokens)
    ratios = sorted(channel_outliers(x)["max_over_median"] for x in inputs.values() if x.shape[0] >= min_rows)
    if not ratios:
        raise ValueError(f"no linear layer saw {min_rows} or more rows: pass more tokens")
    return {"median": statistics.median(ratios), "max": ratios[-1]}


def train_run(model_cfg: ModelConfig, train_tokens: Tensor, val_tokens: Tensor, precision: str, seed: int,
              steps: int, batch_size: int, seq_len: int, lr: float = 3e-3, data_seed: int = 0,
              block_size: int = FP8_BLOCK, val_batches: int = 8, return_model: bool = False,
              probe_every: int = 0, probe_batches: int = 4) -> dict[str, object]:
    """Train `steps` AdamW steps from `seed` on batches from `data_seed`; per-step loss and final val loss.

    FP32 master weights and optimizer state in every precision; only the FP8Linear GEMM inputs change.
    With `probe_every` > 0 (FP32 only), a probe runs at steps 0, probe_every, ... and after the last step,
    on the same `probe_batches` held-out batches (`probe_batches_of`) each time: `gradient_errors`, and the
    `linear_input_outliers` of the first batch. The probes leave the run bitwise as it would be without them.
    Returns: {"precision", "seed", "loss": [per step, the total training loss], "val_loss": float}
    (and "model", the trained model, with `return_model`; "probes": [{"step", **gradient_errors,
    "outlier_ratio"}] with probes).
    Raises:
        ValueError: for an unknown precision; probes asked of a run that is not FP32; steps, val_batches,
            probe_every, probe_batches, seed or data_seed not an int; steps < 1 or val_batches < 1; lr not
            finite and positive; probe_every < 0, or
            probe_every > 0 with probe_batches < 1.
    """
    counts = {"steps": steps, "val_batches": val_batches, "probe_every": probe_every, "probe_batches": probe_batches}
    counts.update(seed=seed, data_seed=data_seed)
    for name, v in counts.items():
        if not _is_count(v):
            raise ValueError(f"{name}={v!r} must be an int")
    if steps < 1 or val_batches < 1:
        raise ValueError(f"steps={steps} and val_batches={val_batches} must be >= 1")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    if probe_every < 0 or (probe_every and probe_batches < 1):
        raise ValueError(f"probe_every={probe_every} must be >= 0 (0: no probes) and probe_batches={probe_batches} "
                         ">= 1 when probing")
    if probe_every and precision != "fp32":
        raise ValueError(f"probe_every={probe_every} needs precision='fp32' (the probes compare FP8 with FP32 "
                         f"at FP32's weights), got {precision!r}")
    model = make_model(model_cfg, precision, seed, block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = BatchSampler(train_tokens, batch_size, seq_len, seed=data_seed)
    mtp_weight = model_cfg.mtp_loss_weight if model_cfg.n_mtp_depth else None
    probe_set = probe_batches_of(val_tokens, batch_size, seq_len, probe_batches) if probe_every else []
    probes = []
    losses = []
    model.train()
    for step in range(steps + 1):
        if probe_every and (step % probe_every == 0 or step == steps):
            probes.append({"step": step, **gradient_errors(model, probe_set, mtp_weight, block_size),
                           "outlier_ratio": linear_input_outliers(model, probe_set[0][0])})
        if step == steps:
            break
        x, y = sampler.batch(step)
        loss, metrics = lm_loss(model(x), y, mtp_weight)
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
    if probe_every:
        out["probes"] = probes
    return {**out, "model": model} if return_model else out


def gradient_error_summary(probes: dict[int, list[dict]]) -> dict[str, object]:
    """Summarise `train_run`'s probes of several seeds: tensorwise against fine-grained, paired at the same weights.

    The unit of independence is the seed: the probes of one run share its trajectory, and every run is probed
    on the same batches, so the standard error is taken over the seeds' mean differences, not over probes.

    Args:
        probes: {seed: train_run(...)["probes"]}, every seed with at least one probe.
    Returns:
        "by_step": {step: {arm: mean grad_rel_error over seeds and batches, and when recorded "outlier_ratio"
        and "outlier_ratio_max": the median over seeds of each probe's median and largest layer ratio}}; "per_seed": {arm: {seed: mean}};
        "mean": {arm: mean grad_rel_error over every (seed, step, batch)}; "loss_mean": the same of loss_rel_error;
        "paired": the differences tensorwise - fine-grained at the same (seed, step, batch): "n_pairs",
        "n_probes" (seed x step), "mean", "fraction_positive", "per_seed_mean" {seed: mean}, "seed_se" (standard
        deviation of the per-seed means over sqrt(seeds); None with one seed), "t_seeds" (the mean of the per-seed
        means over seed_se; None with one seed or a zero seed_se) and
        "ratio" (mean tensorwise error / mean fine-grained error; None when the latter is 0).
    Raises:
        ValueError: probes not a mapping; no probes, a seed without probes, a probe without "step" or an arm, a
            probe whose arms have different numbers of batches, an error that is not a finite number >= 0, or
            an "outlier_ratio" that is not {"median", "max"} of finite numbers.
    """
    arms = list(PROBE_RECIPES)
    if not isinstance(probes, Mapping):
        raise ValueError(f"probes must be a mapping {{seed: train_run(...)['probes']}}, got {type(probes).__name__}")
    probes = {seed: list(ps) for seed, ps in probes.items()}  # a generator is read once, here
    if not probes or any(not ps for ps in probes.values()):
        raise ValueError("no probes (for some seed): run train_run with probe_every > 0")
    for seed, ps in probes.items():
        for p in ps:
            if not isinstance(p, dict) or "step" not in p or any(
                    not isinstance(p.get(arm), dict) or not {"grad_rel_error", "loss_rel_error"} <= set(p[arm])
                    for arm in arms):
                raise ValueError(f"seed {seed}: a probe must be a dict with 'step' and, for each of {arms}, "
                                 "'grad_rel_error' and 'loss_rel_error' lists (as train_run records)")
            lists = [p[arm][key] for arm in arms for key in ("grad_rel_error", "loss_rel_error")]
            if not all(isinstance(v, (list, tuple)) for v in lists):
                raise ValueError(f"seed {seed}, step {p['step']}: each arm's errors must be a list, one per batch")
            o = p.get("outlier_ratio")
            if o is not None and not (isinstance(o, dict) and all(
                    isinstance(o.get(k), (int, float)) and not isinstance(o.get(k), bool) and math.isfinite(o[k])
                    for k in ("median", "max"))):
                raise ValueError(f"seed {seed}, step {p['step']}: outlier_ratio must be {{'median', 'max'}} of finite "
                                 f"numbers (as linear_input_outliers returns), got {o!r}")
            if len({len(v) for v in lists}) != 1 or not lists[0]:
                raise ValueError(f"seed {seed}, step {p['step']}: the arms' lists of batches differ or are empty")
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e >= 0
                       for v in lists for e in v):
                raise ValueError(f"seed {seed}, step {p['step']}: every error must be a finite number >= 0")
    vals = {arm: {seed: [e for p in ps for e in p[arm]["grad_rel_error"]] for seed, ps in probes.items()} for arm in arms}
    diffs = {seed: [t - b for t, b in zip(vals["fp8-tensorwise"][seed], vals["fp8"][seed])] for seed in probes}
    flat = [d for ds in diffs.values() for d in ds]
    mean = {arm: sum(sum(v) for v in vals[arm].values()) / len(flat) for arm in arms}
    losses = {arm: [e for ps in probes.values() for p in ps for e in p[arm]["loss_rel_error"]] for arm in arms}
    seed_means = [sum(ds) / len(ds) for ds in diffs.values()]
    seed_mean = sum(seed_means) / len(seed_means)
    seed_se = (math.sqrt(sum((m - seed_mean) ** 2 for m in seed_means) / (len(seed_means) - 1) / len(seed_means))
               if len(seed_means) > 1 else None)
    by_step = {}
    for step in sorted({p["step"] for ps in probes.values() for p in ps}):
        at = [p for ps in probes.values() for p in ps if p["step"] == step]
        by_step[step] = {arm: sum(sum(p[arm]["grad_rel_error"]) for p in at) / sum(len(p[arm]["grad_rel_error"]) for p in at)
                         for arm in arms}
        if all("outlier_ratio" in p for p in at):
            by_step[step]["outlier_ratio"] = statistics.median(p["outlier_ratio"]["median"] for p in at)
            by_step[step]["outlier_ratio_max"] = statistics.median(p["outlier_ratio"]["max"] for p in at)
    return {"by_step": by_step, "per_seed": {arm: {s: sum(v) / len(v) for s, v in vals[arm].items()} for arm in arms},
            "mean": mean, "loss_mean": {arm: sum(v) / len(v) for arm, v in losses.items()},
            "paired": {"n_pairs": len(flat), "n_probes": sum(len(ps) for ps in probes.values()),
                       "mean": sum(flat) / len(flat), "fraction_positive": sum(d > 0 for d in flat) / len(flat),
                       "per_seed_mean": dict(zip(probes, seed_means)), "seed_se": seed_se,
                       "t_seeds": seed_mean / seed_se if seed_se else None,
                       "ratio": mean["fp8-tensorwise"] / mean["fp8"] if mean["fp8"] else None}}


def channel_outliers(x: Tensor) -> dict[str, float]:
    """x (N, K): per-channel max |x|; the largest over the median (how far the outlier channels stand out)."""
    amax = x.abs().amax(dim=0)  # (K,)
    return {"max_over_median": float(amax.max() / amax.median().clamp_min(1e-30)),
            "top_channel": int(amax.argmax()), "max_abs": float(amax.max())}


def relative_loss_error(loss: list[float], ref: list[float], window: int = 1) -> list[float]:
    """|L - L_ref| / L_ref step by step, after a trailing mean over `window` steps of both curves."""
    a, b = trailing_mean(loss, window), trailing_mean(ref, window)
    return [abs(x - y) / y if math.isfinite(x) else float("inf") for x, y in zip(a, b)]
