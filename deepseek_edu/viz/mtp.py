"""Chapter 05 figures and tables: Multi-Token Prediction and speculative decoding with its draft.

`plot_mtp_diagram` draws the MTP module beside the main model from a config; `plot_mtp_targets`
what each head predicts at every position; `plot_mtp_arms` a run with and without MTP;
`speculative_summary` reads the committed `benchmarks/results/speculative_*.json` and
`plot_speculative_bench` draws them against DeepSeek-V3's reported numbers (§5.4.3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches as mpatches
from matplotlib.figure import Figure

from ..evaluation import trailing_mean
from .core import committed_results, new_figure

V3_SPEEDUP = 1.8  # DeepSeek-V3 §5.4.3: 1.8x tokens per second with the MTP draft
V3_ACCEPTANCE = (0.85, 0.90)  # DeepSeek-V3 §5.4.3: 85-90% of the second tokens accepted


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


def plot_mtp_targets(labels: Sequence[str], depths: int = 2) -> Figure:
    """What each head reads and predicts at every position of a window of S + 1 tokens.

    Row pairs: the input and the main head's target (t_i+1), then for each depth k what it reads
    (t_i+k) and predicts (t_i+k+1). Depth k has positions 0..S-1-k only: the rest is hatched, because
    targets never wrap around the window.

    Args:
        labels: (S + 1,) the window's tokens as text (S >= 1).
        depths: MTP depths drawn.
    Raises:
        ValueError: if fewer than two labels are given.
    """
    if len(labels) < 2:
        raise ValueError(f"plot_mtp_targets: {len(labels)} labels, need at least 2 (S + 1 tokens)")
    S = len(labels) - 1
    rows = [("input t_i", 0, 0, "#dfe7fd"), ("main predicts t_i+1", 1, 0, "#c9e4c5")]
    for k in range(1, depths + 1):  # (label, which token: t_{i+shift}, depth, colour)
        rows += [(f"depth {k} reads t_i+{k}", k, k, "#fff1c1"), (f"depth {k} predicts t_i+{k + 1}", k + 1, k, "#c9e4c5")]
    fig, ax = new_figure(10.0, 0.45 * len(rows) + 0.6)
    for r, (name, shift, depth, color) in enumerate(rows):
        ax.text(-0.6, r, name, ha="right", va="center", fontsize=8)
        for i in range(S):
            if i <= S - 1 - depth:  # depth k has positions 0..S-1-k
                ax.add_patch(mpatches.Rectangle((i - 0.45, r - 0.38), 0.9, 0.76, fc=color, ec="#888888", lw=0.5))
                ax.text(i, r, labels[i + shift], ha="center", va="center", fontsize=7)
            else:
                ax.add_patch(mpatches.Rectangle((i - 0.45, r - 0.38), 0.9, 0.76, fc="none", ec="#cccccc",
                                                hatch="///", lw=0.5))
    ax.set_xlim(-0.6, S - 0.4)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(S), [f"i={i}" for i in range(S)], fontsize=7)
    ax.set_yticks([])
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title("what each head reads and predicts at position i (hatched: nothing — never wrap around)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_mtp_arms(histories: Mapping[str, Sequence[Mapping[str, float]]], val_loss: Mapping[str, float],
                  colors: Mapping[str, str], val_title: str = "", window: int = 10) -> Figure:
    """Training with and without MTP: smoothed training losses (left), the main head's validation loss (right).

    Args:
        histories: arm -> `Trainer.history` records with "step", "ce" (main head) and, with MTP, "mtp_ce_1"
            (nats/token).
        val_loss: arm -> validation loss of the main head (nats/token); colors: arm -> colour.
        val_title: title of the right panel (say how long the arms trained).
        window: steps of the trailing mean of the training losses.
    """
    fig, (ax1, ax2) = new_figure(10.0, 3.2, ncols=2)
    for arm, hist in histories.items():
        steps = [h["step"] for h in hist]
        ax1.plot(steps, trailing_mean([h["ce"] for h in hist], window), color=colors[arm], label=f"{arm}: main head")
        if "mtp_ce_1" in hist[0]:
            ax1.plot(steps, trailing_mean([h["mtp_ce_1"] for h in hist], window), color=colors[arm], ls="--",
                     label=f"{arm}: MTP depth 1 (predicts t_i+2)")
    ax1.set(xlabel="step", ylabel=f"train cross-entropy (nats/token, {window}-step mean)",
            title="main head vs MTP head")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    names = list(val_loss)
    vals = [val_loss[a] for a in names]
    ax2.bar(range(len(names)), vals, color=[colors[a] for a in names])
    for i, v in enumerate(vals):
        ax2.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(names)), names, fontsize=8)
    ax2.set_ylim(min(vals) - 0.3, max(vals) + 0.2)
    ax2.set(ylabel="validation loss, main head (nats/token)", title=val_title)
    fig.tight_layout()
    return fig


def speculative_steps(res: Mapping[str, Any]) -> Any:
    """Optimizer steps of a speculative benchmark's model (trained there or loaded), or "?"."""
    return (res["model"].get("train_config") or {}).get("max_steps", "?")


def speculative_summary(results_dir: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The committed speculative-decoding benchmarks (`benchmarks/speculative.py`) and four lines on each.

    Args:
        results_dir: folder of `speculative_*.json` (read in name order).
    Returns:
        (bench, lines): machine label ("NVIDIA H200", "CPU (2 thread)") -> parsed JSON, and the printed
        report: model, acceptance, tokens/s and the cost of a draft and of a verification.
    """
    bench: dict[str, dict[str, Any]] = {}
    lines: list[str] = []
    for label, (fname, res) in committed_results(results_dir, "speculative_*.json").items():
        bench[label] = res
        d, b, m, tf = res["decoding"], res["breakdown"], res["model"], res["teacher_forced"]
        lines += [
            f"{fname}: {label}, {res['settings']['decode_dtype']}; model: {m.get('val_loss') or float('nan'):.3f} "
            f"val nats/token after {speculative_steps(res)} steps ({m['source']})",
            f"  acceptance {d['acceptance_rate']:.3f} ({d['tokens_per_step']:.2f} tokens per main forward); "
            f"teacher-forced draft agreement {tf['draft_agreement']:.3f}; same tokens as greedy: {d['all_same_tokens']}",
            f"  tokens/s plain {d['plain_tokens_per_s']:.1f}, speculative {d['speculative_tokens_per_s']:.1f}: "
            f"{d['speedup']:.2f}x (predicted from the step pieces {b['predicted_speedup']:.2f}x)",
            f"  one draft costs {b['draft_over_plain_step']:.2f} plain steps, one 2-position verification "
            f"{b['verification_over_plain_step']:.2f}",
        ]
    return bench, lines


def plot_speculative_bench(bench: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Committed speculative decoding per machine: speed-up over plain greedy (left), acceptance (right).

    Args:
        bench: machine label -> parsed `speculative_*.json` (as `speculative_summary` returns it).
    Raises:
        ValueError: if `bench` is empty.
    """
    if not bench:
        raise ValueError("plot_speculative_bench: no benchmark results")
    fig, (ax1, ax2) = new_figure(10.0, 3.0, ncols=2)
    labels = list(bench)
    for i, lab in enumerate(labels):
        d = bench[lab]["decoding"]
        ax1.bar(i - 0.2, 1.0, width=0.4, color="#4c72b0", label="plain greedy" if i == 0 else None)
        ax1.bar(i + 0.2, d["speedup"], width=0.4, color="#c44e52", label="speculative (MTP draft)" if i == 0 else None)
        ax1.text(i + 0.2, d["speedup"], f"{d['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax2.bar(i, d["acceptance_rate"], color="#55a868")
        ax2.text(i, d["acceptance_rate"], f"{d['acceptance_rate']:.2f}", ha="center", va="bottom", fontsize=8)
    ax1.axhline(V3_SPEEDUP, color="gray", ls="--", lw=1)
    ax1.text(-0.45, V3_SPEEDUP + 0.03, f"V3: {V3_SPEEDUP}x", fontsize=7, color="gray")
    ax1.set_xticks(range(len(labels)), labels, fontsize=8)
    ax1.set(ylabel="tokens/s relative to plain", title="decoding speed (committed runs)", ylim=(0, 2.1))
    ax1.legend(fontsize=7, loc="upper right")
    ax2.axhspan(*V3_ACCEPTANCE, color="gray", alpha=0.25)
    ax2.text(-0.45, V3_ACCEPTANCE[1] + 0.01, f"V3: {100 * V3_ACCEPTANCE[0]:.0f}-{V3_ACCEPTANCE[1]:.0%}", fontsize=7,
             color="gray")
    ax2.set_xticks(range(len(labels)), labels, fontsize=8)
    ax2.set(ylabel="accepted / drafted", title="acceptance of the MTP draft", ylim=(0, 1.05))
    fig.tight_layout()
    return fig
