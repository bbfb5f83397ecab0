"""Generic plots the chapters share: loss curves, bars, histograms, heatmaps, attention, tokens,
and the course's paradigm map (notebook 00).

Each takes plain data (lists, arrays or tensors) and returns a `Figure`; most also accept `ax=` to
draw into one panel of a larger figure. Text that the course font cannot draw (control bytes, a
BPE piece that is half a UTF-8 character) is written as U+XXXX (`_printable`), so labels never
show empty boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import matplotlib
import matplotlib.patches as mpatches
import matplotlib.pyplot as plt  # importing pyplot in Jupyter registers the inline PNG display of figures
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .core import FIG_DPI, TOKEN_COLORS, _figure_of, _to_numpy, new_figure


def plot_loss_curves(steps: Sequence[float], train_loss: Sequence[float],
                     val_steps: Sequence[float] | None = None, val_loss: Sequence[float] | None = None,
                     reference: float | None = None, reference_label: str = "unigram entropy",
                     title: str = "", ylabel: str = "cross-entropy (nats / token)", ax: Any = None) -> Figure:
    """Loss against optimizer step: training (thin), validation (markers), a horizontal reference.

    Args:
        steps, train_loss: equal-length sequences (one point per logged step).
        val_steps, val_loss: optional validation points.
        reference: optional constant drawn as a dashed line, e.g. the unigram entropy.
    Returns:
        The figure.
    Raises:
        ValueError: when paired sequences differ in length.
    """
    if len(steps) != len(train_loss):
        raise ValueError(f"steps ({len(steps)}) and train_loss ({len(train_loss)}) differ in length")
    if (val_steps is None) != (val_loss is None) or (val_steps is not None and len(val_steps) != len(val_loss)):
        raise ValueError("val_steps and val_loss must be given together, with equal lengths")
    fig, ax = _figure_of(ax, 6.0, 3.2)
    ax.plot(steps, train_loss, lw=1, alpha=0.8, label="train")
    if val_steps is not None and len(val_steps):
        ax.plot(val_steps, val_loss, "o-", ms=4, label="validation")
    if reference is not None:
        ax.axhline(reference, ls="--", c="gray", lw=1, label=f"{reference_label} ({reference:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_bars(labels: Sequence[str], values: Sequence[float], xlabel: str = "", title: str = "",
              horizontal: bool = True, colors: Sequence[str] | None = None,
              legend: Mapping[str, str] | None = None, ax: Any = None) -> Figure:
    """One bar per label (horizontal by default, so long names stay readable).

    Args:
        colors: optional colour per bar (e.g. to mark the validation documents).
        legend: optional {label: colour} entries explaining `colors`.
    """
    if len(labels) != len(values):
        raise ValueError(f"labels ({len(labels)}) and values ({len(values)}) differ in length")
    if colors is not None and len(colors) != len(values):
        raise ValueError(f"{len(colors)} colors for {len(values)} bars")
    color = list(colors) if colors is not None else "#4c72b0"
    height = max(2.0, 0.16 * len(labels) + 0.8) if horizontal else 3.2
    fig, ax = _figure_of(ax, 6.0, height)
    pos = np.arange(len(labels))
    if horizontal:
        ax.barh(pos, values, color=color)
        ax.set_yticks(pos, labels, fontsize=7)
        ax.invert_yaxis()  # first label on top
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.bar(pos, values, color=color)
        ax.set_xticks(pos, labels, fontsize=7, rotation=90)
        ax.set_ylabel(xlabel)
        ax.grid(axis="y", alpha=0.3)
    if legend:
        ax.legend(handles=[mpatches.Patch(color=c, label=name) for name, c in legend.items()], fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_histogram(values: Sequence[float], bins: Any = "auto", xlabel: str = "", ylabel: str = "count",
                   title: str = "", weights: Sequence[float] | None = None, ax: Any = None) -> Figure:
    """Histogram of `values` (e.g. token lengths in characters); `bins` as in `numpy.histogram`."""
    fig, ax = _figure_of(ax, 5.0, 3.0)
    ax.hist(np.asarray(values), bins=bins, weights=weights, color="#55a868", edgecolor="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_heatmap(matrix: Any, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
                 title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "viridis",
                 vmin: float | None = None, vmax: float | None = None, colorbar: bool = True,
                 ax: Any = None) -> Figure:
    """Draw a 2-D matrix (a tensor or array of shape (rows, cols)) as an image.

    Raises:
        ValueError: if `matrix` is not 2-D or the label counts do not match its shape.
    """
    m = _to_numpy(matrix)
    if m.ndim != 2:
        raise ValueError(f"plot_heatmap needs a 2-D matrix, got shape {m.shape}")
    if x_labels is not None and len(x_labels) != m.shape[1]:
        raise ValueError(f"{len(x_labels)} x_labels for {m.shape[1]} columns")
    if y_labels is not None and len(y_labels) != m.shape[0]:
        raise ValueError(f"{len(y_labels)} y_labels for {m.shape[0]} rows")
    side = min(6.0, 1.5 + 0.28 * max(m.shape))
    fig, ax = _figure_of(ax, side + (0.8 if colorbar else 0.0), side)
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if x_labels is not None:
        ax.set_xticks(range(m.shape[1]), [_printable(s) for s in x_labels], rotation=90, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rows and columns are indices
    if y_labels is not None:
        ax.set_yticks(range(m.shape[0]), [_printable(s) for s in y_labels], fontsize=7)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_attention(weights: Any, tokens: Sequence[str] | None = None, title: str = "attention weights",
                   ax: Any = None) -> Figure:
    """Attention probabilities (S queries, T keys) with the tokens as tick labels.

    Row i is query position i, column j key position j; a causal pattern is lower-triangular.
    """
    return plot_heatmap(weights, x_labels=tokens, y_labels=tokens, title=title, xlabel="key position",
                        ylabel="query position", cmap="Blues", vmin=0.0, vmax=None, ax=ax)


TOKEN_FONT = "DejaVu Sans Mono"  # ships with matplotlib, so every machine draws the same glyphs


@lru_cache(maxsize=4)
def _font_charmap(family: str | None = None) -> frozenset[int]:
    """Code points a font can draw (others would warn 'Glyph ... missing from font(s)' on stderr)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    family = family or matplotlib.rcParams["font.family"]
    path = font_manager.findfont(font_manager.FontProperties(family=family))
    return frozenset(FT2Font(path).get_charmap())


def _printable(text: str, family: str | None = None) -> str:
    """`text` with whitespace made visible and code points the font lacks written as U+XXXX.

    Matplotlib warns (on stderr) for every glyph its font lacks -- emoji and CJK with the default
    DejaVu Sans -- so those are spelled out instead of drawn as empty boxes.
    """
    charmap = _font_charmap(family)
    out = []
    for ch in str(text):
        if ch == " ":
            out.append("\u00b7")  # middle dot: a visible space
        elif ch == "\n":
            out.append("\u21b5")  # downwards arrow with corner leftwards
        elif ch == "\t":
            out.append("\u2192")
        elif ord(ch) in charmap and ch.isprintable():
            out.append(ch)
        else:
            out.append(f"U+{ord(ch):04X}")
    return "".join(out) if out else "\u2205"  # empty piece: empty-set sign


def plot_tokens(pieces: Sequence[str], ids: Sequence[int] | None = None, title: str = "",
                width: float = 7.0, max_pieces: int = 120) -> Figure:
    """Draw text pieces as coloured boxes, left to right, wrapping lines, as a tokenizer splits them.

    Spaces show as a middle dot, newlines as an arrow, characters the font lacks as U+XXXX, and a
    piece that is only part of a UTF-8 character (a byte-level token) as the replacement character
    it decodes to. With `ids`, each box carries its token id underneath.

    Args:
        pieces: the decoded text of each token, in order.
        ids: optional token ids, same length as `pieces`.
        max_pieces: draw at most this many (the title says how many were left out).
    """
    if ids is not None and len(ids) != len(pieces):
        raise ValueError(f"{len(ids)} ids for {len(pieces)} pieces")
    shown = list(pieces[:max_pieces])
    labels = [_printable(p, TOKEN_FONT) for p in shown]
    char_w, line_h = 0.105, 0.62 if ids is not None else 0.42  # inches per character / per line
    x, lines, placed = 0.0, 0, []
    for label in labels:
        w = 0.12 + char_w * max(len(label), 1)
        if x + w > width - 0.2 and x > 0:
            x, lines = 0.0, lines + 1
        placed.append((x, lines, w))
        x += w + 0.05
    height = 0.35 + line_h * (lines + 1) + (0.3 if title else 0.0)
    fig = plt.figure(figsize=(width, height), dpi=FIG_DPI)
    plt.close(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    top = 0.15 + (0.3 if title else 0.0)
    for k, (label, (x0, line, w)) in enumerate(zip(labels, placed)):
        y = top + line * line_h
        ax.add_patch(mpatches.FancyBboxPatch(
            (x0 + 0.1, y), w - 0.05, 0.3, boxstyle="round,pad=0.02,rounding_size=0.05",
            fc=TOKEN_COLORS[k % len(TOKEN_COLORS)], ec="#888888", lw=0.5))
        ax.text(x0 + 0.1 + (w - 0.05) / 2, y + 0.15, label, ha="center", va="center", fontsize=9,
                family=TOKEN_FONT)
        if ids is not None:
            ax.text(x0 + 0.1 + (w - 0.05) / 2, y + 0.42, str(ids[k]), ha="center", va="center", fontsize=6,
                    color="#555555")
    if title or len(pieces) > max_pieces:
        extra = f" (first {max_pieces} of {len(pieces)} shown)" if len(pieces) > max_pieces else ""
        ax.text(0.1, 0.2, title + extra, fontsize=10, va="center")
    return fig


def _token_boxes(ax: Any, pieces: Sequence[str], colors: Sequence[str], y0: float, width: float) -> float:
    """Token pieces as coloured boxes from (0, y0), wrapping at `width`; returns the next free y."""
    x0, y = 0.0, y0
    for p, c in zip(pieces, colors):
        w = 0.1 + 0.11 * max(len(p), 1)
        if x0 + w > width:
            x0, y = 0.0, y - 0.5
        ax.add_patch(mpatches.FancyBboxPatch((x0, y), w - 0.04, 0.36, boxstyle="round,pad=0.02", fc=c,
                                             ec="#888888", lw=0.5))
        ax.text(x0 + (w - 0.04) / 2, y + 0.18, p, ha="center", va="center", fontsize=7)
        x0 += w
    return y - 0.9


def plot_token_rows(rows: Sequence[tuple[str, Sequence[str], Sequence[str]]], width: float = 10.0) -> Figure:
    """Paragraphs of token boxes, one per row, each under its title; the boxes wrap at `width` inches.

    Args:
        rows: (title, pieces, colours) per paragraph; pieces and colours pair up (zip: the shorter wins).
        width: of the figure in inches; its height follows from the number of wrapped lines.
    """
    fig, ax = new_figure(width, 1.0)
    y = 0.0
    for title, pieces, colors in rows:
        ax.text(0, y + 0.55, title, fontsize=8)
        y = _token_boxes(ax, pieces, colors, y, width)
    ax.set_xlim(0, width + 0.2)
    ax.set_ylim(y + 0.4, 0.8)
    ax.axis("off")
    fig.set_size_inches(width, 0.6 * (0.8 - y))
    return fig


# (notebook, label, survey section, x, y) of each box of the paradigm map, in axes units.
_MAP_BOXES = {
    "data": ("01", "corpus + byte-level BPE", "V3 §4.1", 0.11, 0.80),
    "base": ("02", "baseline Transformer\nRMSNorm, RoPE, SwiGLU, MHA", "", 0.11, 0.48),
    "mla": ("03", "Multi-head Latent Attention", "§III-A", 0.37, 0.80),
    "moe": ("04", "DeepSeekMoE\nshared + routed experts", "§III-B", 0.37, 0.56),
    "mtp": ("05", "Multi-Token Prediction", "§III-C", 0.37, 0.32),
    "tiny": ("06/07", "tiny DeepSeek\nbuild + pre-train", "§III", 0.63, 0.56),
    "grpo": ("10", "GRPO, R1-Zero style RL", "§III-D", 0.89, 0.56),
    "fp8": ("08", "FP8 training", "§IV training", 0.37, 0.07),
    "kern": ("09", "GPU kernels (Triton)", "§IV inference", 0.63, 0.07),
    "sys": ("11", "systems: EP, DualPipe", "§IV system", 0.89, 0.07),
}


_MAP_BOX_W, _MAP_BOX_H = 0.21, 0.15


_MAP_ARROWS = [("data", "base"), ("base", "mla"), ("base", "moe"), ("base", "mtp"), ("mla", "tiny"),
               ("moe", "tiny"), ("mtp", "tiny"), ("tiny", "grpo"), ("tiny", "fp8"), ("tiny", "kern"),
               ("tiny", "sys")]


_MAP_COLORS = {"§III": "#dfe7fd", "§IV": "#fff1c1", "": "#e2ece9", "V3 ": "#e2ece9"}


def paradigm_map_entries() -> list[tuple[str, str, str]]:
    """(notebook, technique, section) rows of the paradigm map, in course order."""
    rows = [(nb, label.replace("\n", ", "), sec) for nb, label, sec, _, _ in _MAP_BOXES.values()]
    return sorted(rows, key=lambda r: r[0])


def _box_edge(x: float, y: float, toward_x: float, toward_y: float) -> tuple[float, float]:
    """Where the segment from the centre (x, y) of a map box toward another point leaves the box."""
    dx, dy = toward_x - x, toward_y - y
    t = min(_MAP_BOX_W / 2 / abs(dx) if dx else float("inf"), _MAP_BOX_H / 2 / abs(dy) if dy else float("inf"))
    return x + t * dx, y + t * dy


def plot_paradigm_map() -> Figure:
    """DeepSeek's techniques as boxes labelled with the notebook that builds each and the section of
    the survey (Xiong et al. 2025, arXiv 2507.09955) that describes it; arrows say what builds on what.

    Blue: model architecture and training algorithm (survey §III); yellow: engineering (§IV);
    green: foundations (notebooks 01-02).
    """
    fig = plt.figure(figsize=(9.0, 4.6), dpi=FIG_DPI)
    plt.close(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.06, 1.0)
    ax.axis("off")
    w, h = _MAP_BOX_W, _MAP_BOX_H
    for src, dst in _MAP_ARROWS:
        (_, _, _, x0, y0), (_, _, _, x1, y1) = _MAP_BOXES[src], _MAP_BOXES[dst]
        ax.annotate("", xy=_box_edge(x1, y1, x0, y0), xytext=_box_edge(x0, y0, x1, y1),
                    arrowprops={"arrowstyle": "-|>", "color": "#777777", "lw": 1.0, "shrinkA": 2, "shrinkB": 2})
    for nb, label, section, x, y in _MAP_BOXES.values():
        color = next(c for k, c in _MAP_COLORS.items() if section.startswith(k)) if section else _MAP_COLORS[""]
        ax.add_patch(mpatches.FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.01,rounding_size=0.02", fc=color, ec="#555555",
            lw=0.8, zorder=2))
        ax.text(x, y + 0.035, f"nb {nb}" + (f"  ·  {section}" if section else ""), ha="center", va="center",
                fontsize=8, weight="bold", zorder=3)
        ax.text(x, y - 0.025, label, ha="center", va="center", fontsize=7.5, zorder=3, linespacing=1.1)
    ax.text(0.5, 0.985, "The DeepSeek paradigm map: survey section -> course notebook", ha="center", va="top",
            fontsize=10)
    return fig
