"""Chapter 03 figures: Multi-head Latent Attention drawn from a module, KV-cache bytes, decode speed.

`kv_cache_curves` turns configs into cache sizes against context (through
`analysis.kv_cache_bytes_per_token`); `decode_tokens_per_s` and `machine_note` read the committed
`benchmarks/results/mla_decode_*.json` that `plot_decode_speed` draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .core import _arrow, _box, _shape, new_figure

KV_KIND_COLORS = {"mha": "#4c72b0", "gqa": "#55a868", "mqa": "#c44e52", "mla": "#8172b2"}


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
    from ..analysis import kv_cache_bytes_per_token

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


def mla_decode_summary(results_dir: Any, result_files: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The committed MLA decoding benchmarks (`benchmarks/mla_decode.py`) and what each measured.

    Args:
        results_dir: folder of the JSON files, or None where the repository's results are absent (Colab).
        result_files: machine label -> file name, e.g. {"CPU": "mla_decode_cpu.json"}.
    Returns:
        (bench, lines): label -> parsed JSON of the files found, and the printed report: the machine,
        the shapes, the cached numbers per token, a note when the machine was busy, the skipped runs,
        and one line per missing file.
    """
    bench: dict[str, Any] = {}
    lines: list[str] = []
    for label, filename in result_files.items():
        path = Path(results_dir) / filename if results_dir is not None else None
        if path is None or not path.is_file():
            lines.append(f"{label}: no benchmarks/results/{filename} here (on Colab, clone the repository to get it); "
                         f"the figure below skips this machine")
            continue
        bench[label] = json.loads(path.read_text())
    for label, res in bench.items():
        m, mla_shape = res["machine"], res["shapes"]["mla-absorbed"]
        gpu = m.get("gpu") or {}
        where = gpu.get("name") or f"{m.get('cpu_model', 'CPU')}, {m.get('torch_threads')} threads"
        cache_sizes = ", ".join(f"{kind} {s['cache_elements_per_token']}" for kind, s in res["shapes"].items())
        lines += [
            f"{label}: {where}, torch {m.get('torch')}, {res['dtype']}, run {res['created_utc'][:10]}",
            f"  MLA dim={mla_shape['dim']} H={mla_shape['n_heads']} C={mla_shape['kv_lora_rank']} "
            f"R={mla_shape['qk_rope_head_dim']}; MHA/GQA heads of {res['shapes']['mha']['head_dim']}, "
            f"GQA {res['shapes']['gqa']['n_kv_heads']} KV heads; contexts {res['contexts']}, batches {res['batches']}",
            f"  cached numbers per token (one layer): {cache_sizes}",
        ]
        load = m.get("load_average_1_5_15_min")
        if load and m.get("cpu_count") and load[0] > m["cpu_count"]:
            lines.append(f"  note: load average {load[0]:.1f} on {m['cpu_count']} cores at the start: "
                         f"other work shared the CPU, so these figures are noisy")
        lines += [f"  {skip['kind']} ctx={skip['ctx']} batch={skip['batch']}: {skip['note']}"
                  for skip in res.get("skips", [])]
    return bench, lines


@dataclass
class DecodeSpeedSummary:
    """What `decode_speed_summary` read from the MLA decoding benchmarks.

    Attributes:
        lines: the printed report.
        absorbed_over_naive: (label, batch) -> (longest context, absorbed / recompute tokens/s there).
        absorbed_over_mha: label -> (batch, context, MLA-absorbed / MHA tokens/s) at the largest batch
            and the longest context both ran.
    """

    lines: list[str] = field(default_factory=list)
    absorbed_over_naive: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)
    absorbed_over_mha: dict[str, tuple[int, int, float]] = field(default_factory=dict)


def decode_speed_summary(bench: Mapping[str, Mapping[str, Any]]) -> DecodeSpeedSummary:
    """Absorbed against recompute (per batch), absorbed against MHA, and the two paths' agreement.

    Args:
        bench: machine label -> parsed `mla_decode_*.json` (as `mla_decode_summary` returns it).
    Returns:
        A `DecodeSpeedSummary`: the ratios of tokens/s and the lines that report them.
    """
    out = DecodeSpeedSummary()
    for label, res in bench.items():
        for b in res["batches"]:
            pts = sorted((r["ctx"], r["absorbed_over_naive"]) for r in res["absorbed_over_naive"] if r["batch"] == b)
            if not pts:
                continue
            ratios = [v for _, v in pts]
            longest_ctx, longest = pts[-1]
            below = [c for c, v in pts if v < 1]
            out.lines.append(f"{label}, batch {b}: absorbed/recompute {min(ratios):.2f}x to {max(ratios):.2f}x over "
                             f"contexts {pts[0][0]}-{longest_ctx}; {longest:.2f}x at the longest"
                             + (f"; recompute faster at ctx {below}" if below else "; absorbed faster at every context"))
            out.absorbed_over_naive[(label, b)] = (longest_ctx, longest)
            graphs = [(r["ctx"], r["cuda_graph_absorbed_over_naive"]) for r in res["absorbed_over_naive"]
                      if r["batch"] == b and "cuda_graph_absorbed_over_naive" in r]
            if graphs:
                out.lines.append(f"    with CUDA graphs (launch overhead removed): {max(graphs)[1]:.2f}x at ctx "
                                 f"{max(graphs)[0]}")
        b = max(res["batches"])
        mha = dict(zip(*decode_tokens_per_s(res, "mha", b)))
        absorbed = dict(zip(*decode_tokens_per_s(res, "mla-absorbed", b)))
        common = sorted(set(mha) & set(absorbed))
        if common:
            c = common[-1]
            out.lines.append(f"{label}, batch {b}, ctx {c}: MLA-absorbed / MHA (cached K,V) = "
                             f"{absorbed[c] / mha[c]:.2f}x tokens/s")
            out.absorbed_over_mha[label] = (b, c, absorbed[c] / mha[c])
        worst = max(c["rel_diff"] for c in res["checks"])
        out.lines.append(f"{label}: largest relative difference between the two paths' outputs in {res['dtype']}: "
                         f"{worst:.1e}")
    return out
