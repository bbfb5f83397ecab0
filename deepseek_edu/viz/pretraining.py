"""Chapters 05-07 figures: the MTP module beside the main model, the pre-training losses with the
expert load, and validation bits per character of several runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches as mpatches
from matplotlib.figure import Figure

from .core import _to_numpy, new_figure
from .plots import plot_heatmap


def plot_mtp_diagram(cfg: Any) -> Figure:
    """Chapter 05: the main model and MTP module 1 as boxes, with the package's names and `cfg`'s shapes.

    Left column: the main model (embed -> layers -> norm -> head -> next token). Right column: MTP
    module 1 (`enorm`, `hnorm`, `eh_proj`, `block`, `norm`), fed by the main model's hidden state and
    the embedding of the token one ahead, sharing the embedding and the head (dashed arrows).
    """
    D, V, L = cfg.dim, cfg.vocab_size, cfg.n_layers
    fig, ax = new_figure(8.0, 4.6)
    boxes = {  # name: (x, y, text, colour)
        "embed": (0.0, 0.0, f"embed  ({V}, {D})\nEmb(t_i)", "#dfe7fd"),
        "layers": (0.0, 1.2, f"layers[0..{L - 1}]  (MLA + MoE)\nh^0_i  (B, S, {D})", "#e8e8e8"),
        "norm": (0.0, 2.4, f"norm  ({D},)", "#e8e8e8"),
        "head": (0.0, 3.6, f"head  ({D}, {V})\nlogits for t_(i+1)", "#dfe7fd"),
        "enorm": (4.2, 0.0, f"enorm(Emb(t_(i+1)))  ({D},)", "#f6e3c7"),
        "hnorm": (6.6, 0.0, f"hnorm(h^0_i)  ({D},)", "#f6e3c7"),
        "eh_proj": (5.4, 1.0, f"eh_proj  ({D}, {2 * D})\n[enorm ; hnorm] -> {D}", "#f6e3c7"),
        "block": (5.4, 2.0, f"block  (layer {L})\nh^1_i  (B, S-1, {D})", "#f6e3c7"),
        "mtp_norm": (5.4, 3.0, f"norm  ({D},)", "#f6e3c7"),
        "shared": (5.4, 4.0, "the main model's head (shared)\nlogits for t_(i+2)", "#dfe7fd"),
    }
    w, h = 2.2, 0.7
    for x, y, text, colour in boxes.values():
        ax.add_patch(mpatches.FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03", fc=colour, ec="#555555", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7)

    def arrow(a: str, b: str, dashed: bool = False) -> None:
        xa, ya = boxes[a][0] + w / 2, boxes[a][1] + h
        xb, yb = boxes[b][0] + w / 2, boxes[b][1]
        if ya > yb:  # to the side: from the box's right edge
            xa, ya = boxes[a][0] + w, boxes[a][1] + h / 2
        ax.annotate("", xy=(xb, yb), xytext=(xa, ya),
                    arrowprops={"arrowstyle": "->", "color": "#333333", "lw": 0.8, "ls": "--" if dashed else "-"})

    for a, b in (("embed", "layers"), ("layers", "norm"), ("norm", "head"), ("enorm", "eh_proj"),
                 ("hnorm", "eh_proj"), ("eh_proj", "block"), ("block", "mtp_norm"), ("mtp_norm", "shared")):
        arrow(a, b)
    arrow("layers", "hnorm")  # h^0 feeds the MTP module
    arrow("embed", "enorm", dashed=True)  # the same embedding table
    ax.annotate("", xy=(5.4, 4.35), xytext=(2.2, 3.95),
                arrowprops={"arrowstyle": "->", "color": "#333333", "lw": 0.8, "ls": "--"})
    ax.text(0.0, 4.75, "main model", fontsize=9, weight="bold")
    ax.text(5.4, 4.95, "MTP module 1 (mtp[0])", fontsize=9, weight="bold")
    ax.set_xlim(-0.2, 9.0)
    ax.set_ylim(-0.3, 5.2)
    ax.axis("off")
    return fig


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
