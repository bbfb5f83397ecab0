"""Plotting and widget helpers shared by the course notebooks.

Every helper draws with matplotlib and returns the `Figure`, already closed in pyplot, so a cell
that ends with the figure shows it exactly once as a static PNG -- what GitHub and nbviewer render
from the committed notebook. Figures are small on purpose (`FIG_DPI`, a few inches wide): a
notebook must stay under 1 MB with its outputs.

**Static figure first.** An interactive explorer is only alive in a running kernel; a reader on
GitHub sees its saved output. So every explorer first draws its figure at the default settings as
an ordinary output, and only then shows the controls (`explorer`). The controls redraw into an
`ipywidgets.Output` that starts *empty*: running the notebook stores no second copy of the figure
inside the widget state, and nothing is drawn until the reader moves a control.

Helpers:
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


def explorer(draw: Callable[..., Figure], controls: Mapping[str, Any], show_static: bool = True) -> Any:
    """Static figure first, then widgets that redraw it: the course's pattern for explorers.

    1. `draw(**defaults)` is called once with each control's current value and its figure is
       displayed as an ordinary output (GitHub and nbviewer show it; so does a printout).
    2. The controls and an *empty* `ipywidgets.Output` are displayed; when any control changes,
       `draw` is called again and its figure replaces the output's content. Nothing is drawn into
       the widget until then, so the stored widget state carries no copy of the figure.

    Args:
        draw: keyword arguments named like `controls` -> a matplotlib Figure.
        controls: name -> ipywidgets control (anything with `.value` and `.observe`).
        show_static: display the figure at the defaults first (step 1).
    Returns:
        The `ipywidgets.VBox` holding the controls and the output: end the cell with the call
        so that Jupyter displays it under the static figure.
    """
    import ipywidgets as widgets
    from IPython.display import display

    def current() -> dict[str, Any]:
        return {name: c.value for name, c in controls.items()}

    if show_static:
        display(draw(**current()))
    out = widgets.Output()

    def redraw(_change: Any = None) -> None:
        fig = draw(**current())
        with out:
            out.clear_output(wait=True)
            display(fig)

    for control in controls.values():
        control.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), out])


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


# --- chapter 10: GRPO ----------------------------------------------------------------------------------


def show(fig: Figure, alt: str) -> None:
    """Display `fig` once as a static PNG whose output carries alternative text `alt`.

    The alt text goes in the output's metadata under ``image/png`` (where nbconvert's HTML export
    reads it for ``<img alt=...>``) and in the ``text/plain`` fallback. Same contract as the other
    notebooks' ``viz.show(fig, alt=...)``.

    Raises:
        ValueError: when `alt` is empty or only whitespace.
    """
    import base64
    import io

    from IPython.display import display

    if not isinstance(alt, str) or not alt.strip():
        raise ValueError("alt must be a non-empty description of the figure")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    plt.close(fig)
    display({"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": f"<Figure: {alt.strip()}>"},
            raw=True, metadata={"image/png": {"alt": alt.strip()}})


# (label, x, y, colour) of each box of the GRPO loop diagram; labels name the package's functions
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
_GRPO_BOX_W, _GRPO_BOX_H = 0.25, 0.17


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
