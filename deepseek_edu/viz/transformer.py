"""Chapter 02 figures: RoPE's wavelengths and rotations, and causal masks with and without a cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .core import _to_numpy, new_figure
from .plots import plot_heatmap


def plot_rope(inv_freq: Any, cos: Any, max_seq_len: int, n_positions: int = 128) -> Figure:
    """RoPE at a glance: wavelength 2π/θ_i of each pair (left), cos(m·θ_i) over positions (right).

    Args:
        inv_freq: (R/2,) radians per token of each pair; cos: (n >= n_positions, R/2) cos(m·θ_i).
        max_seq_len: drawn as a dashed line (longer wavelengths never complete a turn in context).
    Raises:
        ValueError: if cos's second dimension differs from inv_freq's length.
    """
    inv_freq, cos = _to_numpy(inv_freq), _to_numpy(cos)
    if cos.ndim != 2 or cos.shape[1] != inv_freq.shape[0]:
        raise ValueError(f"plot_rope: cos {cos.shape} does not match inv_freq {inv_freq.shape}")
    fig, (ax1, ax2) = new_figure(9.0, 3.0, ncols=2)
    ax1.semilogy(2 * np.pi / inv_freq, "o-", ms=3)
    ax1.axhline(max_seq_len, ls="--", c="gray", lw=1, label=f"max_seq_len = {max_seq_len}")
    ax1.set(xlabel="pair i", ylabel="wavelength (tokens)", title=r"RoPE wavelengths $2\pi/\theta_i$")
    ax1.legend(fontsize=8, frameon=False)
    ax1.grid(alpha=0.3)
    plot_heatmap(cos[:n_positions].T, title=r"$\cos(m\,\theta_i)$", xlabel="position m", ylabel="pair i",
                 cmap="RdBu", ax=ax2)
    return fig


def plot_causal_masks(masks: Sequence[Any], titles: Sequence[str], first_positions: Sequence[int]) -> Figure:
    """Boolean causal masks side by side (blue: the query may attend to that key).

    Args:
        masks: (S, T) boolean tensors; titles: one per mask; first_positions: position of each
            mask's first query row (0 for a prefill, T - S after T - S cached positions).
    Raises:
        ValueError: if the three sequences differ in length.
    """
    if not (len(masks) == len(titles) == len(first_positions)) or not masks:
        raise ValueError("plot_causal_masks: masks, titles and first_positions must have the same length")
    fig, axes = new_figure(3.5 * len(masks), 3.0, ncols=len(masks))
    for ax, mask, title, start in zip(np.atleast_1d(axes), masks, titles, first_positions, strict=True):
        m = _to_numpy(mask)
        plot_heatmap(m, y_labels=[str(start + i) for i in range(m.shape[0])], title=title,
                     xlabel="key position t", ylabel="query position", cmap="Blues", vmin=0, vmax=1.4,
                     colorbar=False, ax=ax)
    return fig
