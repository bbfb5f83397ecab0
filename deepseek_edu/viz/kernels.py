"""Chapter 09 figures: the roofline of the project's H200 (ceilings measured in committed JSON, else
from the datasheet) and the quantisation layouts of activations and weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.patches as mpatches
import numpy as np
from matplotlib.figure import Figure

from .core import TOKEN_COLORS, _figure_of, new_figure

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
