"""Chapter 11 figures: pipeline schedules as timelines (1F1B, ZB1P, DualPipe) and tokens per GPU under
expert parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches as mpatches
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .core import _figure_of, _to_numpy

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
