"""How the course displays figures: the course's size and DPI, alternative text, explorers.

Every helper in `deepseek_edu.viz` draws with matplotlib and returns the `Figure`, already closed in
pyplot, so a cell shows it exactly once. `show(fig, alt=...)` sends the figure as a PNG together with
an HTML `<img alt=...>` of the same PNG, so a screen reader, nbconvert's HTML and a static reader get
a description of every figure. `explorer` draws the static figure at the controls' defaults first,
then redraws *that same output* (an IPython display id) when a control moves; `text_explorer` does
the same for printed text. `show_plotly` stores a plotly figure's JSON beside a static figure.

The small drawing primitives `_box`, `_arrow` and `_shape` serve the module diagrams of chapters
03 and 04 (`mla.plot_mla_diagram`, `moe.plot_moe_diagram`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib.patches as mpatches
import matplotlib.pyplot as plt  # importing pyplot in Jupyter registers the inline PNG display of figures
import numpy as np
from matplotlib.figure import Figure

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


def committed_results(results_dir: Any, pattern: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The committed benchmark JSONs of `results_dir` matching `pattern`, sorted by file name, keyed by the
    machine that made each: {"NVIDIA H200" or "CPU (1 thread)": (file name, result)}."""
    out = {}
    for f in sorted(Path(results_dir).glob(pattern)):
        res = json.loads(f.read_text())
        label = res["machine"].get("gpu", {}).get("name") or f"CPU ({res['machine']['torch_threads']} thread)"
        out[label] = (f.name, res)
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


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
