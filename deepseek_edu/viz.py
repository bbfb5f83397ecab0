"""Plotting and widget helpers shared by the course notebooks.

Every helper draws with matplotlib and returns the `Figure`, already closed in pyplot, so a cell
that ends with the figure shows it exactly once as a static PNG -- what GitHub and nbviewer render
from the committed notebook. Figures are small on purpose (`FIG_DPI`, a few inches wide): a
notebook must stay under 1 MB with its outputs.

**Alternative text.** `show(fig, alt=...)` displays a figure as a PNG together with an HTML
`<img alt=...>` of the same PNG, so a screen reader, nbconvert's HTML and a static reader get a
description of every figure (a bare matplotlib figure has none). Cells that show a figure end with
`viz.show(fig, alt="what the figure shows")`.

**Static figure first, one figure only.** An interactive explorer is only alive in a running
kernel; a reader on GitHub sees its saved output. So every explorer first draws its figure at the
default settings as an ordinary output (with its alternative text), then shows the controls
(`explorer`). Moving a control *replaces that same output* (an IPython display id), so the page
never shows a stale static figure beside a live one, and the widget state stores no copy of it.

Helpers:
    show               display a figure with alternative text (PNG + HTML <img alt>), once
    new_figure         an empty figure (or a grid of axes) at the course's size and DPI
    plot_loss_curves   training / validation loss against steps, with a reference line
    plot_bars          one bar per label (characters per document, ...)
    plot_histogram     histogram of lengths (token lengths in bytes or characters, ...)
    plot_heatmap       a matrix with optional tick labels (attention weights, causal masks)
    plot_attention     `plot_heatmap` with query/key token labels
    plot_tokens        text pieces drawn as coloured boxes, as a tokenizer splits them
    plot_paradigm_map  the course map of DeepSeek's techniques (survey sections -> notebooks);
                       `paradigm_map_entries` lists its boxes as (notebook, technique, section)
    explorer           static figure at the defaults, then widgets that redraw it
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import matplotlib
import matplotlib.patches as mpatches
import matplotlib.pyplot as plt  # importing pyplot in Jupyter registers the inline PNG display of figures
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FIG_DPI = 80  # dots per inch of every figure: readable on screen, PNGs of tens of kB
TOKEN_COLORS = ("#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d7f2f7")  # pastel cycle


def figure_bundle(fig: Figure, alt: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The display bundle of `fig`: (data, metadata) for `IPython.display.display(..., raw=True)`.

    data holds `image/png` (what GitHub and JupyterLab draw), `text/html` (the same PNG in an
    `<img>` carrying `alt`, which nbconvert's HTML and screen readers use) and `text/plain` (the
    alternative text). Raises ValueError if `alt` is empty: every figure gets a description.
    """
    import base64
    import html
    import io

    if not isinstance(alt, str) or not alt.strip():
        raise ValueError("figure_bundle: alt must be a non-empty description of the figure")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    text = " ".join(alt.split())
    data = {
        "image/png": png,
        "text/html": f'<img src="data:image/png;base64,{png}" alt="{html.escape(text, quote=True)}"/>',
        "text/plain": f"[figure] {text}",
    }
    return data, {"image/png": {"alt": text}}


def show(fig: Figure, alt: str, display_id: Any = None) -> Any:
    """Display `fig` once, with alternative text; returns the display handle (or None).

    Use as the last line of a cell instead of ending the cell with the figure:
    `viz.show(fig, alt="loss against step for ...")`. Pass `display_id=True` to get a handle whose
    `update` replaces this very output later (how `explorer` redraws).
    Raises ValueError if `alt` is empty.
    """
    from IPython.display import display

    data, metadata = figure_bundle(fig, alt)
    plt.close(fig)
    return display(data, raw=True, metadata=metadata, display_id=display_id)


def new_figure(width: float = 6.0, height: float = 3.2, nrows: int = 1, ncols: int = 1,
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """A figure with `nrows` x `ncols` axes at the course's DPI, closed in pyplot.

    Returns:
        (fig, axes): axes is one `Axes` when nrows == ncols == 1, else an array of them.
    """
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), dpi=FIG_DPI, **subplot_kw)
    plt.close(fig)  # the caller shows it (last expression of a cell or `display(fig)`), exactly once
    return fig, axes


def _figure_of(ax: Any, width: float, height: float) -> tuple[Figure, Any]:
    if ax is None:
        return new_figure(width, height)
    return ax.figure, ax


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


def explorer(draw: Callable[..., Figure], controls: Mapping[str, Any], show_static: bool = True,
             alt: str | Callable[..., str] = "interactive figure") -> Any:
    """Static figure first, then widgets that redraw *that same figure*: the course's explorers.

    1. `draw(**defaults)` is called once with each control's current value and its figure is
       displayed (with `alt`) as an ordinary output that GitHub, nbviewer and a printout show.
    2. The controls are returned for display under it. When any control changes, `draw` is called
       again and its figure *replaces* the output of step 1 (same display id): the page never
       shows a stale static figure beside a live one, and no widget state stores a figure.

    Args:
        draw: keyword arguments named like `controls` -> a matplotlib Figure.
        controls: name -> ipywidgets control (anything with `.value` and `.observe`).
        show_static: display the figure at the defaults first (step 1). Without it the figure is
            drawn into an `ipywidgets.Output` under the controls at the first change.
        alt: alternative text of the figure, or a function of the controls' values returning it.
    Returns:
        An `ipywidgets.VBox` holding the controls (and the Output when show_static is False): end
        the cell with the call so that Jupyter displays it under the figure.
    """
    import ipywidgets as widgets
    from IPython.display import display

    def current() -> dict[str, Any]:
        return {name: c.value for name, c in controls.items()}

    def bundle() -> tuple[dict[str, str], dict[str, Any]]:
        values = current()
        fig = draw(**values)
        plt.close(fig)
        return figure_bundle(fig, alt(**values) if callable(alt) else alt)

    row = widgets.HBox(list(controls.values()))
    if show_static:
        data, metadata = bundle()
        handle = display(data, raw=True, metadata=metadata, display_id=True)

        def redraw(_change: Any = None) -> None:
            new_data, new_metadata = bundle()
            if handle is not None:
                handle.update(new_data, raw=True, metadata=new_metadata)

        box = widgets.VBox([row])
    else:
        out = widgets.Output()

        def redraw(_change: Any = None) -> None:
            new_data, new_metadata = bundle()
            with out:
                out.clear_output(wait=True)
                display(new_data, raw=True, metadata=new_metadata)

        box = widgets.VBox([row, out])
    for control in controls.values():
        control.observe(redraw, names="value")
    return box


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


# ---------------------------------------------------------------------------------------------
# Chapter 01 · data and tokenizer
# ---------------------------------------------------------------------------------------------

def plot_compression(sizes: Sequence[int], chars_per_token: Sequence[float],
                     course: tuple[int, float] | None = None) -> Figure:
    """Characters per token against vocabulary size (log2 axis), one point per trained tokenizer.

    Args:
        sizes: vocabulary sizes; chars_per_token: the same length, measured on one text.
        course: optional (vocab_size, chars_per_token) of the course tokenizer, drawn as a star.
    Raises:
        ValueError: if the two sequences differ in length or are empty.
    """
    if len(sizes) != len(chars_per_token) or not sizes:
        raise ValueError(f"plot_compression: {len(sizes)} sizes but {len(chars_per_token)} values")
    fig, ax = new_figure(5.0, 3.0)
    ax.semilogx(list(sizes), list(chars_per_token), "o-", base=2, label="trained on a 1M-character slice")
    if course is not None:
        ax.plot([course[0]], [course[1]], "*", ms=11, color="#dd8452", label="course tokenizer (all plays)")
        ax.legend(fontsize=8, frameon=False)
    ax.set(xlabel="vocabulary size", ylabel="characters / token (validation)",
           title="compression grows with the vocabulary")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_token_lengths(token_bytes: Any, counts: Any, first: int = 0, clip: int = 12) -> Figure:
    """Two histograms of token length in bytes: over the vocabulary, and weighted by use in a text.

    Args:
        token_bytes: (V,) bytes of each token id; counts: (V,) occurrences of each id in the text.
        first: ids below it (special tokens) are left out; clip: the last bin holds `clip` or more.
    Raises:
        ValueError: if the shapes differ.
    """
    token_bytes, counts = _to_numpy(token_bytes), _to_numpy(counts)
    if token_bytes.shape != counts.shape:
        raise ValueError(f"plot_token_lengths: token_bytes {token_bytes.shape} vs counts {counts.shape}")
    clipped = np.minimum(token_bytes[first:], clip)
    bins = np.arange(1, clip + 2) - 0.5
    fig, (ax1, ax2) = new_figure(8.0, 2.8, ncols=2)
    label = f"token length (bytes; {clip} = {clip} or more)"
    plot_histogram(clipped, bins=bins, xlabel=label, ylabel="vocabulary entries", title="over the vocabulary", ax=ax1)
    plot_histogram(clipped, bins=bins, weights=counts[first:] / max(counts.sum(), 1), xlabel=label,
                   ylabel="share of training tokens", title="over the training text", ax=ax2)
    return fig


# ---------------------------------------------------------------------------------------------
# Chapter 02 · baseline Transformer
# ---------------------------------------------------------------------------------------------

def plot_rope(inv_freq: Any, cos: Any, max_seq_len: int, n_positions: int = 128) -> Figure:
    """RoPE at a glance: wavelength 2π/θ_i of each pair (left), cos(m·θ_i) over positions (right).

    Args:
        inv_freq: (R/2,) radians per token of each pair; cos: (n >= n_positions, R/2) cos(m·θ_i).
        max_seq_len: drawn as a dashed line (longer wavelengths never complete a turn in context).
    Raises:
        ValueError: if cos's second dimension differs from inv_freq's length.
    """
    inv_freq, cos = _to_numpy(inv_freq), _to_numpy(cos)
    if cos.ndim != 2 or cos.shape[1] != inv_freq.shape[0]:
        raise ValueError(f"plot_rope: cos {cos.shape} does not match inv_freq {inv_freq.shape}")
    fig, (ax1, ax2) = new_figure(9.0, 3.0, ncols=2)
    ax1.semilogy(2 * np.pi / inv_freq, "o-", ms=3)
    ax1.axhline(max_seq_len, ls="--", c="gray", lw=1, label=f"max_seq_len = {max_seq_len}")
    ax1.set(xlabel="pair i", ylabel="wavelength (tokens)", title=r"RoPE wavelengths $2\pi/\theta_i$")
    ax1.legend(fontsize=8, frameon=False)
    ax1.grid(alpha=0.3)
    plot_heatmap(cos[:n_positions].T, title=r"$\cos(m\,\theta_i)$", xlabel="position m", ylabel="pair i",
                 cmap="RdBu", ax=ax2)
    return fig


def plot_causal_masks(masks: Sequence[Any], titles: Sequence[str], first_positions: Sequence[int]) -> Figure:
    """Boolean causal masks side by side (blue: the query may attend to that key).

    Args:
        masks: (S, T) boolean tensors; titles: one per mask; first_positions: position of each
            mask's first query row (0 for a prefill, T - S after T - S cached positions).
    Raises:
        ValueError: if the three sequences differ in length.
    """
    if not (len(masks) == len(titles) == len(first_positions)) or not masks:
        raise ValueError("plot_causal_masks: masks, titles and first_positions must have the same length")
    fig, axes = new_figure(3.5 * len(masks), 3.0, ncols=len(masks))
    for ax, mask, title, start in zip(np.atleast_1d(axes), masks, titles, first_positions, strict=True):
        m = _to_numpy(mask)
        plot_heatmap(m, y_labels=[str(start + i) for i in range(m.shape[0])], title=title,
                     xlabel="key position t", ylabel="query position", cmap="Blues", vmin=0, vmax=1.4,
                     colorbar=False, ax=ax)
    return fig
