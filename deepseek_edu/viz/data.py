"""Chapter 01 figures: the tokenizer's compression against vocabulary size, and token lengths."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .core import _to_numpy, new_figure
from .plots import plot_histogram


def plot_compression(sizes: Sequence[int], chars_per_token: Sequence[float],
                     course: tuple[int, float] | None = None) -> Figure:
    """Characters per token against vocabulary size (log2 axis), one point per trained tokenizer.

    Args:
        sizes: vocabulary sizes; chars_per_token: the same length, measured on one text.
        course: optional (vocab_size, chars_per_token) of the course tokenizer, drawn as a star.
    Raises:
        ValueError: if the two sequences differ in length or are empty.
    """
    if len(sizes) != len(chars_per_token) or not sizes:
        raise ValueError(f"plot_compression: {len(sizes)} sizes but {len(chars_per_token)} values")
    fig, ax = new_figure(5.0, 3.0)
    ax.semilogx(list(sizes), list(chars_per_token), "o-", base=2, label="trained on a 1M-character slice")
    if course is not None:
        ax.plot([course[0]], [course[1]], "*", ms=11, color="#dd8452", label="course tokenizer (all plays)")
        ax.legend(fontsize=8, frameon=False)
    ax.set(xlabel="vocabulary size", ylabel="characters / token (validation)",
           title="compression grows with the vocabulary")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_token_lengths(token_bytes: Any, counts: Any, first: int = 0, clip: int = 12) -> Figure:
    """Two histograms of token length in bytes: over the vocabulary, and weighted by use in a text.

    Args:
        token_bytes: (V,) bytes of each token id; counts: (V,) occurrences of each id in the text.
        first: ids below it (special tokens) are left out; clip: the last bin holds `clip` or more.
    Raises:
        ValueError: if the shapes differ.
    """
    token_bytes, counts = _to_numpy(token_bytes), _to_numpy(counts)
    if token_bytes.shape != counts.shape:
        raise ValueError(f"plot_token_lengths: token_bytes {token_bytes.shape} vs counts {counts.shape}")
    clipped = np.minimum(token_bytes[first:], clip)
    bins = np.arange(1, clip + 2) - 0.5
    fig, (ax1, ax2) = new_figure(8.0, 2.8, ncols=2)
    label = f"token length (bytes; {clip} = {clip} or more)"
    plot_histogram(clipped, bins=bins, xlabel=label, ylabel="vocabulary entries", title="over the vocabulary", ax=ax1)
    plot_histogram(clipped, bins=bins, weights=counts[first:] / max(counts.sum(), 1), xlabel=label,
                   ylabel="share of training tokens", title="over the training text", ax=ax2)
    return fig
