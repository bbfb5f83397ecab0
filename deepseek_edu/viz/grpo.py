"""Chapter 10 figures: the GRPO loop, one run's rewards and accuracy, the GRPO / Dr. GRPO / DAPO
variants from committed JSON, and the reward of one response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches as mpatches
import matplotlib.pyplot as plt  # importing pyplot in Jupyter registers the inline PNG display of figures
import numpy as np
from matplotlib.figure import Figure

from ..evaluation import trailing_mean
from .core import FIG_DPI, new_figure
from .plots import _printable

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
    a1.plot(steps, trailing_mean([h["reward"] for h in history], 5), color="#4c72b0", label="reward (sampled batch)")
    a1.plot(steps, trailing_mean([h["accuracy"] for h in history], 5), color="#55a868", label="accuracy (sampled batch)")
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
            mean = np.mean([trailing_mean([h[key] for h in hh], 10) for hh in hist], axis=0)
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
    from ..grpo import accuracy_reward, format_reward, parse_r1_layout

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
