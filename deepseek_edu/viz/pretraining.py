"""Chapters 06-07 figures: where the parameters are and how they grow with the experts (06); the
pre-training losses (main and MTP heads) with the expert load, validation bits per character of
several runs, and the committed training throughput of MoE against dense as printed lines (07).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .core import _to_numpy, new_figure
from .plots import plot_heatmap


def plot_pretraining(history: Sequence[Mapping[str, Any]], loads: Any, last: int = 40) -> Figure:
    """Chapter 07: main and MTP training losses with validation points, and the expert load heatmap.

    Args:
        history: `Trainer.history` records (keys "step", "ce", "mtp_ce_k", "val_loss").
        loads: (steps, layers, E) tokens per routed expert at every step.
        last: steps the load panel sums over.
    """
    fig, (ax1, ax2) = new_figure(10.0, 3.4, ncols=2)
    steps = [r["step"] for r in history]
    ax1.plot(steps, [r["ce"] for r in history], label="main head (next token)", color="#4c72b0", lw=1)
    for k in sorted(k for k in history[-1] if k.startswith("mtp_ce")):
        ax1.plot(steps, [r[k] for r in history], label=f"{k} (token after next)", color="#dd8452", lw=1)
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if val:
        ax1.plot(*zip(*val), "o-", color="black", ms=4, label="validation, main head")
    ax1.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="pre-training the tiny DeepSeek")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    load = _to_numpy(loads)[-last:].sum(0)  # (layers, E)
    plot_heatmap(load / load.sum(-1, keepdims=True) * load.shape[-1], x_labels=[str(e) for e in range(load.shape[-1])],
                 y_labels=[f"MoE layer {i}" for i in range(load.shape[0])], cmap="RdBu_r", vmin=0, vmax=2,
                 title=f"expert load, last {last} steps (1 = the mean)", xlabel="routed expert", ax=ax2)
    fig.tight_layout()
    return fig


def plot_runs_bits_per_char(runs: Mapping[str, Sequence[Mapping[str, Any]]], chars_per_token: float,
                            reference: float | None = None, reference_label: str = "") -> Figure:
    """Chapter 07: validation loss in bits per character against training tokens, one line per run.

    Args:
        runs: label -> history records with "tokens" and "val_loss" (nats/token; None when not evaluated).
        chars_per_token: of the validation text, to convert nats/token to bits/character.
        reference: a horizontal line (bits/character), e.g. the unigram baseline.
    """
    fig, ax = new_figure(6.5, 3.2)
    for label, hist in runs.items():
        pts = [(r["tokens"], r["val_loss"] / math.log(2) / chars_per_token) for r in hist
               if r.get("val_loss") is not None]
        ax.plot(*zip(*pts), "o-", ms=4, label=label)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1, label=reference_label)
    ax.set(xlabel="training tokens", ylabel="validation bits / character", xscale="log",
           title="the live run and the course model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PART_COLORS = {"embedding": "#bbbbbb", "attention": "#8172b2", "dense_ffn": "#4c72b0", "moe": "#55a868",
               "norms": "#dddd88", "head": "#888888"}  # the parts of `analysis.ParamCount.parts`


def plot_parameter_parts(counts: Mapping[str, Any]) -> Figure:
    """Chapter 06: where each model's parameters are (left) and activated against total parameters (right).

    Args:
        counts: model name -> `analysis.ParamCount` (or anything with `parts`: part -> parameters,
            `total` and `activated`), drawn top to bottom in this order.
    """
    fig, (ax1, ax2) = new_figure(11.0, 3.4, ncols=2)
    names = list(counts)
    for i, name in enumerate(names):
        c, left = counts[name], 0.0
        for part, n in c.parts.items():
            ax1.barh(i, n / c.total, left=left, color=PART_COLORS[part], label=part if i == 0 else None)
            left += n / c.total
    ax1.set_yticks(range(len(names)), names)
    ax1.set(xlabel="share of total parameters", title="where the parameters are")
    ax1.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    totals = [counts[n].total for n in names]
    acts = [counts[n].activated for n in names]
    ax2.scatter(totals, acts, color="#c44e52")
    for n, t, a in zip(names, totals, acts):
        ax2.annotate(n, (t, a), fontsize=7, xytext=(4, -3), textcoords="offset points")
    ax2.plot([1e5, 1e12], [1e5, 1e12], color="gray", lw=0.8, ls="--", label="dense (activated = total)")
    ax2.set(xscale="log", yscale="log", xlabel="total parameters", ylabel="activated parameters",
            title="activated vs total")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_expert_scaling(by_experts: Mapping[int, Any], n_experts: int, top_k: int, preset: str = "") -> Figure:
    """Chapter 06: total and activated parameters against the number of routed experts E at fixed top-K.

    Args:
        by_experts: E -> `analysis.ParamCount` of the preset with E routed experts (in increasing E);
            must hold `n_experts`.
        n_experts: the chosen E, marked on the left and detailed on the right (with its training
            GFLOPs per token, `train_flops`).
        top_k: K, activated experts per token; preset: its name, for the title.
    Raises:
        ValueError: if `n_experts` is not a key of `by_experts`.
    """
    if n_experts not in by_experts:
        raise ValueError(f"plot_expert_scaling: n_experts={n_experts} is not among {list(by_experts)}")
    fig, (ax1, ax2) = new_figure(10.0, 3.0, ncols=2)
    es = list(by_experts)
    ax1.plot(es, [by_experts[e].total / 1e9 for e in es], marker="o", ms=3, label="total")
    ax1.plot(es, [by_experts[e].activated / 1e9 for e in es], marker="s", ms=3, label="activated")
    ax1.axvline(n_experts, color="gray", ls="--", lw=1)
    ax1.set(xscale="log", yscale="log", xlabel="routed experts E", ylabel="parameters (B)",
            title=f"{preset}, top-{top_k}")
    ax1.set_xticks(es, [str(e) for e in es])
    ax1.minorticks_off()
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    c = by_experts[n_experts]
    ax2.bar(["total", "activated"], [c.total / 1e9, c.activated / 1e9], color=["#55a868", "#c44e52"])
    for i, v in enumerate([c.total / 1e9, c.activated / 1e9]):
        ax2.text(i, v, f"{v:,.1f}B", ha="center", va="bottom", fontsize=8)
    ax2.set(ylabel="parameters (B)", title=f"E={n_experts}, K={top_k}: {c.train_flops / 1e9:,.0f} GFLOPs/token (train)")
    fig.tight_layout()
    return fig


def _step_kernels(profile: Mapping[str, Any]) -> tuple[float, float]:
    """(kernel ms, kernels) per step of a `profile_train_step_*.json`, without torch.optim's
    "Optimizer.step#..." range: a row of its own in profiles taken before the profiler skipped it,
    whose kernels are counted anyway."""
    ranges = [r for r in profile["top"] if r["kernel"].startswith("Optimizer.step#")]
    return (profile["device_ms_per_step"] - sum(r["ms_per_step"] for r in ranges),
            profile["kernels_per_step"] - sum(r["calls_per_step"] for r in ranges))


def train_throughput_summary(results_dir: Any, speed_name: str = "train_throughput_small_h200.json") -> list[str]:
    """Chapter 07: the committed training throughput of `small` (MoE) against `small-dense`, as printed lines.

    Reads `speed_name` (`benchmarks/train_throughput.py`) and, when both exist,
    `profile_train_step_small_h200.json` and `profile_train_step_small_dense_h200.json`
    (`benchmarks/profile_train_step.py`).

    Returns:
        The machine and batch; per model its parameters and FFN; per variant tokens/s with MFU and the
        ratio small / dense; the kernels and GPU time of one compiled step. One line saying the file is
        missing when it is.
    """
    results = Path(results_dir)
    speed_file = results / speed_name
    if not speed_file.exists():
        return [f"no committed {speed_file.name} (run benchmarks/train_throughput.py --device cuda)"]
    speed = json.loads(speed_file.read_text())
    moe_t, dense_t = speed["models"]["small"]["training"], speed["models"]["small-dense"]["training"]
    lines = [f"{speed_file.name}: {speed['machine']['gpu']['name']}, batch "
             f"{speed['models']['small']['batch']} x {speed['models']['small']['seq_len']} tokens, bf16 autocast"]
    for name in ("small", "small-dense"):
        sec = speed["models"][name]
        c, n = sec["config"], sec["parameters"]
        ffn = (f"{c['n_routed_experts']} routed experts top-{c['n_activated_experts']} + {c['n_shared_experts']} shared"
               if c["n_routed_experts"] else f"dense FFN width {c['inter_dim']}")
        lines.append(f"  {name:12s} {n['total'] / 1e6:6.1f}M parameters, {n['activated_non_embedding'] / 1e6:5.1f}M "
                     f"activated (non-embedding), {ffn}")
    lines.append(f"{'variant':26s} {'small tokens/s (MFU)':>22s} {'dense tokens/s (MFU)':>22s} {'small / dense':>14s}")
    for key, ratio in speed["small_over_dense"].items():
        if key in moe_t:
            m, d = moe_t[key], dense_t[key]
            lines.append(f"{key:26s} {m['tokens_per_s']['median']:>12,.0f} ({100 * m['mfu']:4.1f}%) "
                         f"{d['tokens_per_s']['median']:>12,.0f} ({100 * d['mfu']:4.1f}%) {ratio:>14.2f}")
    profiles = {name: results / f"profile_train_step_{name}_h200.json" for name in ("small", "small_dense")}
    if all(f.exists() for f in profiles.values()):
        (moe_ms, moe_n), (dense_ms, dense_n) = (_step_kernels(json.loads(f.read_text())) for f in profiles.values())
        lines.append(f"one compiled step: {moe_n:.0f} kernels and {moe_ms:.1f} ms of GPU time for small, "
                     f"{dense_n:.0f} and {dense_ms:.1f} ms dense ({moe_n / dense_n:.1f}x the kernels, "
                     f"{moe_ms / dense_ms:.2f}x the GPU time)")
    return lines
