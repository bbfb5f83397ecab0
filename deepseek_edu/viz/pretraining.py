"""Chapters 06-07 figures: the pre-training losses (main and MTP heads) with the expert load, and
validation bits per character of several runs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
