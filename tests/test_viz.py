"""Tests of `deepseek_edu.viz`: the plotting and widget helpers the notebooks share.

Checks that every helper returns a matplotlib Figure that pyplot no longer tracks (so a notebook
cell shows it exactly once and nothing leaks), that bad inputs raise `ValueError` naming the
mismatch, that text the default font cannot draw (emoji, CJK) never triggers matplotlib's
"Glyph missing" warning (a stderr line in a notebook), that the paradigm map holds every notebook
and survey section, that `show` gives every figure alternative text, and that `explorer` shows the
static figure first and redraws that same output (never a second figure) when a control changes.
The report helpers that read committed `benchmarks/results/*.json` into printed lines are checked
against the values in those files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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


class _Handle:
    """Stands in for IPython's DisplayHandle: records each update of the displayed output."""

    def __init__(self, log: list) -> None:
        self.log = log

    def update(self, data, **kw) -> None:
        self.log.append(("update", data, kw))


def _fake_display(log: list):
    def display(*objs, **kw):
        log.append(("display", objs, kw))
        return _Handle(log) if kw.get("display_id") else None
    return display


def test_show_displays_png_and_html_with_alt_text_once(monkeypatch) -> None:
    import IPython.display

    log = []
    monkeypatch.setattr(IPython.display, "display", _fake_display(log))
    fig = viz.plot_tokens(["ab", "c"])
    viz.show(fig, alt='two "tokens" <a>')
    assert len(log) == 1
    _, (data,), kw = log[0]
    assert kw["raw"] is True and set(data) == {"image/png", "text/html", "text/plain"}
    assert data["image/png"] in data["text/html"], "the HTML image is the same PNG"
    assert 'alt="two &quot;tokens&quot; &lt;a&gt;"' in data["text/html"], "alt text escaped into the <img>"
    assert kw["metadata"]["image/png"]["alt"] == 'two "tokens" <a>'
    assert _untracked(fig)


@pytest.mark.parametrize("alt", ["", "   ", None])
def test_show_refuses_a_figure_without_alt_text(alt) -> None:
    with pytest.raises(ValueError, match="alt"):
        viz.figure_bundle(viz.plot_tokens(["a"]), alt)


def test_explorer_redraws_the_static_figure_in_place(monkeypatch) -> None:
    widgets = pytest.importorskip("ipywidgets")
    import IPython.display

    log = []
    monkeypatch.setattr(IPython.display, "display", _fake_display(log))
    calls = []

    def draw(n=1, word="a"):
        calls.append((n, word))
        return viz.plot_tokens([word] * n)

    slider, text = widgets.IntSlider(2, 1, 5), widgets.Text("x")
    box = viz.explorer(draw, {"n": slider, "word": text}, alt=lambda n, word: f"{n} boxes of {word}")
    assert calls == [(2, "x")], "the static figure is drawn once with the controls' values"
    assert len(log) == 1 and log[0][0] == "display" and log[0][2]["display_id"] is True
    assert log[0][1][0]["text/plain"] == "[figure] 2 boxes of x"
    assert isinstance(box, widgets.VBox) and len(box.children) == 1, "controls only: no second figure"
    slider.value = 3
    assert calls[-1] == (3, "x")
    assert log[-1][0] == "update" and log[-1][1]["text/plain"] == "[figure] 3 boxes of x", "same output replaced"
    text.value = "y"
    assert calls[-1] == (3, "y") and len(log) == 3
    assert [kind for kind, *_ in log] == ["display", "update", "update"], "never a second figure on the page"


def test_explorer_can_skip_the_static_figure(monkeypatch) -> None:
    widgets = pytest.importorskip("ipywidgets")
    import IPython.display

    log = []
    monkeypatch.setattr(IPython.display, "display", _fake_display(log))
    box = viz.explorer(lambda n=1: viz.plot_tokens(["a"] * n), {"n": widgets.IntSlider(1, 1, 3)}, show_static=False)
    assert log == []
    assert isinstance(box.children[1], widgets.Output) and box.children[1].outputs == ()


# --- chapter figures (01-04) ------------------------------------------------------------------

def test_png_bytes_is_a_small_palette_png() -> None:
    from PIL import Image

    data = viz.png_bytes(viz.plot_tokens(["ab", "c"]))
    image = Image.open(__import__("io").BytesIO(data))
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and image.mode == "P"


def test_chapter01_figures() -> None:
    fig = viz.plot_compression([263, 512, 1024], [1.0, 2.0, 2.5], course=(2048, 3.0))
    assert _untracked(fig) and fig.axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="plot_compression"):
        viz.plot_compression([1, 2], [1.0])
    fig = viz.plot_token_lengths(np.array([1, 1, 2, 3, 20]), np.array([0, 5, 3, 2, 1]), first=1)
    assert _untracked(fig) and len(fig.axes) == 2
    with pytest.raises(ValueError, match="plot_token_lengths"):
        viz.plot_token_lengths(np.ones(3), np.ones(4))


def test_chapter02_figures() -> None:
    import torch

    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    cos = torch.outer(torch.arange(16.0), inv_freq).cos()
    fig = viz.plot_rope(inv_freq, cos, max_seq_len=16)
    assert _untracked(fig) and len(fig.axes) >= 2
    with pytest.raises(ValueError, match="plot_rope"):
        viz.plot_rope(inv_freq, cos[:, :2], 16)
    mask = torch.ones(3, 8, dtype=torch.bool).tril(5)
    fig = viz.plot_causal_masks([mask], ["x"], [5])
    assert _untracked(fig) and [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["5", "6", "7"]
    with pytest.raises(ValueError, match="same length"):
        viz.plot_causal_masks([mask], ["a", "b"], [0])


def test_mla_diagram_reads_the_module_shapes() -> None:
    import torch

    from deepseek_edu.config import get_preset
    from deepseek_edu.mla import MLA

    with torch.device("meta"):
        mla = MLA(get_preset("deepseek-v3"))
    fig = viz.plot_mla_diagram(mla)
    text = " ".join(_texts(fig))
    assert _untracked(fig)
    for label in ("wkv_a (576, 7168)", "kv_norm", "wkv_b (32768, 512)", "wq_a (1536, 7168)", "wo (7168, 16384)",
                  "576 numbers"):
        assert label in text, label
    with pytest.raises(ValueError, match="MLA"):
        viz.plot_mla_diagram(torch.nn.Linear(2, 2))


def test_kv_cache_curves_match_the_analysis_formulas() -> None:
    from deepseek_edu.analysis import kv_cache_bytes_per_token
    from deepseek_edu.config import get_preset

    v3 = get_preset("deepseek-v3")
    curves = viz.kv_cache_curves({"V3": v3}, [1024, 2048])
    assert curves["V3"]["mla"] == [70_272 * 1024, 70_272 * 2048]
    assert curves["V3"]["gqa"][0] == kv_cache_bytes_per_token(v3, "gqa", n_kv_heads=8) * 1024
    assert set(curves["V3"]) == {"mha", "gqa", "mqa", "mla"}
    fig = viz.plot_kv_cache_vs_context(curves, [1024, 2048])
    assert _untracked(fig) and len(fig.axes[0].lines) == 4
    pfig = viz.kv_cache_plotly(curves, [1024, 2048])
    assert len(pfig.data) == 4 and pfig.data[0].y[0] == pytest.approx(curves["V3"]["mha"][0] / 1e9)


def test_show_plotly_stores_json_and_text_only(monkeypatch) -> None:
    import IPython.display

    log = []
    monkeypatch.setattr(IPython.display, "display", _fake_display(log))
    viz.show_plotly(viz.kv_cache_plotly(viz.kv_cache_curves({"V3": __import__("deepseek_edu.config", fromlist=["x"])
                                                                .get_preset("deepseek-v3")}, [1024]), [1024]), alt="kv")
    (data,) = log[0][1]
    assert set(data) == {"application/vnd.plotly.v1+json", "text/plain"} and data["text/plain"].endswith("kv")
    assert len(__import__("json").dumps(data)) < 50_000, "no plotly.js inside the notebook"
    with pytest.raises(ValueError, match="alt"):
        viz.show_plotly(None, alt="")


def test_plot_decode_speed_and_machine_note() -> None:
    res = {"dtype": "float32", "contexts": [512, 1024], "batches": [1, 32],
           "machine": {"load_average_1_5_15_min": [7.0, 7.0, 5.0], "cpu_count": 2},
           "results": [{"kind": k, "batch": 32, "ctx": c, "tokens_per_s": t}
                       for k in ("mha", "mla-naive", "mla-absorbed") for c, t in ((512, 10.0), (1024, 5.0))],
           "absorbed_over_naive": [{"batch": b, "ctx": c, "absorbed_over_naive": 2.0} for b in (1, 32) for c in (512, 1024)]}
    assert viz.machine_note(res) == "load 7.0 on 2 cores"
    assert viz.machine_note({"machine": {"load_average_1_5_15_min": [0.5], "cpu_count": 2}}) == ""
    assert viz.decode_tokens_per_s(res, "mha", 32) == ([512, 1024], [10.0, 5.0])
    fig = viz.plot_decode_speed({"CPU": res}, labels=["CPU", "H200"])
    assert _untracked(fig)
    assert "load 7.0 on 2 cores" in fig.axes[0].get_title(), "a CPU panel measured under load says so"
    assert "no H200 results" in " ".join(_texts(fig))



def test_mla_decode_summary_reads_the_committed_json_and_names_missing_files() -> None:
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    bench, lines = viz.mla_decode_summary(results, {"CPU": "mla_decode_cpu.json", "GPU": "missing.json"})
    assert list(bench) == ["CPU"] and bench["CPU"] == json.loads((results / "mla_decode_cpu.json").read_text())
    assert lines[0].startswith("GPU: no benchmarks/results/missing.json here")
    assert lines[1].startswith("CPU: ") and f"contexts {bench['CPU']['contexts']}" in lines[2]
    assert viz.mla_decode_summary(None, {"CPU": "mla_decode_cpu.json"})[0] == {}


def test_decode_speed_summary_ratios_equal_the_json() -> None:
    res = {"batches": [1, 4], "dtype": "float32", "checks": [{"rel_diff": 1e-6}, {"rel_diff": 3e-6}],
           "absorbed_over_naive": [{"ctx": 64, "batch": 1, "absorbed_over_naive": 0.8},
                                   {"ctx": 128, "batch": 1, "absorbed_over_naive": 1.5},
                                   {"ctx": 128, "batch": 4, "absorbed_over_naive": 2.0}],
           "results": [{"kind": "mha", "batch": 4, "ctx": 128, "tokens_per_s": 10.0},
                       {"kind": "mla-absorbed", "batch": 4, "ctx": 128, "tokens_per_s": 30.0}]}
    s = viz.decode_speed_summary({"M": res})
    assert s.absorbed_over_naive == {("M", 1): (128, 1.5), ("M", 4): (128, 2.0)}
    assert s.absorbed_over_mha == {"M": (4, 128, 3.0)}
    assert "recompute faster at ctx [64]" in s.lines[0] and s.lines[-1].endswith("3.0e-06")


def test_chapter03_cache_figures() -> None:
    fig = viz.plot_cache_bytes({"mha": 100.0, "mla": 20.0}, {"mha": 100.0, "mla": 20.0}, "bytes", "t")
    assert _untracked(fig)
    with pytest.raises(ValueError, match="plot_cache_bytes"):
        viz.plot_cache_bytes({"mha": 1.0}, {"mla": 1.0}, "", "")
    kinds = ("mha", "mla")
    fig = viz.plot_kv_calculator({k: 1.0 for k in kinds}, {k: [0.5, 1.0] for k in kinds}, [1024, 2048], 2048,
                                 {k: k.upper() for k in kinds}, "left", "right")
    assert _untracked(fig) and len(fig.axes[1].lines) == 3  # two kinds and the context marker
    with pytest.raises(ValueError, match="same kinds"):
        viz.plot_kv_calculator({"mha": 1.0}, {}, [1], 1, {}, "", "")


def test_chapter04_routing_figures() -> None:
    import torch

    biased = torch.tensor([0.9, 0.1, 0.5, 0.4, -0.2, 0.3, 0.8, 0.0])
    fig = viz.plot_group_routing(biased, [1.0, 0.9, 0.3, 0.8], kept=[0, 1], chosen=[0, 2], n_groups=4)
    assert _untracked(fig)
    with pytest.raises(ValueError, match="plot_group_routing"):
        viz.plot_group_routing(biased, [1.0, 2.0], [0], [0], n_groups=3)
    assert viz.trailing_mean([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="window"):
        viz.trailing_mean([1.0], window=0)
    fig = viz.plot_balance_runs({"a": [3.0, 1.0], "b": [3.0, 3.0]}, {"a": 5.0, "b": 5.1}, {"a": "red"}, collapse=3.0)
    assert _untracked(fig) and len(fig.axes) == 2
    with pytest.raises(ValueError, match="arms"):
        viz.plot_balance_runs({"a": [1.0]}, {"b": 1.0}, {}, 3.0)
    w = torch.zeros(3, 4).scatter(1, torch.tensor([[0], [1], [1]]), 1.0)
    fig = viz.plot_routing(w, torch.tensor([[1.0, 2.0, 0.0, 0.0]]), ["a", "b", "c"], "t", topk=1)
    assert _untracked(fig)
    with pytest.raises(ValueError, match="plot_routing"):
        viz.plot_routing(w, torch.zeros(1, 5), ["a", "b", "c"], "t", 1)
    pfig = viz.routing_plotly({("x", 0): w, ("y", 1): w * 0.5}, ["a", "b", "c"])
    assert len(pfig.data) == 2 and [t.visible for t in pfig.data] == [True, False]
    assert len(pfig.layout.updatemenus[0].buttons) == 2, "one menu entry per (arm, layer): one state shown at a time"
    with pytest.raises(ValueError, match="routing_plotly"):
        viz.routing_plotly({}, [])


def test_moe_diagram_reads_the_module_shapes() -> None:
    import torch

    from deepseek_edu.config import get_preset
    from deepseek_edu.moe import MoE

    with torch.device("meta"):
        moe = MoE(get_preset("deepseek-v3"))
    text = " ".join(_texts(viz.plot_moe_diagram(moe)))
    for label in ("gate.weight (256, 7168)", "gate.bias (256,)", "shared_experts", "experts[255]", "(2048, 7168)",
                  "top-8", "8 groups, keep 4", "route_scale=2.5"):
        assert label in text, label
    with pytest.raises(ValueError, match="MoE"):
        viz.plot_moe_diagram(torch.nn.Linear(2, 2))


def test_committed_moe_figures() -> None:
    runs = [{"arm": arm, "val_loss": v, "max_violation_series": {"window_end_step": [10, 20],
                                                                 "worst_layer_window_mean": [2.0, m]}}
            for arm, v, m in (("aux-free", 4.0, 0.2), ("aux-free", 4.02, 0.3), ("none", 4.03, 2.0))]
    fig = viz.plot_committed_balance(runs, {"none": "red"})
    assert _untracked(fig) and len(fig.axes[1].patches) == 2, "one bar per arm"
    with pytest.raises(ValueError, match="no runs"):
        viz.plot_committed_balance([], {})
    stage = {"median": 1e-3}
    res = {"settings": {"tokens": 1024}, "layouts": {"8 routed": {"breakdown": {
        "stages_s": dict.fromkeys(viz.MOE_STAGES, stage), "dense_step_s": 2e-3, "moe_step_s": 6e-3}}}}
    fig = viz.plot_moe_stages(res, "GPU")
    assert _untracked(fig) and "whole layer 6.0 ms" in " ".join(_texts(fig))





def _committed(name: str) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name).read_text())


def test_moe_balance_table_and_verdict_state_what_the_json_says() -> None:
    balance, fast = _committed("moe_balance_h200.json"), _committed("moe_balance_h200_gamma0.01.json")
    lines = viz.moe_balance_table(balance, fast, "b.json", "f.json")
    assert len(lines) == 2 + 2 * len(balance["summary"]) + 3
    for k, (arm, m) in enumerate(balance["summary"].items()):
        row = lines[2 + 2 * k].split()
        assert row[0] == arm and float(row[1]) == round(m["val_loss"]["mean"], 4)
        assert float(row[4]) == round(m["max_violation_last_mean"]["mean"], 3)
    assert lines[-2].endswith(f"(γ={fast['settings']['gamma']})")
    assert viz.moe_balance_table(None, None, "b.json") == ["no committed b.json (run benchmarks/moe_balance.py)"]
    verdict = viz.moe_balance_verdict(balance, fast)
    holds = balance["acceptance"]["aux_free_maxvio_below_none"]["holds_on_mean"]
    assert verdict[0].startswith(f"aux-free MaxVio below none's: on the mean {holds}")
    assert len(verdict) == 2 + len(balance["summary"]) + 3
    assert len(viz.moe_balance_verdict(balance)) == 2 + len(balance["summary"]) + 1


def test_moe_layer_summary_one_line_per_layout() -> None:
    from pathlib import Path

    runs, lines = viz.moe_layer_summary(Path(__file__).resolve().parents[1] / "benchmarks" / "results")
    assert runs, "no committed moe_layer_*.json"
    n_rows = sum(1 + len(r["layouts"]) + len(r.get("token_scaling", {})) for r in runs.values())
    assert len(lines) == n_rows
    for label, res in runs.items():
        name, r = next(iter(res["layouts"].items()))
        assert any(line.startswith(f"  {name}") and f"tokens/s {r['ratios']['moe / dense']:.2f}" in line
                   for line in lines), label


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


def test_chapter_05_07_figures():
    import matplotlib.pyplot as plt
    import torch

    from deepseek_edu import viz
    from deepseek_edu.config import get_preset

    fig = viz.plot_mtp_diagram(get_preset("tiny"))
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    for name in ("embed", "eh_proj", "enorm", "hnorm", "block", "(96, 192)", "(2048, 96)"):
        assert name in texts, name
    hist = [{"step": s, "ce": 7.0 - s / 10, "mtp_ce_1": 7.1 - s / 10, "tokens": 100 * s,
             "val_loss": (6.0 - s / 10) if s % 5 == 0 else None} for s in range(1, 11)]
    fig2 = viz.plot_pretraining(hist, torch.ones(10, 3, 8), last=4)
    assert len(fig2.axes) >= 2 and len(fig2.axes[0].lines) == 3  # main, MTP, validation
    fig3 = viz.plot_runs_bits_per_char({"a": hist, "b": hist[:5]}, chars_per_token=2.5)
    assert len(fig3.axes[0].lines) == 2
    for f in (fig, fig2, fig3):
        plt.close(f)



def test_mtp_targets_hatch_the_positions_a_depth_does_not_have() -> None:
    fig = viz.plot_mtp_targets(list("abcde"), depths=2)  # S = 4 positions
    assert _untracked(fig) and len(fig.axes) == 1
    patches = fig.axes[0].patches
    assert len(patches) == 6 * 4  # (input, main target, 2 x (reads, predicts)) x S
    assert sum(p.get_hatch() == "///" for p in patches) == 2 * (1 + 2)  # depth k misses its last k positions
    with pytest.raises(ValueError, match="plot_mtp_targets"):
        viz.plot_mtp_targets(["a"])


def test_mtp_arms_draws_each_head_and_one_bar_per_arm() -> None:
    hist = [{"step": s, "ce": 5.0 - s / 10, "mtp_ce_1": 5.5 - s / 10} for s in range(1, 21)]
    fig = viz.plot_mtp_arms({"mtp": hist, "none": [{k: h[k] for k in ("step", "ce")} for h in hist]},
                            {"mtp": 4.1, "none": 4.2}, {"mtp": "red", "none": "blue"}, val_title="t")
    assert _untracked(fig) and len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 3  # main head of both arms, MTP head of one
    assert [round(b.get_height(), 3) for b in fig.axes[1].patches] == [4.1, 4.2]


def test_speculative_summary_reads_the_committed_json() -> None:
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    bench, lines = viz.speculative_summary(results)
    files = sorted(results.glob("speculative_*.json"))
    assert len(bench) == len(files) and len(lines) == 4 * len(files)
    for f, label in zip(files, bench):
        res = json.loads(f.read_text())
        assert bench[label] == res
        assert viz.speculative_steps(res) == (res["model"].get("train_config") or {}).get("max_steps", "?")
    for i, f in enumerate(files):
        d = json.loads(f.read_text())["decoding"]
        assert lines[4 * i].startswith(f.name) and f"{d['speedup']:.2f}x" in lines[4 * i + 2]
    fig = viz.plot_speculative_bench(bench)
    assert _untracked(fig) and len(fig.axes) == 2
    assert len(fig.axes[1].patches) == len(bench) + 1  # one acceptance bar per machine, the V3 band
    with pytest.raises(ValueError, match="plot_speculative_bench"):
        viz.plot_speculative_bench({})


def test_token_rows_wrap_each_paragraph_under_its_title() -> None:
    fig = viz.plot_token_rows([("a", ["x"] * 3, ["red"] * 3), ("b", ["long piece"] * 40, ["blue"] * 40)])
    assert _untracked(fig)
    ax = fig.axes[0]
    assert len(ax.patches) == 43 and [t.get_text() for t in ax.texts[:1]] == ["a"]
    assert fig.get_size_inches()[1] > 2.0  # forty long pieces wrap onto several lines



def test_parameter_figures_of_chapter_06() -> None:
    from deepseek_edu.analysis import count_params
    from deepseek_edu.config import get_preset

    counts = {name: count_params(get_preset(name)) for name in ("tiny", "deepseek-v3")}
    fig = viz.plot_parameter_parts(counts)
    assert _untracked(fig) and len(fig.axes) == 2
    assert len(fig.axes[0].patches) == sum(len(c.parts) for c in counts.values())  # one bar piece per part
    assert len(fig.axes[1].collections[0].get_offsets()) == 2  # one point per model
    v3 = get_preset("deepseek-v3")
    by_e = {e: count_params(v3.replace(n_routed_experts=e, n_expert_groups=1, n_limited_groups=1))
            for e in (8, 64, 256)}
    fig2 = viz.plot_expert_scaling(by_e, 64, 8, "deepseek-v3")
    assert _untracked(fig2) and len(fig2.axes[0].lines) == 3  # total, activated, the chosen E
    assert [round(b.get_height(), 6) for b in fig2.axes[1].patches] == [round(by_e[64].total / 1e9, 6),
                                                                        round(by_e[64].activated / 1e9, 6)]
    with pytest.raises(ValueError, match="plot_expert_scaling"):
        viz.plot_expert_scaling(by_e, 32, 8)


def test_train_throughput_summary_rows_equal_the_json(tmp_path) -> None:
    speed = _committed("train_throughput_small_h200.json")
    lines = viz.train_throughput_summary(Path(__file__).resolve().parents[1] / "benchmarks" / "results")
    rows = [key for key in speed["small_over_dense"] if key in speed["models"]["small"]["training"]]
    assert len(lines) == 1 + 2 + 1 + len(rows) + 1  # machine, two models, header, variants, the profiles
    for key, line in zip(rows, lines[4:]):
        assert line.split()[0] == key and line.endswith(f"{speed['small_over_dense'][key]:.2f}")
    assert viz.train_throughput_summary(tmp_path) == [
        "no committed train_throughput_small_h200.json (run benchmarks/train_throughput.py --device cuda)"]


def test_text_explorer_prints_the_static_sample_and_redraws(capsys):
    import ipywidgets as widgets

    from deepseek_edu import viz

    slider = widgets.IntSlider(value=2, min=0, max=5)
    box = viz.text_explorer(lambda n: "x" * n, {"n": slider})
    assert capsys.readouterr().out == "xx\n"
    assert len(box.children) == 2 and box.children[0].children == (slider,)
    slider.value = 3  # redraws (into the output widget when a kernel displays it)
    assert "xxx" in capsys.readouterr().out


def _fake_bench(seeds=(0, 1, 2)) -> dict:
    hist = [{"step": s, "kl": 0.01 * s, "length": 20.0, "reward": 0.5, "accuracy": 0.5, "clip_frac": 0.0}
            for s in range(1, 21)]
    runs = {v: {str(s): {"evals": [{"step": 0, "accuracy": 0.5}, {"step": 20, "accuracy": 0.6 + 0.01 * s}],
                         "history": hist, "accuracy_final": 0.6 + 0.01 * s, "gain_final": 0.1 + 0.01 * s,
                         "gain_se": 3.0 + s} for s in seeds} for v in ("grpo", "dapo")}
    sft = {str(s): {"eval": {"accuracy": 0.5}} for s in seeds}
    return {"runs": runs, "sft": sft, "acceptance": {"target_gain": 0.15}}


def test_grpo_variant_rows_summarise_over_seeds() -> None:
    rows = viz.grpo_variant_rows(_fake_bench())
    assert [r["variant"] for r in rows] == ["grpo", "dapo"]
    r = rows[0]
    assert r["seeds"] == 3 and r["gain_min"] == pytest.approx(0.1) and r["gain_max"] == pytest.approx(0.12)
    assert r["gain_mean"] == pytest.approx(0.11) and r["se_min"] == 3.0 and r["final_mean"] == pytest.approx(0.61)
    assert r["kl_end"] == pytest.approx(np.mean([0.01 * s for s in range(11, 21)]))


def test_grpo_figures_are_closed_figures() -> None:
    bench = _fake_bench()
    fig = viz.plot_grpo_variants(bench)
    assert _untracked(fig)
    _draw_strict(fig)
    run = bench["runs"]["grpo"]["0"]
    fig = viz.plot_grpo_run(run["history"], run["evals"], n_eval=500, title="t")
    assert _untracked(fig)
    _draw_strict(fig)
    with pytest.raises(ValueError, match="empty"):
        viz.plot_grpo_run([], [])


def test_grpo_loop_diagram_names_the_package_functions() -> None:
    from deepseek_edu import grpo

    labels = " ".join(label for _, label in viz.grpo_loop_entries())
    for name in ("sample_responses", "score_responses", "group_advantages", "policy_loss", "response_logprobs",
                 "grpo_train"):
        assert f"`{name}" in labels and hasattr(grpo, name), name
    fig = viz.plot_grpo_loop()
    assert _untracked(fig)
    _draw_strict(fig)
    assert len(fig.axes[0].patches) == len(viz.grpo_loop_entries())


def test_reward_breakdown_draws_any_text() -> None:
    from deepseek_edu.tasks import Problem

    prob = Problem("arithmetic", "47+38=", "85")
    for text in ("<think>7+8=15\n4+3+1=8</think>\n<answer>85</answer>", "<think>🙂</think><answer>八五</answer>", ""):
        fig = viz.plot_reward_breakdown(text, prob)
        assert _untracked(fig)
        _draw_strict(fig)


def test_show_needs_alt_text() -> None:
    fig, _ = viz.new_figure()
    with pytest.raises(ValueError, match="alt"):
        viz.show(fig, alt=" ")


# --- chapter 08: the committed FP8 training run, read back ---


def _fp8_training_json() -> dict:
    import json
    return json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fp8_training_cpu.json").read_text())


def test_fp8_training_summary_states_each_arm_of_the_committed_run():
    t = _fp8_training_json()
    lines = viz.fp8_training_summary(t)
    arms = viz.fp8_training_arms(t)
    assert set(arms) == {"fp8", "fp8-tensorwise", "fp32-perturbed"}
    assert len(lines) == 1 + len(arms) + 1
    for line, arm in zip(lines[1:], arms):
        assert arms[arm] in line
        first = t["final_val_rel_error"][arm]["per_seed"][0]
        assert f"{100 * first:.2f}%" in line.split("validation")[1]
    curves = viz.fp8_training_curves(t)
    assert list(curves) == list(arms.values())
    steps = t["config"]["steps"]
    assert all(len(c) == steps for c in curves.values())
    seeds = list(t["rel_loss_error"]["fp8"])
    mean_last = sum(t["rel_loss_error"]["fp8"][s][-1] for s in seeds) / len(seeds)
    assert curves[arms["fp8"]][-1] == pytest.approx(mean_last)
    fig = viz.plot_fp8_training(curves, next(iter(t["seed_spread_fp32"].values())))
    assert len(fig.axes[0].lines) == len(curves) + 2  # the arms, the seed spread, V3's bound
    plt.close(fig)


def test_fp8_paper_vs_ours_reads_the_committed_numbers():
    import json
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    acc, gran = (json.loads((root / f"fp8_{n}_cpu.json").read_text()) for n in ("accumulation", "granularity"))
    t = _fp8_training_json()
    table = viz.fp8_paper_vs_ours(acc, t, gran)
    assert f"{100 * t['final_rel_loss_error']['fp8']['max']:.3f}% training loss" in table
    assert f"{100 * t['final_val_rel_error']['fp32-perturbed']['max']:.3f}%" in table
    assert table.count("\n") == 1 + 5 and "not reported" not in table  # header rule + 5 rows, each with V3's figure
    ge = t["gradient_error"]
    assert f"{100 * ge['mean']['fp8-tensorwise']:.2f}% vs {100 * ge['mean']['fp8']:.2f}%" in table


def test_fp8_gradient_error_of_the_committed_run_is_summarised_and_drawn():
    t = _fp8_training_json()
    ge = t["gradient_error"]
    # the summary in the JSON is the one gradient_error_summary makes of the JSON's own probes
    from deepseek_edu.fp8_experiments import gradient_error_summary
    again = gradient_error_summary({int(s): ps for s, ps in t["probes"].items()})
    assert again["paired"]["mean"] == pytest.approx(ge["paired"]["mean"])
    assert again["paired"]["seed_se"] == pytest.approx(ge["paired"]["seed_se"])
    assert again["mean"] == pytest.approx(ge["mean"])
    lines = viz.fp8_gradient_error_summary(t)
    assert f"{100 * ge['mean']['fp8']:.2f}%" in lines[1] and f"{100 * ge['paired']['seed_se']:.2f}" in lines[2]
    assert f"{ge['paired']['n_probes']} probes" in lines[0] and f"{ge['paired']['n_pairs']} gradients" in lines[0]
    seed0 = {**t, "gradient_error": gradient_error_summary({0: t["probes"]["0"]})}  # one seed: no standard error
    assert "one seed, so no standard error" in viz.fp8_gradient_error_summary(seed0)[2]
    with pytest.raises(ValueError, match="--probe-every"):  # a run without probes
        viz.fp8_gradient_error_summary({**t, "gradient_error": None})
    fig = viz.plot_fp8_gradient_error(ge["by_step"])
    (bw, tw) = fig.axes[0].lines
    assert list(bw.get_xdata()) == sorted(int(s) for s in ge["by_step"])
    assert tw.get_ydata()[-1] == pytest.approx(100 * ge["by_step"][max(ge["by_step"], key=int)]["fp8-tensorwise"])
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2  # the outlier ratios below
    plt.close(fig)
    plain = viz.plot_fp8_gradient_error({0: {"fp8": 0.1, "fp8-tensorwise": 0.2}})  # without outlier ratios: one panel
    assert len(plain.axes) == 1
    plt.close(plain)
