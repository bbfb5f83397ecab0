"""Tests of `deepseek_edu.viz`: the plotting and widget helpers the notebooks share.

Checks that every helper returns a matplotlib Figure that pyplot no longer tracks (so a notebook
cell shows it exactly once and nothing leaks), that bad inputs raise `ValueError` naming the
mismatch, that text the default font cannot draw (emoji, CJK) never triggers matplotlib's
"Glyph missing" warning (a stderr line in a notebook), that the paradigm map holds every notebook
and survey section, and that `explorer` shows the static figure first and leaves its widget output
empty until a control changes.
"""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from deepseek_edu import viz


def _untracked(fig: Figure) -> bool:
    """True when `fig` is a Figure that pyplot no longer holds (closed: shown once, never leaked)."""
    return isinstance(fig, Figure) and all(plt.figure(n) is not fig for n in plt.get_fignums())


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [
        t.get_text() for ax in fig.axes for t in ax.get_yticklabels() + ax.get_xticklabels()]


def _draw_strict(fig: Figure) -> None:
    """Render the figure with every warning turned into an error (glyph warnings appear at draw time)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.canvas.draw()


def test_new_figure_is_closed_in_pyplot_and_uses_the_course_dpi() -> None:
    before = set(plt.get_fignums())
    fig, _ = viz.new_figure(4.0, 2.0)
    assert set(plt.get_fignums()) == before
    assert fig.dpi == viz.FIG_DPI and tuple(fig.get_size_inches()) == (4.0, 2.0)
    fig, axes = viz.new_figure(ncols=2)
    assert len(axes) == 2


def test_loss_curves_draws_train_val_and_reference() -> None:
    fig = viz.plot_loss_curves([1, 2, 3], [7.6, 6.0, 5.5], [3], [5.8], reference=6.1, title="t")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["train", "validation"]
    assert any("6.10" in label for label in labels), labels
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [7.6, 6.0, 5.5])
    assert _untracked(fig)
    _draw_strict(fig)


def test_loss_curves_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        viz.plot_loss_curves([1, 2], [1.0])
    with pytest.raises(ValueError, match="together"):
        viz.plot_loss_curves([1], [1.0], val_steps=[1], val_loss=None)
    with pytest.raises(ValueError, match="together"):
        viz.plot_loss_curves([1], [1.0], val_steps=[1, 2], val_loss=[1.0])


def test_bars_colours_and_legend() -> None:
    fig = viz.plot_bars(["a", "b", "c"], [1, 2, 3], colors=["r", "g", "b"], legend={"train": "r"})
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.get_legend() is not None
    with pytest.raises(ValueError, match="2 colors for 3 bars"):
        viz.plot_bars(["a", "b", "c"], [1, 2, 3], colors=["r", "g"])
    with pytest.raises(ValueError, match="differ in length"):
        viz.plot_bars(["a"], [1, 2])
    vertical = viz.plot_bars(["a", "b"], [1, 2], horizontal=False)
    assert [t.get_text() for t in vertical.axes[0].get_xticklabels()] == ["a", "b"]


def test_histogram_counts() -> None:
    fig = viz.plot_histogram([1, 1, 2, 3, 3, 3], bins=np.arange(1, 5) - 0.5)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [2, 1, 3]


def test_heatmap_accepts_tensors_and_checks_labels() -> None:
    m = torch.tril(torch.ones(3, 4))
    fig = viz.plot_heatmap(m, x_labels=list("abcd"), y_labels=list("xyz"))
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), m.numpy())
    assert len(fig.axes) == 2  # the heatmap and its colorbar
    with pytest.raises(ValueError, match="2-D"):
        viz.plot_heatmap(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="3 x_labels for 4 columns"):
        viz.plot_heatmap(m, x_labels=list("abc"))
    with pytest.raises(ValueError, match="2 y_labels for 3 rows"):
        viz.plot_heatmap(m, y_labels=list("ab"))
    fig, axes = viz.new_figure(ncols=2)
    assert viz.plot_heatmap(m, colorbar=False, ax=axes[1]) is fig


def test_attention_labels_tokens_with_visible_whitespace() -> None:
    w = torch.softmax(torch.randn(3, 3), -1).tril()
    fig = viz.plot_attention(w, ["A", " b", "\n"])
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["A", "\u00b7b", "\u21b5"]
    _draw_strict(fig)


def test_printable_spells_out_what_the_font_lacks() -> None:
    assert viz._printable(" a\n\t") == "\u00b7a\u21b5\u2192"
    assert viz._printable("\U0001F642", viz.TOKEN_FONT) == "U+1F642"
    assert viz._printable("caf\u00e9") == "caf\u00e9"  # Latin accents are in DejaVu
    assert viz._printable("") == "\u2205"
    assert viz._printable("\x00") == "U+0000"  # control characters are not drawn


def test_tokens_one_box_per_piece_and_no_glyph_warnings() -> None:
    pieces = ["Hello", ",", " world", " \U0001F642", "\n", " caf\u00e9", " \u65e5\u672c", "\ufffd", "<f0 9f>"]
    fig = viz.plot_tokens(pieces, ids=list(range(len(pieces))), title="tokens")
    ax = fig.axes[0]
    assert len(ax.patches) == len(pieces)
    texts = [t.get_text() for t in ax.texts]
    assert "\u00b7world" in texts and "\u00b7U+1F642" in texts and "8" in texts
    assert _untracked(fig)
    _draw_strict(fig)  # emoji and CJK must not warn "Glyph ... missing from font(s)"


def test_tokens_truncates_and_checks_ids() -> None:
    fig = viz.plot_tokens(["a"] * 10, max_pieces=4)
    assert len(fig.axes[0].patches) == 4
    assert any("first 4 of 10" in t for t in _texts(fig))
    with pytest.raises(ValueError, match="2 ids for 3 pieces"):
        viz.plot_tokens(["a", "b", "c"], ids=[1, 2])


def test_tokens_wraps_long_text_into_more_lines() -> None:
    short = viz.plot_tokens(["word "] * 3)
    long = viz.plot_tokens(["word "] * 60)
    assert long.get_size_inches()[1] > short.get_size_inches()[1]


def test_paradigm_map_names_every_notebook_and_survey_section() -> None:
    entries = viz.paradigm_map_entries()
    notebooks = [nb for nb, _, _ in entries]
    assert notebooks == ["01", "02", "03", "04", "05", "06/07", "08", "09", "10", "11"]
    sections = {sec for _, _, sec in entries}
    assert {"§III-A", "§III-B", "§III-C", "§III-D"} <= sections
    assert {s.split()[0] for s in sections if s.startswith("§IV")} == {"§IV"}
    assert {s for s in sections if s.startswith("§IV")} == {"§IV training", "§IV inference", "§IV system"}
    fig = viz.plot_paradigm_map()
    texts = " ".join(_texts(fig))
    for nb in notebooks:
        assert f"nb {nb}" in texts
    ax = fig.axes[0]
    assert len(ax.patches) == len(entries)  # one box per technique
    assert _untracked(fig)
    _draw_strict(fig)


def test_box_edge_lies_on_the_box_border() -> None:
    x, y = viz._box_edge(0.5, 0.5, 0.9, 0.5)  # straight right
    assert (x, y) == pytest.approx((0.5 + viz._MAP_BOX_W / 2, 0.5))
    x, y = viz._box_edge(0.5, 0.5, 0.5, 0.0)  # straight down
    assert (x, y) == pytest.approx((0.5, 0.5 - viz._MAP_BOX_H / 2))


def test_explorer_shows_static_figure_first_and_leaves_the_output_empty(monkeypatch) -> None:
    widgets = pytest.importorskip("ipywidgets")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    calls = []

    def draw(n=1, word="a"):
        calls.append((n, word))
        return viz.plot_tokens([word] * n)

    slider, text = widgets.IntSlider(2, 1, 5), widgets.Text("x")
    box = viz.explorer(draw, {"n": slider, "word": text})
    assert calls == [(2, "x")], "the static figure is drawn once with the controls' values"
    assert len(shown) == 1 and isinstance(shown[0], Figure), "only the static figure is displayed by explorer"
    assert isinstance(box, widgets.VBox)
    out = box.children[1]
    assert isinstance(out, widgets.Output) and out.outputs == (), "no copy of the figure in the widget state"
    slider.value = 3
    assert calls[-1] == (3, "x")
    text.value = "y"
    assert calls[-1] == (3, "y")


def test_explorer_can_skip_the_static_figure(monkeypatch) -> None:
    widgets = pytest.importorskip("ipywidgets")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    viz.explorer(lambda n=1: viz.plot_tokens(["a"] * n), {"n": widgets.IntSlider(1, 1, 3)}, show_static=False)
    assert shown == []


def test_show_sends_the_png_with_its_alt_text_in_the_output_metadata(monkeypatch) -> None:
    import base64

    import IPython.display

    sent = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: sent.append((objs, kw)))
    fig = viz.plot_bars(["a", "b"], [1.0, 2.0])
    viz.show(fig, alt="Two bars, b twice as tall as a")
    (objs, kw), = sent
    data = objs[0]
    assert kw["raw"] is True
    assert kw["metadata"] == {"image/png": {"alt": "Two bars, b twice as tall as a"}}
    assert base64.b64decode(data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert _untracked(fig)
    with pytest.raises(ValueError, match="alt"):
        viz.show(fig, alt="  ")


def test_explorer_with_alt_shows_the_static_figure_with_alt_text(monkeypatch) -> None:
    widgets = pytest.importorskip("ipywidgets")
    import IPython.display

    sent = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: sent.append((objs, kw)))
    viz.explorer(lambda n=1: viz.plot_tokens(["a"] * n), {"n": widgets.IntSlider(1, 1, 3)}, alt="Token boxes")
    (_objs, kw), = sent
    assert kw["metadata"]["image/png"]["alt"] == "Token boxes"


def test_nbconvert_html_writes_the_alt_text_of_show(tmp_path) -> None:
    """Executed in a real kernel and exported as nbconvert's HTML (as static readers see it).

    nbconvert's `classic` template (nbviewer's look) writes the output's `image/png` `alt` metadata
    as the `<img alt>`; its default `lab` template (7.17) ignores that metadata.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nbconvert = pytest.importorskip("nbconvert")
    import logging

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from deepseek_edu import viz\n"
        "viz.show(viz.plot_bars(['a', 'b'], [1.0, 2.0]), alt='Two bars, \"b\" is taller')")]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    (out,) = nb.cells[0].outputs
    assert out["metadata"]["image/png"]["alt"] == 'Two bars, "b" is taller'
    exporter = nbconvert.HTMLExporter(template_name="classic")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    exporter.log.addHandler(handler)
    try:
        html, _ = exporter.from_notebook_node(nb)
    finally:
        exporter.log.removeHandler(handler)
    from bs4 import BeautifulSoup  # nbconvert's own dependency

    assert [img.get("alt") for img in BeautifulSoup(html, "html.parser").find_all("img")] == [
        'Two bars, "b" is taller']
    assert not [r for r in records if "Alternative text is missing" in r.getMessage()]
