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

import math
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


def png_bytes(fig: Figure) -> bytes:
    """`fig` as a PNG of at most 256 colours: a third of matplotlib's RGBA PNG for the same pixels,
    so the notebooks stay under 1 MB with every figure stored twice (PNG and HTML <img>)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def figure_bundle(fig: Figure, alt: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The display bundle of `fig`: (data, metadata) for `IPython.display.display(..., raw=True)`.

    data holds `image/png` (what GitHub and JupyterLab draw), `text/html` (the same PNG in an
    `<img>` carrying `alt`, which nbconvert's HTML and screen readers use) and `text/plain` (the
    alternative text). Raises ValueError if `alt` is empty: every figure gets a description.
    """
    import base64
    import html

    if not isinstance(alt, str) or not alt.strip():
        raise ValueError("figure_bundle: alt must be a non-empty description of the figure")
    png = base64.b64encode(png_bytes(fig)).decode("ascii")
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


# ---------------------------------------------------------------------------------------------
# Interactive (plotly) figures: always shown *beside* a static matplotlib figure
# ---------------------------------------------------------------------------------------------

def show_plotly(fig: Any, alt: str) -> Any:
    """Display a plotly figure as plotly's own MIME type, with `alt` as its text fallback.

    The output holds the figure's JSON only (`application/vnd.plotly.v1+json`, a few kB; no
    plotly.js, nothing fetched from the internet): JupyterLab and VS Code draw it live; GitHub and
    nbconvert, which do not run plotly, show the text. So put a static figure next to it.
    Raises ValueError if `alt` is empty.
    """
    import plotly.io as pio
    from IPython.display import display

    if not isinstance(alt, str) or not alt.strip():
        raise ValueError("show_plotly: alt must be a non-empty description of the figure")
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    bundle["text/plain"] = "[interactive plotly figure; the static figure above shows the same data] " + alt
    return display(bundle, raw=True)


# ---------------------------------------------------------------------------------------------
# Chapter 03 · Multi-head Latent Attention
# ---------------------------------------------------------------------------------------------

KV_KIND_COLORS = {"mha": "#4c72b0", "gqa": "#55a868", "mqa": "#c44e52", "mla": "#8172b2"}


def _box(ax: Any, x: float, y: float, text: str, w: float = 0.2, h: float = 0.085, fc: str = "#dfe7fd") -> None:
    ax.add_patch(mpatches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.005,rounding_size=0.01",
                                         fc=fc, ec="#555555", lw=0.8, zorder=2))
    ax.text(x, y, text, ha="center", va="center", fontsize=7, zorder=3, linespacing=1.15)


def _arrow(ax: Any, x0: float, y0: float, x1: float, y1: float, label: str = "") -> None:
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                arrowprops={"arrowstyle": "->", "color": "#444444", "lw": 0.9, "shrinkA": 0, "shrinkB": 0}, zorder=1)
    if label:
        ax.text((x0 + x1) / 2 + 0.005, (y0 + y1) / 2, label, fontsize=6, color="#333333", ha="left", va="center")


def _shape(module: Any, name: str) -> str:
    return "(" + ", ".join(str(s) for s in getattr(module, name).weight.shape) + ")"


def plot_mla_diagram(mla: Any, title: str = "") -> Figure:
    """DeepSeek's MLA drawn from a module: its submodule names and the weight shapes it holds.

    Args:
        mla: a `deepseek_edu.mla.MLA` (build it on the meta device for real sizes:
            `with torch.device("meta"): MLA(get_preset("deepseek-v3"))`).
    Boxes are the module's own linears (`wq_a`, `q_norm`, `wq_b` or `wq`, `wkv_a`, `kv_norm`,
    `wkv_b`, `wo`) with their weight shapes (out, in); the cached tensors are shaded.
    Raises:
        ValueError: if `mla` lacks `wkv_a` / `wkv_b` (not an MLA module).
    """
    if not (hasattr(mla, "wkv_a") and hasattr(mla, "wkv_b")):
        raise ValueError("plot_mla_diagram needs an MLA module (with wkv_a and wkv_b)")
    H, C, R = mla.n_heads, mla.kv_lora_rank, mla.qk_rope_head_dim
    N, Dv = mla.qk_nope_head_dim, mla.v_head_dim
    D = mla.wkv_a.weight.shape[1]
    fig, ax = new_figure(9.5, 5.2)
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _box(ax, 0.5, 0.95, f"x: hidden state (B, S, D={D})", w=0.34, fc="#eeeeee")
    # query side (left)
    if getattr(mla, "q_lora_rank", 0):
        _box(ax, 0.2, 0.82, f"wq_a {_shape(mla, 'wq_a')}\nW_DQ: compress query")
        _box(ax, 0.2, 0.70, f"q_norm (RMSNorm, {mla.q_lora_rank})")
        _box(ax, 0.2, 0.58, f"wq_b {_shape(mla, 'wq_b')}\nW_UQ and W_QR, all heads")
        _arrow(ax, 0.42, 0.93, 0.25, 0.865)
        _arrow(ax, 0.2, 0.777, 0.2, 0.743)
        _arrow(ax, 0.2, 0.657, 0.2, 0.623)
    else:
        _box(ax, 0.2, 0.70, f"wq {_shape(mla, 'wq')}\nall heads' queries")
        _arrow(ax, 0.42, 0.93, 0.25, 0.743)
    _box(ax, 0.1, 0.44, f"q_nope (H={H}, N={N})", w=0.17)
    _box(ax, 0.29, 0.44, f"q_pe (H, R={R})\nRoPE per head", w=0.17)
    _arrow(ax, 0.17, 0.537, 0.11, 0.483, "split")
    _arrow(ax, 0.23, 0.537, 0.28, 0.483)
    # key/value side (right)
    _box(ax, 0.72, 0.82, f"wkv_a {_shape(mla, 'wkv_a')}\nW_DKV (C={C}) stacked on W_KR (R={R})", w=0.3)
    _arrow(ax, 0.58, 0.93, 0.68, 0.865)
    _box(ax, 0.62, 0.67, f"kv_norm (RMSNorm, C={C})", w=0.2)
    _box(ax, 0.87, 0.67, f"k_pe (R={R})\nRoPE, ONE key for all heads", w=0.22)
    _arrow(ax, 0.68, 0.777, 0.63, 0.713, "C")
    _arrow(ax, 0.77, 0.777, 0.86, 0.713, "R")
    _box(ax, 0.75, 0.53, f"KV cache per token: c_kv (C) + k_pe (R) = {C + R} numbers", w=0.42, fc="#fff1c1")
    _arrow(ax, 0.62, 0.627, 0.66, 0.573)
    _arrow(ax, 0.87, 0.627, 0.84, 0.573)
    _box(ax, 0.75, 0.38, f"wkv_b {_shape(mla, 'wkv_b')}\nW_UK (H, N={N}, C) and W_UV (H, Dv={Dv}, C)", w=0.36)
    _arrow(ax, 0.75, 0.487, 0.75, 0.423)
    # attention and output
    _box(ax, 0.42, 0.24, "attention, scale 1/sqrt(N+R)\nnaive: k = [W_UK c; k_pe], v = W_UV c\n"
                         "absorbed: q_nope W_UK vs c_kv, W_UV after the sum", w=0.46, h=0.11, fc="#e2ece9")
    _arrow(ax, 0.1, 0.397, 0.3, 0.297)
    _arrow(ax, 0.29, 0.397, 0.36, 0.297)
    _arrow(ax, 0.7, 0.337, 0.55, 0.297)
    _box(ax, 0.42, 0.08, f"wo {_shape(mla, 'wo')} -> out (B, S, D)", w=0.32, fc="#eeeeee")
    _arrow(ax, 0.42, 0.185, 0.42, 0.123, f"(B, S, H*Dv={H * Dv})")
    ax.text(0.5, 1.0, title or f"MLA (deepseek_edu.mla.MLA): weight shapes (out, in), H={H}", ha="center",
            va="bottom", fontsize=9)
    return fig


def kv_cache_curves(configs: Mapping[str, Any], contexts: Sequence[int], bytes_per_element: float = 2.0,
                    gqa_groups: Mapping[str, int] | None = None) -> dict[str, dict[str, list[float]]]:
    """KV-cache bytes (all layers, one sequence) against context for every attention kind.

    Args:
        configs: label -> ModelConfig; contexts: context lengths in tokens.
        gqa_groups: label -> GQA groups n_g (default 8, or the largest divisor of n_heads <= n_heads/2).
    Returns:
        label -> kind ("mha", "gqa", "mqa", "mla") -> bytes at each context (from
        `analysis.kv_cache_bytes_per_token`).
    """
    from .analysis import kv_cache_bytes_per_token

    curves: dict[str, dict[str, list[float]]] = {}
    for label, c in configs.items():
        groups = (gqa_groups or {}).get(label) or max(
            g for g in range(1, min(8, max(c.n_heads // 2, 1)) + 1) if c.n_heads % g == 0)
        per_token = {kind: kv_cache_bytes_per_token(c, kind, bytes_per_element,
                                                    n_kv_heads=groups if kind == "gqa" else None)
                     for kind in KV_KIND_COLORS}
        curves[label] = {kind: [b * t for t in contexts] for kind, b in per_token.items()}
    return curves


def plot_kv_cache_vs_context(curves: Mapping[str, Mapping[str, Sequence[float]]], contexts: Sequence[int]) -> Figure:
    """One log-log panel per model of `kv_cache_curves`: cache bytes against context, a line per kind."""
    if not curves:
        raise ValueError("plot_kv_cache_vs_context: no curves")
    fig, axes = new_figure(4.6 * len(curves), 3.1, ncols=len(curves))
    for ax, (label, kinds) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for kind, values in kinds.items():
            ax.plot(contexts, values, marker="o", ms=3, color=KV_KIND_COLORS.get(kind), label=kind.upper())
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache (bytes)",
               title=label)
        ax.set_xticks(list(contexts), [f"{t // 1024}K" if t >= 1024 else str(t) for t in contexts])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def kv_cache_plotly(curves: Mapping[str, Mapping[str, Sequence[float]]], contexts: Sequence[int]) -> Any:
    """The same data as `plot_kv_cache_vs_context` as one plotly figure: hover for exact GB, click
    the legend to hide a kind or a model (solid and dashed lines are the two models)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (label, kinds), dash in zip(curves.items(), ["solid", "dash", "dot", "dashdot"]):
        for kind, values in kinds.items():
            fig.add_trace(go.Scatter(
                x=list(contexts), y=[v / 1e9 for v in values], mode="lines+markers", name=f"{kind.upper()} · {label}",
                line={"color": KV_KIND_COLORS.get(kind), "dash": dash}, legendgroup=label,
                hovertemplate="%{x:,} tokens: %{y:.4g} GB<extra>" + f"{kind.upper()}, {label}" + "</extra>"))
    fig.update_layout(template="plotly_white", width=720, height=380, margin={"l": 60, "r": 10, "t": 40, "b": 50},
                      title="KV cache (GB, one sequence, all layers) against context",
                      xaxis={"type": "log", "title": "context length (tokens)"},
                      yaxis={"type": "log", "title": "KV cache (GB)"})
    return fig


DECODE_KIND_STYLE = {"mha": ("#4c72b0", "o", "MHA (caches K, V)"), "gqa": ("#55a868", "s", "GQA (caches K, V)"),
                     "mla-naive": ("#dd8452", "v", "MLA recompute (K, V from latent every step)"),
                     "mla-absorbed": ("#8172b2", "^", "MLA absorbed")}


def _ctx_label(c: int) -> str:
    return f"{c // 1024}K" if c >= 1024 else str(c)


def decode_tokens_per_s(res: Mapping[str, Any], kind: str, batch: int) -> tuple[list[int], list[float]]:
    """(contexts, tokens/s) of one kind and batch from a `benchmarks/mla_decode.py` result."""
    pts = sorted((r["ctx"], r["tokens_per_s"]) for r in res["results"] if r["kind"] == kind and r["batch"] == batch)
    return [c for c, _ in pts], [t for _, t in pts]


def machine_note(res: Mapping[str, Any]) -> str:
    """'load 7.0 on 2 cores' when the benchmark's machine was busier than its cores at the start, else ''."""
    m = res.get("machine", {})
    load, cores = m.get("load_average_1_5_15_min"), m.get("cpu_count")
    if load and cores and load[0] > cores:
        return f"load {load[0]:.1f} on {cores} cores"
    return ""


def plot_decode_speed(bench: Mapping[str, Mapping[str, Any]], labels: Sequence[str] = ("CPU", "H200"),
                      batch: int = 32) -> Figure:
    """Committed MLA decoding benchmark: tokens/s against context per machine, and absorbed/recompute.

    Args:
        bench: machine label -> parsed `mla_decode_*.json`; labels: the panels, in order (a missing
            machine draws an empty panel saying so); batch: the batch of the two tokens/s panels.
    """
    fig, axes = new_figure(11.0, 3.3, ncols=3)
    for ax, label in zip(axes[:2], labels):
        if label not in bench:
            ax.text(0.5, 0.5, f"no {label} results", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        res = bench[label]
        for kind, (color, marker, name) in DECODE_KIND_STYLE.items():
            ctx, tps = decode_tokens_per_s(res, kind, batch)
            if ctx:
                ax.plot(ctx, tps, marker=marker, color=color, ms=4, label=name)
        note = machine_note(res)
        ax.set(xscale="log", yscale="log", xlabel="context length (cached tokens)", ylabel="tokens/s (one layer)",
               title=f"{label}, {res['dtype']}, batch {batch}" + (f"\n(noisy: {note})" if note else ""))
        ax.set_xticks(res["contexts"], [_ctx_label(c) for c in res["contexts"]])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    ax = axes[2]
    top = 1.0
    for label, res in bench.items():
        for b, ls in zip(res["batches"], ["--", "-"]):
            pts = sorted((r["ctx"], r["absorbed_over_naive"]) for r in res["absorbed_over_naive"] if r["batch"] == b)
            top = max([top] + [v for _, v in pts])
            ax.plot([c for c, _ in pts], [v for _, v in pts], ls, marker="o", ms=3,
                    color="#333333" if label == "CPU" else "#76b900", label=f"{label}, batch {b}")
    ax.axhline(1.0, color="gray", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="context length (cached tokens)", ylabel="absorbed / recompute tokens/s",
           title="MLA: absorbed over recompute")
    ax.set_ylim(bottom=min(ax.get_ylim()[0], 0.5), top=top * 8)  # room for the legend above the lines
    contexts = sorted({c for res in bench.values() for c in res["contexts"]})
    if contexts:
        ax.set_xticks(contexts, [_ctx_label(c) for c in contexts])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Chapter 04 · DeepSeekMoE
# ---------------------------------------------------------------------------------------------

GROUP_COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c", "#e17c05")


def plot_group_routing(biased: Any, group_scores: Sequence[float], kept: Sequence[int], chosen: Sequence[int],
                       n_groups: int, title: str = "") -> Figure:
    """One token's group-limited routing: each expert's biased score, groups shaded, dropped groups
    hatched (their experts are -inf), chosen experts starred.

    Args:
        biased: (E,) biased scores s + b; group_scores: (n_groups,); kept: kept group ids;
        chosen: chosen expert ids; n_groups: must divide E.
    Raises:
        ValueError: if n_groups does not divide E or group_scores has the wrong length.
    """
    biased = _to_numpy(biased)
    n = biased.size
    if n_groups <= 0 or n % n_groups or len(group_scores) != n_groups:
        raise ValueError(f"plot_group_routing: {n} experts, {n_groups} groups, {len(group_scores)} group scores")
    size = n // n_groups
    fig, ax = new_figure(8.0, 3.3)
    lo, hi = min(0.0, biased.min()) - 0.15, biased.max() + 0.45
    for g in range(n_groups):
        x0, x1 = g * size - 0.5, (g + 1) * size - 0.5
        if g in kept:
            ax.axvspan(x0, x1, color=GROUP_COLORS[g % len(GROUP_COLORS)], alpha=0.08, lw=0)
        else:  # hatched: these experts are -inf for this token
            ax.axvspan(x0, x1, facecolor="none", hatch="///", edgecolor="#cccccc", lw=0)
        label = f"group {g}\nscore {group_scores[g]:.2f}\n" + ("kept" if g in kept else "dropped: -inf")
        ax.text((x0 + x1) / 2, hi - 0.05, label, ha="center", va="top", fontsize=7)
    for e in range(n):
        g = e // size
        ax.bar(e, biased[e], color=GROUP_COLORS[g % len(GROUP_COLORS)], alpha=1.0 if g in kept else 0.3)
    ax.plot(list(chosen), [biased[e] for e in chosen], "*", ms=12, color="gold", mec="black",
            label="chosen (top-K of the kept groups)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="expert", ylabel="biased score s + b", title=title, ylim=(lo, hi + 0.1))
    ax.set_xticks(range(n))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def trailing_mean(values: Sequence[float], window: int = 10) -> list[float]:
    """Trailing mean over `window` values (the first ones over what there is). Raises ValueError if window < 1."""
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_balance_runs(max_violation: Mapping[str, Sequence[float]], val_loss: Mapping[str, float],
                      colors: Mapping[str, str], collapse: float, window: int = 10) -> Figure:
    """MaxVio against step for each arm (trailing mean), and each arm's validation loss.

    Args:
        max_violation: arm -> MaxVio per step (worst layer); val_loss: arm -> nats/token;
        colors: arm -> colour; collapse: the MaxVio of total collapse, E/K - 1 (dashed line).
    Raises:
        ValueError: if the arms of max_violation and val_loss differ.
    """
    if set(max_violation) != set(val_loss):
        raise ValueError(f"plot_balance_runs: arms {sorted(max_violation)} vs {sorted(val_loss)}")
    fig, (ax1, ax2) = new_figure(10.0, 3.2, ncols=2)
    for arm, vio in max_violation.items():
        ax1.plot(range(1, len(vio) + 1), trailing_mean(list(vio), window), color=colors.get(arm), label=arm)
    ax1.axhline(collapse, color="gray", ls="--", lw=1)
    ax1.text(2, collapse - 0.25, "total collapse (E/K - 1)", fontsize=7, color="gray")
    ax1.set(xlabel="step", ylabel=f"MaxVio (worst layer, {window}-step mean)", title="load balance while training")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    arms = list(max_violation)
    vals = [val_loss[a] for a in arms]
    ax2.bar(arms, vals, color=[colors.get(a, "#999999") for a in arms])
    for i, v in enumerate(vals):
        ax2.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax2.set_ylim(min(vals) - 0.15, max(vals) + 0.1)
    ax2.set(ylabel="validation loss (nats/token)", title=f"after {len(next(iter(max_violation.values())))} steps (one seed)")
    fig.tight_layout()
    return fig


def plot_routing(weights: Any, loads: Any, tokens: Sequence[str], title: str, topk: int) -> Figure:
    """Routing of one sequence: combine weight per (token, expert) in one layer (left), and the tokens
    each expert received in each MoE layer (right).

    Args:
        weights: (T, E) combine weights, 0 where not chosen; loads: (L, E) tokens per expert and layer;
        tokens: T token strings; title: the left panel's title; topk: K, for the right title.
    Raises:
        ValueError: if the expert counts differ or len(tokens) != T.
    """
    w, ld = _to_numpy(weights), _to_numpy(loads)
    if w.shape[1] != ld.shape[1] or w.shape[0] != len(tokens):
        raise ValueError(f"plot_routing: weights {w.shape}, loads {ld.shape}, {len(tokens)} tokens")
    experts = [str(e) for e in range(w.shape[1])]
    fig, (ax1, ax2) = new_figure(10.0, 4.2, ncols=2)
    plot_heatmap(w, x_labels=experts, y_labels=list(tokens), cmap="Greens", vmin=0, title=title, xlabel="expert", ax=ax1)
    plot_heatmap(ld, x_labels=experts, cmap="Blues", vmin=0, title=f"tokens per expert ({len(tokens)} tokens x top-{topk})",
                 xlabel="expert", ylabel="MoE layer", ax=ax2)
    fig.tight_layout()
    return fig


def routing_plotly(weights: Mapping[tuple[str, int], Any], tokens: Sequence[str]) -> Any:
    """Routing decisions over experts and layers as one plotly heatmap with a menu of (arm, layer):
    hover for the token, the expert and its combine weight.

    Args:
        weights: (arm, layer) -> (T, E) combine weights (0 = not chosen); tokens: the T token strings.
    Raises:
        ValueError: if weights is empty.
    """
    import plotly.graph_objects as go

    if not weights:
        raise ValueError("routing_plotly: no routing to draw")
    keys = list(weights)
    labels = [f"{i}: {t!r}" for i, t in enumerate(tokens)]  # unique row labels
    fig = go.Figure()
    for n, (arm, layer) in enumerate(keys):
        w = np.round(_to_numpy(weights[(arm, layer)]), 3)
        fig.add_trace(go.Heatmap(z=w.tolist(), x=[f"expert {e}" for e in range(w.shape[1])], y=labels,
                                 colorscale="Greens", zmin=0, visible=n == 0, name=f"{arm}, layer {layer}",
                                 hovertemplate="%{y} -> %{x}: weight %{z}<extra></extra>"))
    buttons = [{"label": f"{arm}, MoE layer {layer}", "method": "update",
                "args": [{"visible": [k == j for k in range(len(keys))]},
                         {"title": f"combine weight per token and expert: {arm}, MoE layer {layer}"}]}
               for j, (arm, layer) in enumerate(keys)]
    fig.update_layout(template="plotly_white", width=720, height=120 + 16 * len(tokens),
                      margin={"l": 140, "r": 10, "t": 70, "b": 40},
                      title=f"combine weight per token and expert: {keys[0][0]}, MoE layer {keys[0][1]}",
                      updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top"}],
                      yaxis={"autorange": "reversed"})
    return fig


def plot_moe_diagram(moe: Any, title: str = "") -> Figure:
    """DeepSeekMoE drawn from a `deepseek_edu.moe.MoE`: its submodule names and weight shapes.

    Build it on the meta device for real sizes (`with torch.device("meta"): MoE(get_preset("deepseek-v3"))`).
    Raises ValueError if `moe` has no `gate` / `experts` (not an MoE module).
    """
    if not (hasattr(moe, "gate") and hasattr(moe, "experts")):
        raise ValueError("plot_moe_diagram needs an MoE module (with gate and experts)")
    gate, E = moe.gate, len(moe.experts)
    D = gate.weight.shape[1]
    e0 = moe.experts[0]
    fig, ax = new_figure(9.5, 4.8)
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _box(ax, 0.5, 0.94, f"u: hidden state of N tokens (N, D={D})", w=0.36, fc="#eeeeee")
    groups = f"{gate.n_groups} groups, keep {gate.topk_groups}" if gate.n_groups > 1 else "no groups"
    _box(ax, 0.3, 0.76, f"gate.weight ({E}, {D}), "
                        f"gate.bias ({E},) fp32\n{gate.score_func} scores s; top-{gate.topk} of s + bias "
                        f"({groups});\nweights from s, normalised, x route_scale={gate.route_scale}",
         w=0.5, h=0.12, fc="#fff1c1")
    _arrow(ax, 0.45, 0.915, 0.33, 0.822)
    if getattr(moe, "shared_experts", None) is not None:
        sh = moe.shared_experts
        _box(ax, 0.82, 0.6, f"shared_experts (always on)\nw1, w3 {_shape(sh, 'w1')}\nw2 {_shape(sh, 'w2')}",
             w=0.28, h=0.12, fc="#e2ece9")
        _arrow(ax, 0.58, 0.915, 0.8, 0.662)
        _arrow(ax, 0.82, 0.538, 0.56, 0.17)
    xs = [0.08, 0.23, 0.345, 0.46, 0.61]
    names = ["experts[0]", "experts[1]", "...", f"experts[{E - 2}]", f"experts[{E - 1}]"]
    for x, name in zip(xs, names, strict=True):
        if name == "...":
            ax.text(x, 0.45, f"...\n{E}\nrouted", ha="center", va="center", fontsize=7)
            continue
        _box(ax, x, 0.45, f"{name}\nw1, w3 {_shape(e0, 'w1')}\nw2 {_shape(e0, 'w2')}", w=0.14, h=0.12)
    for x in (xs[1], xs[3]):
        _arrow(ax, 0.3, 0.698, x, 0.512)
    ax.text(0.32, 0.6, f"each token -> its K={gate.topk} chosen experts", fontsize=6.5, ha="left")
    _box(ax, 0.45, 0.12, "y = u + shared(u) + sum_k g_k * expert_k(u)   (N, D)", w=0.5, fc="#eeeeee")
    for x in (xs[1], xs[3]):
        _arrow(ax, x, 0.388, 0.42, 0.165)
    ax.text(0.5, 1.0, title or f"DeepSeekMoE (deepseek_edu.moe.MoE): weight shapes (out, in), E={E}", ha="center",
            va="bottom", fontsize=9)
    return fig


def plot_cache_bytes(per_token: Mapping[str, float], formula: Mapping[str, float], xlabel: str, title: str) -> Figure:
    """Measured KV-cache bytes per token of each attention kind (bars) against the formula (ticks).

    Args:
        per_token: kind -> measured bytes per token; formula: kind -> formula bytes per token.
    Raises:
        ValueError: if the kinds differ.
    """
    if list(per_token) != list(formula) or not per_token:
        raise ValueError(f"plot_cache_bytes: kinds {list(per_token)} vs {list(formula)}")
    names = list(per_token)
    fig, ax = new_figure(6.5, 2.8)
    ax.barh(names, [per_token[k] for k in names], color=[KV_KIND_COLORS.get(k, "#999999") for k in names],
            label="measured (tensor storage / batch / length)")
    ax.plot([formula[k] for k in names], names, "k|", ms=18, mew=2, label="formula (V2 Table 1)")
    for i, k in enumerate(names):
        ax.text(per_token[k], i, f" {per_token[k]:,.0f} B", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(per_token.values()) * 1.2)
    ax.set(xlabel=xlabel, title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_kv_calculator(gb: Mapping[str, float], curves: Mapping[str, Sequence[float]], contexts: Sequence[int],
                       context: int, labels: Mapping[str, str], left_title: str, right_title: str) -> Figure:
    """The KV-cache calculator: GB per kind at one context (bars), and against context (lines).

    Args:
        gb: kind -> GB at `context`; curves: kind -> GB at each of `contexts`; labels: kind -> label.
    Raises:
        ValueError: if the kinds of gb, curves and labels differ.
    """
    if not (set(gb) == set(curves) == set(labels)):
        raise ValueError("plot_kv_calculator: gb, curves and labels must have the same kinds")
    kinds = list(gb)
    fig, (ax1, ax2) = new_figure(10.0, 3.0, ncols=2)
    ax1.barh([labels[k] for k in kinds], [gb[k] for k in kinds], color=[KV_KIND_COLORS.get(k) for k in kinds])
    for i, k in enumerate(kinds):
        ax1.text(gb[k], i, f" {gb[k]:,.2f} GB", va="center", fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, max(gb.values()) * 1.35)
    ax1.set(xlabel="KV cache (GB)", title=left_title)
    for k in kinds:
        ax2.plot(contexts, curves[k], marker="o", ms=3, color=KV_KIND_COLORS.get(k), label=labels[k])
    ax2.axvline(context, color="gray", ls="--", lw=1)
    ax2.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache (GB)", title=right_title)
    ax2.set_xticks(list(contexts), [_ctx_label(t) for t in contexts])
    ax2.minorticks_off()
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_committed_balance(runs: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> Figure:
    """The committed `benchmarks/moe_balance.py` runs: MaxVio against step per arm (mean over seeds,
    band = min..max), and each arm's validation loss (bar = mean, dots = seeds).

    Args:
        runs: the JSON's "runs" entries (each with "arm", "val_loss", "max_violation_series"),
            possibly from several files; colors: arm -> colour.
    Raises:
        ValueError: if runs is empty.
    """
    if not runs:
        raise ValueError("plot_committed_balance: no runs")
    by_arm: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    fig, (ax1, ax2) = new_figure(10.0, 3.2, ncols=2)
    for i, (arm, rs) in enumerate(by_arm.items()):
        steps = rs[0]["max_violation_series"]["window_end_step"]
        series = np.array([r["max_violation_series"]["worst_layer_window_mean"] for r in rs])  # (seeds, points)
        ax1.plot(steps, series.mean(0), color=colors.get(arm), label=arm)
        ax1.fill_between(steps, series.min(0), series.max(0), color=colors.get(arm), alpha=0.2)
        vals = [r["val_loss"] for r in rs]
        ax2.bar(i, float(np.mean(vals)), color=colors.get(arm, "#999999"), alpha=0.6)
        ax2.plot([i] * len(vals), vals, "o", color="black", ms=4)
        ax2.text(i, max(vals) + 0.004, f"{np.mean(vals):.4f}", ha="center", fontsize=8)
    ax1.set(xlabel="step", ylabel="MaxVio (worst layer)", title="mean over seeds, band = min..max")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    allv = [r["val_loss"] for rs in by_arm.values() for r in rs]
    ax2.set_xticks(range(len(by_arm)), [a.replace(" γ", "\nγ") for a in by_arm], fontsize=8)
    ax2.set_ylim(min(allv) - 0.03, max(allv) + 0.02)
    ax2.set(ylabel="validation loss (nats/token)", title="bar = mean, dots = seeds")
    fig.tight_layout()
    return fig


MOE_STAGES = {"gate": "#8172b2", "sort+gather": "#ccb974", "experts": "#4c72b0", "combine": "#c44e52",
              "shared": "#55a868"}


def plot_moe_stages(res: Mapping[str, Any], label: str) -> Figure:
    """`benchmarks/moe_layer.py` result: each stage of the MoE layer timed alone (stacked bars), the
    dense layer of equal activated size (grey) and the whole MoE layer (text), per layout."""
    fig, ax = new_figure(8.0, 3.2)
    ticks = []
    for i, (name, r) in enumerate(res["layouts"].items()):
        left = 0.0
        for stage, color in MOE_STAGES.items():
            ms = r["breakdown"]["stages_s"][stage]["median"] * 1e3
            ax.barh(2 * i, ms, left=left, color=color, label=stage if i == 0 else None)
            left += ms
        ax.barh(2 * i + 0.8, r["breakdown"]["dense_step_s"] * 1e3, color="#999999", label="dense" if i == 0 else None)
        ax.text(max(left, r["breakdown"]["moe_step_s"] * 1e3), 2 * i,
                f" whole layer {r['breakdown']['moe_step_s'] * 1e3:.1f} ms", va="center", fontsize=7)
        ticks.append((2 * i + 0.4, name.replace(" (fine-grained)", "")))
    ax.set_yticks([p for p, _ in ticks], [n for _, n in ticks], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="forward + backward (ms)",
           title=f"{label}, {res['settings']['tokens']:,} tokens: each stage timed alone (bars) vs the whole layer")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.25)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    return fig


# --- chapter 08: FP8 training ---

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


def fp8_paper_vs_ours(accumulation: Mapping[str, Any], training: Mapping[str, Any],
                      granularity: Mapping[str, Any]) -> str:
    """A markdown table of V3's FP8 numbers beside the committed benchmark JSONs'."""
    import torch
    at = accumulation["by_k"]["4096"]
    fin = training["final_rel_loss_error"]
    g = granularity["mean_rel_error"]["b128"]
    rows = [
        ("E4M3 max / E5M2 max", "448 / 57344", (f"{torch.finfo(torch.float8_e4m3fn).max:g} / "
         f"{torch.finfo(torch.float8_e5m2).max:g} (`torch.finfo`)")),
        ("max relative error, K = 4096, no promotion", "nearly 2%", f"{100 * at['no_promotion']['mean']:.2f}% (emulated, 14 bits)"),
        ("... with promotion every N_C = 128", "removed", f"{100 * at['promotion']['max']:.3f}%"),
        ("relative loss error, FP8 vs higher precision", "< 0.25%", f"{100 * fin['fp8']['max']:.3f}% (max over seeds)"),
        ("... tensorwise scaling, same runs", "(not reported)", f"{100 * fin['fp8-tensorwise']['mean']:.3f}% (mean)"),
        ("seed-to-seed spread (FP32 vs FP32)", "(not reported)", f"{100 * training['final_seed_spread']:.3f}%"),
        ("activation error: tensorwise vs 1x128", "(motivation)", f"{100 * g['tensorwise']:.2f}% vs {100 * g['1x128']:.2f}%"),
    ]
    lines = ["| quantity | DeepSeek-V3 | ours |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


# --- chapter 09: GPU kernels ---

H200_DATASHEET = {"hbm_Bps": 4.8e12, "bf16_flops": 989.5e12, "fp8_flops": 1978.9e12}


def h200_ceilings(results_dir: Any) -> dict[str, Any]:
    """Ceilings of the project's H200 from committed JSON, each with where it came from.

    Prefers `kernels_h200.json` (copy, BF16 matmul and `_scaled_mm` blockwise measured in one run);
    else the copy bandwidth of `mla_decode_h200.json` and the BF16 matmul of `moe_layer_h200.json`;
    whatever no file measured comes from `H200_DATASHEET`, marked "datasheet".
    """
    import json
    from pathlib import Path

    d = Path(results_dir)
    out: dict[str, Any] = {}
    k = d / "kernels_h200.json"
    if k.exists():
        c = json.loads(k.read_text())["ceilings"]
        out["hbm_Bps"] = (c["device_copy"]["Bps"]["median"], "measured, kernels_h200.json")
        out["bf16_flops"] = (c["bf16_matmul"]["flops_per_s"]["median"], "measured, kernels_h200.json")
        if "flops_per_s" in c["scaled_mm_blockwise"]:
            out["fp8_flops"] = (c["scaled_mm_blockwise"]["flops_per_s"]["median"], "measured, kernels_h200.json")
    else:
        m, e = d / "mla_decode_h200.json", d / "moe_layer_h200.json"
        if m.exists():
            gbps = json.loads(m.read_text())["ceilings"]["device_copy"]["GBps"]["median"]
            out["hbm_Bps"] = (gbps * 1e9, "measured copy, mla_decode_h200.json")
        if e.exists():
            flops = json.loads(e.read_text())["peak_bf16_matmul"]["flops_per_s"]["median"]
            out["bf16_flops"] = (flops, "measured 8192^3 matmul, moe_layer_h200.json")
    for key, value in H200_DATASHEET.items():
        out.setdefault(key, (value, "datasheet"))
    return out


def plot_roofline(ceilings: dict[str, Any], points: Sequence[tuple[str, float, str]] = (),
                  measured: Sequence[tuple[str, float, float]] = (), ax: Any = None) -> Figure:
    """Roofline: attainable FLOP/s = min(peak, bandwidth x intensity), log-log, BF16 and FP8 roofs.

    Args:
        ceilings: from `h200_ceilings` (name -> (value, source)).
        points: (label, FLOP/byte, colour) drawn as vertical lines: where a kernel sits, not a measurement.
        measured: (label, FLOP/byte, FLOP/s) measured points (none until the GPU run is committed).
    """
    fig, ax = _figure_of(ax, 7.0, 3.6)
    bw, bw_src = ceilings["hbm_Bps"]
    x = np.logspace(-1, 3.5, 200)
    for key, style, name in (("bf16_flops", "-", "BF16"), ("fp8_flops", "--", "FP8")):
        peak, src = ceilings[key]
        ax.plot(x, np.minimum(peak, bw * x) / 1e12, style, color="#333333", lw=1.3,
                label=f"{name} roof: {peak / 1e12:.0f} TFLOP/s ({src})")
        ax.axvline(peak / bw, color="#999999", lw=0.6, ls=":")
    for label, ai, color in points:
        ax.axvline(ai, color=color, lw=1.5, alpha=0.8)
        ax.text(ai * 1.07, 1.0, label, rotation=90, fontsize=7, color=color, va="bottom")
    for label, ai, flops in measured:
        ax.plot([ai], [flops / 1e12], "o", ms=5, label=label)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte of memory traffic)",
           ylabel="TFLOP/s", title=f"H200 roofline; memory {bw / 1e12:.2f} TB/s ({bw_src})", ylim=(0.3, 3000))
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_quant_layouts(C: int = 512, R: int = 64, block: int = 128) -> Figure:
    """Diagram: 1 x 128 activation tiles, 128 x 128 weight blocks, and one token's FP8 MLA cache row."""
    fig, (a1, a2, a3) = new_figure(10.0, 2.8, ncols=3, gridspec_kw={"width_ratios": [1.2, 1.0, 1.8]})
    for i in range(4):  # activations: 4 tokens x 512 channels, one scale per 1 x 128
        for j in range(4):
            a1.add_patch(mpatches.Rectangle((j * block, 3 - i), block, 0.9, color=TOKEN_COLORS[(i + j) % 6], ec="k"))
            a1.text(j * block + block / 2, 3.45 - i, f"s[{i},{j}]", ha="center", va="center", fontsize=6)
    a1.set(xlim=(0, 4 * block), ylim=(0, 4), title="activations: 1 x 128 tiles", xlabel="channel", ylabel="token")
    for i in range(3):  # weight: 384 x 384, one scale per 128 x 128
        for j in range(3):
            a2.add_patch(mpatches.Rectangle((j, 2 - i), 1, 1, color=TOKEN_COLORS[(i * 3 + j) % 6], ec="k"))
            a2.text(j + 0.5, 2.5 - i, f"s[{i},{j}]", ha="center", va="center", fontsize=7)
    a2.set(xlim=(0, 3), ylim=(0, 3), title="weights: 128 x 128 blocks", xticks=[], yticks=[])
    parts = [(f"{C} x E4M3 latent", C, "#dfe7fd"), (f"{C // block} x FP32 scales", 4 * (C // block), "#fde2e4"),
             (f"{R} x BF16 rotary", 2 * R, "#e2ece9")]
    x0 = 0
    for label, nbytes, color in parts:
        a3.add_patch(mpatches.Rectangle((x0, 0), nbytes, 1, color=color, ec="k"))
        narrow = nbytes < 60  # too thin to hold its label: write it above the bar
        a3.text(x0 + nbytes / 2, 1.25 if narrow else 0.5, f"{label}\n{nbytes} B", ha="center", va="center", fontsize=7)
        x0 += nbytes
    a3.set(xlim=(0, x0), ylim=(0, 1.6), yticks=[], xlabel="byte", title=f"FP8 MLA cache: {x0} bytes per token per layer")
    fig.tight_layout()
    return fig


# --- chapter 11: systems ---

PIPELINE_COLORS = {"F": "#4C72B0", "B": "#DD8452", "Bi": "#E8A97A", "W": "#55A868", "FB": "#8172B2"}


def plot_pipeline_timeline(events: Sequence[tuple[int, float, float, str, int]], title: str = "",
                           ax: Any = None, label_microbatches: bool = True) -> Figure:
    """Per-rank timeline of a pipeline schedule: one row per rank, one bar per operation.

    Args:
        events: (rank, start, end, kind, microbatch) with kind in F, B, Bi, W, FB
            (`deepseek_edu.parallel.pipeline.Timeline.as_tuples()`).
    """
    fig, ax = _figure_of(ax, 9.0, 0.4 * (1 + max(e[0] for e in events)) + 1.2)
    for rank, start, end, kind, mb in events:
        ax.barh(rank, end - start, left=start, color=PIPELINE_COLORS[kind], edgecolor="white", height=0.8)
        if label_microbatches and end - start >= 0.8:
            ax.text((start + end) / 2, rank, str(mb), ha="center", va="center", fontsize=6, color="white")
    ax.invert_yaxis()
    ax.set_ylabel("rank")
    ax.set_xlabel("time (units of the durations)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    names = {"F": "forward", "B": "backward", "Bi": "backward (input)", "W": "backward (weights)",
             "FB": "overlapped F&B"}
    kinds = sorted({e[3] for e in events}, key=list(PIPELINE_COLORS).index)
    ax.legend(handles=[mpatches.Patch(color=PIPELINE_COLORS[k], label=names[k]) for k in kinds],
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(kinds), fontsize=7, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_gpu_loads(loads: Mapping[str, Sequence[float]], title: str = "", ax: Any = None) -> Figure:
    """Grouped bars of tokens per GPU, one group per GPU, one bar per placement (label -> (G,) loads)."""
    fig, ax = _figure_of(ax, 6.5, 3.0)
    n = len(loads)
    width = 0.8 / n
    for i, (label, values) in enumerate(loads.items()):
        values = _to_numpy(values)
        ax.bar(np.arange(len(values)) + (i - (n - 1) / 2) * width, values, width=width,
               label=f"{label} (max/mean {values.max() / values.mean():.2f})")
        ax.axhline(values.mean(), color="gray", lw=0.8, ls=":")
    ax.set_xlabel("GPU")
    ax.set_ylabel("tokens")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# --- chapters 05-07: MTP, the tiny DeepSeek, pre-training ---

def figure_png(fig: Figure) -> bytes:
    """The PNG bytes of `fig` as Jupyter's inline backend draws it (figure DPI, tight bounding box)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def png_bundle(fig: Figure, alt: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(data, metadata) of the display message `show` sends: the PNG and its alternative text.

    The alternative text lives in the output's metadata under the PNG's MIME type,
    `{"image/png": {"alt": ...}}` -- where nbconvert's HTML templates read it (`get_metadata('alt',
    'image/png')`) to write the `<img alt="...">` attribute that GitHub-style static reading and screen
    readers use.

    Raises:
        ValueError: when `alt` is empty or only whitespace.
    """
    import base64

    if not isinstance(alt, str) or not alt.strip():
        raise ValueError("alt must be a non-empty description of the figure")
    data = {
        "image/png": base64.b64encode(figure_png(fig)).decode("ascii"),
        "text/plain": f"<Figure: {alt.strip()}>",
    }
    return data, {"image/png": {"alt": alt.strip()}}


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


def text_explorer(sample: Callable[..., str], controls: Mapping[str, Any]) -> Any:
    """Like `explorer`, for text: the sample at the controls' values is printed (a static output that
    GitHub shows), then the controls and an empty output that re-prints a sample when they change.

    Args:
        sample: keyword arguments named like `controls` -> text.
        controls: name -> ipywidgets control.
    Returns:
        The `ipywidgets.VBox` of controls and output (end the cell with it).
    """
    import ipywidgets as widgets

    def current() -> dict[str, Any]:
        return {name: c.value for name, c in controls.items()}

    print(sample(**current()))
    out = widgets.Output()

    def redraw(_change: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            print(sample(**current()))

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


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


# --- chapter 10: GRPO ---

_GRPO_BOX_W, _GRPO_BOX_H = 0.25, 0.17
_GRPO_BOXES = {
    "prompts": ("P prompts q\n`task.problems(P, 'train')`", 0.08, 0.78, "#e2ece9"),
    "policy": ("policy π_θ (= π_old while sampling)\ntiny DeepSeek `Transformer`", 0.40, 0.78, "#dfe7fd"),
    "samples": ("G responses per prompt, (P·G, T)\n`sample_responses` + stored log π_old", 0.72, 0.78, "#dfe7fd"),
    "rewards": ("rule rewards r, (P·G,)\n`score_responses`: accuracy + 0.1·format", 0.72, 0.46, "#fff1c1"),
    "adv": ("group advantages Â, (P·G,)\n`group_advantages(r, group_ids)`", 0.40, 0.46, "#fff1c1"),
    "loss": ("clipped surrogate + β·k3 KL\n`policy_loss` (min(ρÂ, clip(ρ)Â))", 0.40, 0.14, "#fde2e4"),
    "ref": ("frozen reference π_ref\n(the SFT model) `response_logprobs`", 0.72, 0.14, "#e8dff5"),
    "update": ("AdamW step, μ per batch\n`grpo_train`", 0.08, 0.14, "#fde2e4"),
}


_GRPO_ARROWS = [("prompts", "policy"), ("policy", "samples"), ("samples", "rewards"), ("rewards", "adv"),
                ("adv", "loss"), ("ref", "loss"), ("loss", "update"), ("update", "policy")]


def grpo_loop_entries() -> list[tuple[str, str]]:
    """(box key, label) of the GRPO loop diagram, in drawing order."""
    return [(k, v[0]) for k, v in _GRPO_BOXES.items()]


def plot_grpo_loop() -> Figure:
    """The GRPO loop of `grpo.grpo_train` as boxes and arrows, with the package's names and shapes.

    DeepSeekMath §4.1 (Fig. 4) / R1 §2.2: sample a group per prompt, score by rules, advantages
    inside each group, clipped objective with a KL penalty to a frozen reference, update, repeat.
    """
    fig = plt.figure(figsize=(9.0, 4.0), dpi=FIG_DPI)
    plt.close(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.07, 0.87)
    ax.set_ylim(-0.02, 0.98)
    ax.axis("off")
    w, h = _GRPO_BOX_W, _GRPO_BOX_H
    for src, dst in _GRPO_ARROWS:
        (_, x0, y0, _), (_, x1, y1, _) = _GRPO_BOXES[src], _GRPO_BOXES[dst]
        dx, dy = x1 - x0, y1 - y0
        t = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
        ax.annotate("", xy=(x1 - t * dx, y1 - t * dy), xytext=(x0 + t * dx, y0 + t * dy),
                    arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 1.2, "shrinkA": 2, "shrinkB": 2})
    for label, x, y, color in _GRPO_BOXES.values():
        ax.add_patch(mpatches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.01,rounding_size=0.02",
                                             fc=color, ec="#555555", lw=0.8, zorder=2))
        ax.text(x, y, label, ha="center", va="center", fontsize=7.5, zorder=3, linespacing=1.3)
    ax.text(0.40, 0.955, "One GRPO step (grpo_train): sample a group, score by rules, compare inside the group, "
            "update", ha="center", va="top", fontsize=9.5)
    return fig


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_grpo_run(history: Sequence[Mapping[str, float]], evals: Sequence[Mapping[str, float]],
                  n_eval: int | None = None, title: str = "") -> Figure:
    """Four panels of one GRPO run (`GRPOResult.history`, `.evals`): batch reward and accuracy (5-step
    mean), held-out greedy accuracy (with ±1 binomial standard error bars when `n_eval` is given),
    response length, KL to the reference and clip fraction."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    steps = [h["step"] for h in history]
    fig, axes = new_figure(10.0, 5.4, nrows=2, ncols=2)
    (a1, a2), (a3, a4) = axes
    a1.plot(steps, _smooth([h["reward"] for h in history], 5), color="#4c72b0", label="reward (sampled batch)")
    a1.plot(steps, _smooth([h["accuracy"] for h in history], 5), color="#55a868", label="accuracy (sampled batch)")
    a1.set(xlabel="GRPO step", title="batch reward and accuracy (5-step mean)")
    a1.legend(fontsize=7)
    acc = np.array([e["accuracy"] for e in evals])
    err = np.sqrt(acc * (1 - acc) / n_eval) if n_eval else None
    a2.errorbar([e["step"] for e in evals], acc, yerr=err, fmt="o-", color="#c44e52", capsize=3)
    a2.set(xlabel="GRPO step", ylabel="accuracy",
           title="held-out accuracy (greedy" + (f", ±1 SE, n={n_eval})" if n_eval else ")"))
    a3.plot(steps, [h["length"] for h in history], color="#8172b2")
    a3.set(xlabel="GRPO step", ylabel="tokens", title="response length")
    a4.plot(steps, [h["kl"] for h in history], color="#ccb974", label="KL (k3) to the SFT model")
    a4.plot(steps, [h["clip_frac"] for h in history], color="#64b5cd", label="clip fraction")
    a4.set(xlabel="GRPO step", title="KL and clipping")
    a4.legend(fontsize=7)
    for ax in (a1, a2, a3, a4):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


GRPO_VARIANT_COLORS = {"grpo": "#4c72b0", "dr_grpo": "#55a868", "dapo": "#c44e52"}


def grpo_variant_rows(bench: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per variant of a `benchmarks/grpo_variants.py` result (several seeds): SFT and final
    held-out accuracy, gain and gain in standard errors -- mean, min and max over the seeds -- and
    the KL and response length averaged over the last 10 steps and the seeds."""
    rows = []
    for v, by_seed in bench["runs"].items():
        runs = list(by_seed.values())
        if not runs:
            raise ValueError(f"variant {v!r} has no runs")
        sft = [bench["sft"][s]["eval"]["accuracy"] for s in by_seed]
        final = [r["accuracy_final"] for r in runs]
        gain = [r["gain_final"] for r in runs]
        se = [r["gain_se"] for r in runs]
        tails = [r["history"][-10:] for r in runs]
        rows.append({
            "variant": v, "seeds": len(runs), "sft_mean": float(np.mean(sft)), "final_mean": float(np.mean(final)),
            "gain_mean": float(np.mean(gain)), "gain_min": min(gain), "gain_max": max(gain),
            "se_min": min(se), "se_max": max(se),
            "kl_end": float(np.mean([h["kl"] for t in tails for h in t])),
            "length_end": float(np.mean([h["length"] for t in tails for h in t])),
        })
    return rows


def plot_grpo_variants(bench: Mapping[str, Any]) -> Figure:
    """Held-out accuracy gain over each seed's SFT model against GRPO step for every variant of a
    `benchmarks/grpo_variants.py` result: the mean over seeds as a line, the min-max over seeds as a
    band; then KL to the SFT model and response length (10-step means, averaged over seeds)."""
    fig, (b1, b2, b3) = new_figure(12.0, 3.3, ncols=3)
    for v, by_seed in bench["runs"].items():
        color = GRPO_VARIANT_COLORS.get(v)
        gains = np.array([[e["accuracy"] - r["evals"][0]["accuracy"] for e in r["evals"]] for r in by_seed.values()])
        steps = [e["step"] for e in next(iter(by_seed.values()))["evals"]]
        b1.plot(steps, gains.mean(0), "o-", ms=3, color=color, label=f"{v} (mean of {len(gains)} seeds)")
        b1.fill_between(steps, gains.min(0), gains.max(0), color=color, alpha=0.15)
        hist = [r["history"] for r in by_seed.values()]
        hsteps = [h["step"] for h in hist[0]]
        for ax, key in ((b2, "kl"), (b3, "length")):
            mean = np.mean([_smooth([h[key] for h in hh], 10) for hh in hist], axis=0)
            ax.plot(hsteps, mean, color=color, label=v)
    b1.axhline(0, color="gray", ls="--", lw=1)
    target = bench.get("acceptance", {}).get("target_gain")
    if target:
        b1.axhline(target, color="gray", ls=":", lw=1)
    b1.set(xlabel="GRPO step", ylabel="accuracy − SFT accuracy", title="held-out gain (band: min–max of seeds)")
    b2.set(xlabel="GRPO step", title="KL (k3) to the SFT model, 10-step mean")
    b3.set(xlabel="GRPO step", ylabel="tokens", title="response length, 10-step mean")
    for ax in (b1, b2, b3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _drawable(text: str, family: str | None = None) -> str:
    """`text` with spaces and newlines kept and every character the font cannot draw as U+XXXX."""
    return "".join(ch if ch in " \n" else _printable(ch, family) for ch in text)


def plot_reward_breakdown(response: str, problem: Any, format_weight: float = 0.1) -> Figure:
    """Bars of the format, accuracy and total reward (`grpo.format_reward`, `accuracy_reward`) of one
    response, and how `grpo.parse_r1_layout` splits it (the notebook 10 explorer)."""
    from .grpo import accuracy_reward, format_reward, parse_r1_layout

    layout = parse_r1_layout(response)
    f, a = format_reward(response), accuracy_reward(response, problem)
    fig, (ax1, ax2) = new_figure(10.0, 2.8, ncols=2)
    vals = [f, a, a + format_weight * f]
    ax1.bar(["format", "accuracy", f"total\n(acc + {format_weight:g} x fmt)"], vals, color=["#8172b2", "#55a868", "#4c72b0"])
    for i, v in enumerate(vals):
        ax1.text(i, v + 0.03, f"{v:.2f}", ha="center", fontsize=8)
    ax1.set(ylim=(0, 1.35), title=_drawable(f"rewards for {problem.prompt!r} (reference {problem.answer})"))
    lines = ["layout: " + ("ok" if layout else "broken (each tag once, in order, only whitespace around)")]
    if layout:
        lines += [f"reasoning: {layout[0][:60]!r}", f"answer: {layout[1][:60]!r}"]
    ax2.axis("off")
    ax2.text(0, 0.9, _drawable("\n".join(lines), "monospace"), va="top", fontsize=8, family="monospace")
    fig.tight_layout()
    return fig
