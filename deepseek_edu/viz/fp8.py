"""Chapter 08 figures: the E4M3 number line, scaling granularity, accumulation precision, FP8 vs FP32
training, the FP8 linear layer, and the table of the paper's numbers beside ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches as mpatches
import matplotlib.ticker as mticker
from matplotlib.figure import Figure

from .core import _to_numpy, new_figure
from .plots import plot_bars


def plot_e4m3_number_line(values: Sequence[float]) -> Figure:
    """The E4M3 values (non-negative, sorted) near 1 and near 448, as ticks on two number lines."""
    v = _to_numpy(values)
    fig, axes = new_figure(6.5, 2.4, nrows=2)
    for ax, (lo, hi), label in zip(axes, ((0.5, 2.0), (192.0, 460.0)), ("near 1: step 1/8 above 1", "near 448: step 32")):
        sel = v[(v >= lo) & (v <= hi)]
        ax.vlines(sel, 0, 1, color="#4c72b0")
        ax.set(xlim=(lo - 0.02 * (hi - lo), hi), ylim=(0, 1.3), yticks=[], title=f"E4M3 {label}")
        ax.set_xticks(sel if len(sel) <= 13 else sel[::2])
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    axes[1].axvline(448, color="#c44e52", ls="--")
    axes[1].text(448, 1.05, "max 448 (no inf)", color="#c44e52", ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_granularity_errors(errors: Mapping[str, float], title: str = "") -> Figure:
    """Bars: relative quantisation error (%) per scaling granularity."""
    names = list(errors)
    return plot_bars(names, [100 * errors[n] for n in names], xlabel="relative error ||x - dq(q(x))|| / ||x|| (%)",
                     title=title)


def plot_accumulation(rows: Sequence[Mapping[str, float]], committed: Mapping[str, Any] | None = None,
                      v3_error: float = 0.02) -> Figure:
    """Max relative error (%) against K, without and with promotion: live rows, committed `by_k` dashed."""
    fig, ax = new_figure(5.5, 3.0)
    for key, color in (("no_promotion", "#c44e52"), ("promotion", "#4c72b0")):
        ks = sorted({r["k"] for r in rows})
        ax.plot(ks, [100 * max(r[key] for r in rows if r["k"] == k) for k in ks], "o-", color=color,
                label=f"{key.replace('_', ' ')} (this run)")
        if committed:
            kk = sorted(int(k) for k in committed)
            ax.plot(kk, [100 * committed[str(k)][key]["mean"] for k in kk], "--", color=color, alpha=0.6,
                    label=f"{key.replace('_', ' ')} (committed JSON)")
    ax.axhline(100 * v3_error, color="gray", ls=":", label="V3: nearly 2% at K = 4096")
    ax.set(xscale="log", yscale="log", xlabel="K (inner dimension)", ylabel="max relative error (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_fp8_training(rel_err: Mapping[str, Sequence[float]], spread: Sequence[float] | None = None,
                      bound: float = 0.0025, title: str = "") -> Figure:
    """Relative loss error (%) against step per variant, with the seed spread and V3's bound."""
    fig, ax = new_figure(6.0, 3.0)
    for (name, curve), color in zip(rel_err.items(), ("#4c72b0", "#c44e52", "#55a868")):
        ax.plot(range(len(curve)), [100 * v for v in curve], color=color, label=name)
    if spread is not None:
        ax.plot(range(len(spread)), [100 * v for v in spread], color="gray", alpha=0.7, label="seed spread (FP32 vs FP32)")
    ax.axhline(100 * bound, color="black", ls=":", label="V3: < 0.25%")
    ax.set(yscale="log", xlabel="step", ylabel="relative loss error (%)", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_fp8_gradient_error(by_step: Mapping[Any, Mapping[str, float]], title: str = "") -> Figure:
    """Relative gradient error (%) of each FP8 recipe against FP32 at the same weights, against training step;
    below it, when recorded, how far the outlier channels of the linear layers' inputs stand out.

    by_step: {step: {"fp8": error, "fp8-tensorwise": error[, "outlier_ratio": r, "outlier_ratio_max": r]}}, as
    `fp8_experiments.gradient_error_summary`'s "by_step" (step keys may be strings, as read back from JSON).
    """
    steps = sorted(by_step, key=int)
    xs = [int(s) for s in steps]
    outliers = all("outlier_ratio_max" in by_step[s] for s in steps)
    fig, axes = new_figure(6.0, 4.4 if outliers else 3.0, nrows=2 if outliers else 1, sharex=True)
    ax = axes[0] if outliers else axes
    for arm, label, color in (("fp8", "FP8, fine-grained tiles", "#4c72b0"),
                              ("fp8-tensorwise", "FP8, one scale per tensor", "#c44e52")):
        ax.plot(xs, [100 * by_step[s][arm] for s in steps], "o-", color=color, label=label)
    ax.set(ylabel="gradient error (%)", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if outliers:
        axes[1].plot(xs, [by_step[s]["outlier_ratio_max"] for s in steps], "s-", color="black",
                     label="the layer where it is largest")
        axes[1].plot(xs, [by_step[s]["outlier_ratio"] for s in steps], "s--", color="gray", label="the median layer")
        axes[1].set(ylabel="outlier ratio\n(max / median channel)", yscale="log")
        axes[1].yaxis.set_major_locator(mticker.FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]))
        axes[1].yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        axes[1].yaxis.set_minor_formatter(mticker.NullFormatter())
        axes[1].legend(fontsize=7)
        axes[1].grid(alpha=0.3)
    (axes[1] if outliers else ax).set_xlabel("training step of the FP32 run")
    fig.tight_layout()
    return fig


def _times(ratio: float | None) -> str:
    """"x1.16, " for a ratio; "" for None (fine-grained error exactly 0: no ratio)."""
    return f"x{ratio:.2f}, " if ratio is not None else ""


def fp8_gradient_error_summary(training: Mapping[str, Any]) -> list[str]:
    """The committed run's gradient-error probes (`gradient_error` of a fp8_training JSON) as lines of text."""
    g = training.get("gradient_error")
    if g is None:
        raise ValueError("this fp8_training JSON has no gradient-error probes: run the benchmark with --probe-every > 0")
    p, cfg = g["paired"], training["config"]
    seeds = ", ".join(f"{100 * v:+.2f}" for v in p["per_seed_mean"].values())
    se = (f"standard error over seeds {100 * p['seed_se']:.2f}" if p["seed_se"] is not None
          else "one seed, so no standard error over seeds")
    if p["t_seeds"] is not None:
        se += f" (t = {p['t_seeds']:.1f})"
    return [f"committed: {p['n_probes']} probes (every {cfg['probe_every']} steps of {len(p['per_seed_mean'])} FP32 runs) "
            f"x {cfg['probe_batches']} held-out batches = {p['n_pairs']} gradients per recipe, against FP32 at the same weights:",
            f"  gradient error: fine-grained {100 * g['mean']['fp8']:.2f}%, tensorwise {100 * g['mean']['fp8-tensorwise']:.2f}%"
            + (f" ({_times(p['ratio'])[:-2]})" if p["ratio"] is not None else ""),
            f"  tensorwise - fine-grained: {100 * p['mean']:+.2f} points on average; per seed {seeds}; {se}; "
            f"tensorwise worse on {p['fraction_positive']:.0%} of the batches"]


def plot_fp8_linear_diagram() -> Figure:
    """The three GEMMs of an FP8 linear layer (V3 Fig. 6), with the granularity of each FP8 input."""
    fig, ax = new_figure(7.0, 3.0)
    ax.set_axis_off()
    ax.set(xlim=(0, 10), ylim=(0, 6))
    boxes = {
        "x (fp32/bf16)": (0.2, 4.6), "q: 1x128 tiles": (2.4, 4.6), "W master (fp32)": (0.2, 2.6),
        "q: 128x128 blocks": (2.4, 2.6), "Fprop GEMM\ny = x W^T": (5.2, 4.6), "Dgrad GEMM\ndx = dy W": (5.2, 2.6),
        "Wgrad GEMM\ndW = dy^T x": (5.2, 0.6), "dy: 1x128 tiles (dgrad)\n128x1 tiles (wgrad)": (7.6, 2.6),
        "x: 128x1 tiles": (2.4, 0.6),
    }
    for text, (x, y) in boxes.items():
        fp8 = text.startswith(("q:", "dy:", "x: 128"))
        ax.add_patch(mpatches.FancyBboxPatch((x, y), 2.1, 0.9, boxstyle="round,pad=0.05",
                                             fc="#fde2e4" if fp8 else ("#dfe7fd" if "GEMM" in text else "#e2ece9"),
                                             ec="gray"))
        ax.text(x + 1.05, y + 0.45, text, ha="center", va="center", fontsize=7)
    for (x0, y0), (x1, y1) in (((2.3, 5.05), (2.4, 5.05)), ((4.5, 5.05), (5.2, 5.05)), ((2.3, 3.05), (2.4, 3.05)),
                               ((4.5, 3.05), (5.2, 3.05)), ((4.5, 3.3), (5.2, 4.8)), ((7.6, 3.05), (7.3, 3.05)),
                               ((7.6, 2.8), (7.3, 1.05)), ((1.25, 4.6), (2.4, 1.3)), ((4.5, 1.05), (5.2, 1.05))):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "gray"})
    ax.text(0.2, 5.8, "pink: E4M3 inputs with their scales; blue: GEMMs accumulating in FP32 (promotion every 128)",
            fontsize=7)
    return fig


def fp8_training_arms(training: Mapping[str, Any]) -> dict[str, str]:
    """The compared arms of a `benchmarks/fp8_training.py` JSON, {arm: label}, in the order they are drawn."""
    b = training["config"]["block_size"]
    arms = {"fp8": f"FP8, 1x{b} / {b}x{b} tiles", "fp8-tensorwise": "FP8, one scale per tensor",
            "fp32-perturbed": "FP32, initial weights x (1 + 1e-6 noise)"}
    return {a: label for a, label in arms.items() if a in training["final_rel_loss_error"]}


def fp8_training_curves(training: Mapping[str, Any]) -> dict[str, list[float]]:
    """{label: relative loss error per step, mean over seeds} of each arm against FP32 (for `plot_fp8_training`)."""
    out = {}
    for arm, label in fp8_training_arms(training).items():
        curves = list(training["rel_loss_error"][arm].values())
        out[label] = [sum(vals) / len(vals) for vals in zip(*curves)]
    return out


def fp8_training_summary(training: Mapping[str, Any]) -> list[str]:
    """The committed FP8-vs-FP32 training run as lines of text: per arm, the final relative loss errors."""
    cfg = training["config"]
    pct = lambda xs: "[" + ", ".join(f"{100 * x:.2f}%" for x in xs) + "]"  # noqa: E731
    fin, val = training["final_rel_loss_error"], training["final_val_rel_error"]
    signed = training.get("final_val_signed_rel_diff", {})
    lines = [f"committed: {len(training['val_loss']['fp32'])} seeds x {cfg['steps']} steps of {cfg['batch_size']} x "
             f"{cfg['seq_len']} tokens; validation on {cfg.get('val_batches', 8) * cfg['batch_size'] * cfg['seq_len']:,} "
             f"tokens; |L - L_FP32| / L_FP32 per seed, at the end:"]
    for arm, label in fp8_training_arms(training).items():
        sign = f"; signed mean {100 * signed[arm]['mean']:+.2f}%" if arm in signed else ""
        lines.append(f"  {label:42s} training loss {pct(fin[arm]['per_seed'])}, validation {pct(val[arm]['per_seed'])}{sign}")
    lines.append(f"  {'FP32, another seed':42s} training loss {100 * training['final_seed_spread']:.2f}%, "
                 f"validation {100 * training['val_seed_spread']:.2f}% (the closest pair of seeds)")
    return lines


def fp8_paper_vs_ours(accumulation: Mapping[str, Any], training: Mapping[str, Any],
                      granularity: Mapping[str, Any]) -> str:
    """A markdown table of V3's FP8 numbers beside the committed benchmark JSONs'."""
    import torch
    at = accumulation["by_k"]["4096"]
    fin, val = training["final_rel_loss_error"], training["final_val_rel_error"]
    g = granularity["mean_rel_error"]["b128"]
    ge = training.get("gradient_error")
    rows = [
        ("E4M3 max / E5M2 max", "448 / 57344", (f"{torch.finfo(torch.float8_e4m3fn).max:g} / "
         f"{torch.finfo(torch.float8_e5m2).max:g} (`torch.finfo`)")),
        ("max relative error, K = 4096, no promotion", "nearly 2%", f"{100 * at['no_promotion']['mean']:.2f}% (emulated, 14 bits)"),
        ("... with promotion every N_C = 128", "removed", f"{100 * at['promotion']['max']:.3f}%"),
        ("relative loss error, FP8 vs higher precision", "< 0.25% (App. B.1)",
         f"{100 * fin['fp8']['max']:.3f}% training loss (max over seeds), {100 * val['fp8']['max']:.3f}% validation"
         + (f"; FP32 with weights perturbed by 1e-6, by chaos alone: {100 * fin['fp32-perturbed']['max']:.3f}% / "
            f"{100 * val['fp32-perturbed']['max']:.3f}%" if "fp32-perturbed" in fin else "")),
        ("error, tensorwise vs fine-grained", "outliers motivate fine-grained scaling (§3.3.1)",
         f"activations {100 * g['tensorwise']:.2f}% vs {100 * g['1x128']:.2f}% (1x128)" + (
             f"; training gradient {100 * ge['mean']['fp8-tensorwise']:.2f}% vs {100 * ge['mean']['fp8']:.2f}% at the "
             f"same weights ({_times(ge['paired']['ratio'])}{ge['paired']['n_pairs']} gradients)" if ge else "")),
    ]
    lines = ["| quantity | DeepSeek-V3 | ours |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
