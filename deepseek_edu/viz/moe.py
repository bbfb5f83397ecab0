"""Chapter 04 figures: DeepSeekMoE drawn from a module, group-limited routing, expert loads, the
balance runs (live and committed) and the time per stage of one MoE layer; the committed balance
and layer benchmarks (`benchmarks/results/moe_*.json`) as the lines the notebook prints.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..evaluation import trailing_mean
from .core import _arrow, _box, _shape, _to_numpy, committed_results, new_figure
from .plots import plot_heatmap

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


def _balance_row(arm: str, m: Mapping[str, Any], suffix: str = "") -> list[str]:
    v, mv, mf = m["val_loss"], m["max_violation_last_mean"], m["max_violation_final"]
    return [f"{arm:9s} {v['mean']:>14.4f} ± {v['std']:.4f} {mv['mean']:>18.3f} ± {mv['std']:.3f} "
            f"{mf['mean']:>11.3f} ± {mf['std']:.3f}{suffix}",
            f"{'':9s}   per seed: val {[round(t, 4) for t in v['per_seed']]}, "
            f"MaxVio {[round(t, 3) for t in mv['per_seed']]}"]


def moe_balance_table(balance: Mapping[str, Any] | None, fast: Mapping[str, Any] | None = None,
                      balance_name: str = "moe_balance_h200.json",
                      fast_name: str = "moe_balance_h200_gamma0.01.json") -> list[str]:
    """The committed balance runs (`benchmarks/moe_balance.py`) as a table: one row pair per arm.

    Args:
        balance: parsed JSON of the three arms (aux-loss, aux-free, none) over seeds, or None if absent.
        fast: parsed JSON of the aux-free arm alone with a faster bias update (its own gamma), or None.
        balance_name, fast_name: the files' names, printed.
    Returns:
        Lines: the settings, then per arm the validation loss (nats/token), MaxVio over the last steps
        and at the final step (mean ± std over seeds), and the values per seed.
    """
    if balance is None:
        lines = [f"no committed {balance_name} (run benchmarks/moe_balance.py)"]
    else:
        st = balance["settings"]
        gpu = balance["machine"].get("gpu", {}).get("name", "CPU")
        lines = [f"{balance_name}: {gpu}, {st['steps']} steps x {st['batch_size']}x{st['seq_len']} tokens, "
                 f"seeds {st['seeds']}, gamma {st['gamma']}, alpha1 {st['alpha1']}",
                 f"{'arm':9s} {'val loss (nats/token)':>22s} "
                 f"{'MaxVio, last ' + str(st['last_steps_for_means']) + ' steps':>26s} {'MaxVio, final step':>19s}"]
        for arm, m in balance["summary"].items():
            lines += _balance_row(arm, m)
    if fast is not None:
        m = fast["summary"]["aux-free"]
        lines.append(f"{fast_name}: the aux-free arm again with gamma {fast['settings']['gamma']}, seeds {m['seeds']}")
        lines += _balance_row("aux-free", m, f"   (γ={fast['settings']['gamma']})")
    return lines


def moe_balance_verdict(balance: Mapping[str, Any], fast: Mapping[str, Any] | None = None) -> list[str]:
    """What the committed balance runs show: the acceptance checks, the busiest expert, seed noise.

    Args:
        balance: parsed `moe_balance_h200.json` (its "acceptance", "summary", "runs", "settings").
        fast: parsed JSON of the aux-free arm with a faster bias update, or None.
    Returns:
        Lines: whether aux-free's MaxVio is below none's and its validation loss no worse than
        aux-loss's (on the mean, for every seed), the busiest expert per batch and over the last steps
        per arm, and whether the differences in validation loss exceed the spread over seeds.
    """
    acc = balance["acceptance"]
    a, v = acc["aux_free_maxvio_below_none"], acc["aux_free_val_loss_no_worse_than_aux_loss"]
    lines = [f"aux-free MaxVio below none's: on the mean {a['holds_on_mean']}, for every seed {a['holds_every_seed']} "
             f"(paired differences {[round(d, 3) for d in a['paired_differences']]})",
             f"aux-free validation loss no worse than aux-loss's: on the mean {v['holds_on_mean']} "
             f"({v['mean_aux_free']:.4f} vs {v['mean_aux_loss']:.4f}), for every seed {v['holds_every_seed']} "
             f"(paired differences {[round(d, 4) for d in v['paired_differences']]})"]
    summary = balance["summary"]
    last_n = balance["settings"]["last_steps_for_means"]
    for arm in summary:
        mv = summary[arm]["max_violation_last_mean"]["mean"]
        summed = statistics.fmean(r["max_violation_of_summed_last_load"] for r in balance["runs"] if r["arm"] == arm)
        lines.append(f"{arm:9s}: busiest expert per batch at {1 + mv:.2f}x the mean load; the load of the last "
                     f"{last_n} steps together at {1 + summed:.3f}x")
    sd = summary["aux-free"]["val_loss"]["std"]
    diff = v["mean_aux_free"] - v["mean_aux_loss"]
    lines.append(f"the mean difference {diff:+.4f} nats/token is smaller than the spread over seeds ({sd:.4f}): "
                 f"no worse, but not a measured improvement" if abs(diff) < sd else
                 f"the mean difference {diff:+.4f} nats/token exceeds the spread over seeds ({sd:.4f})")
    if fast is not None:
        fv = fast["summary"]["aux-free"]["val_loss"]["mean"]
        lines.append(f"aux-free with gamma {fast['settings']['gamma']}: validation {fv:.4f}, "
                     f"{fv - v['mean_aux_loss']:+.4f} against the aux-loss arm, {fv - v['mean_aux_free']:+.4f} "
                     f"against gamma {balance['settings']['gamma']}")
        seed_sd = (fast["summary"]["aux-free"]["val_loss"]["std"], summary["aux-free"]["val_loss"]["std"],
                   summary["aux-loss"]["val_loss"]["std"])
        within = abs(fv - v["mean_aux_free"]) < min(seed_sd) and abs(fv - v["mean_aux_loss"]) < min(seed_sd)
        lines.append(f"  spread over seeds of these arms {min(seed_sd):.4f} to {max(seed_sd):.4f}: "
                     + ("both differences are within seed noise" if within else "a difference exceeds the seed spread"))
    return lines


def moe_layer_summary(results_dir: Any) -> tuple[dict[str, Any], list[str]]:
    """The committed MoE layer benchmarks (`benchmarks/moe_layer.py`, `moe_layer_*.json` in name order).

    Returns:
        (layer_runs, lines): machine label -> parsed JSON, and per file the settings and, per layout
        (and per token count of the scaling runs), MoE / dense tokens/s with the per-expert loop and the
        first dispatch for comparison.
    """
    layer_runs: dict[str, Any] = {}
    lines: list[str] = []
    for label, (fname, res) in committed_results(results_dir, "moe_layer_*.json").items():
        layer_runs[label] = res
        st = res["settings"]
        lines.append(f"{fname}: {label}, {st['dtype']}, D={st['dim']}, M={st['width_M']}, {st['tokens']:,} tokens "
                     f"per call")
        for name, r in [*res["layouts"].items(), *res.get("token_scaling", {}).items()]:
            ra = r["ratios"]
            loop = f"per-expert loop {ra['moe-loop / dense']:.2f}, " if "moe-loop / dense" in ra else ""
            lines.append(f"  {name:44s} MoE/dense tokens/s {ra['moe / dense']:.2f}   ({loop}first dispatch "
                         f"{ra['moe-v0 / dense']:.2f})")
    return layer_runs, lines
