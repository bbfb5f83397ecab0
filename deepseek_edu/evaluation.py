"""Evaluation of a language model: validation loss on fixed windows, unigram baselines, the device,
and the trailing mean that smooths a logged curve.

Evaluation reads fixed, non-overlapping validation windows and draws no random numbers, so
evaluating (or not) never shifts the training stream (`train.py` says why that matters for an exact
resume). Re-exported by `train.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import TrainConfig
from .data import TokenDataset, cross_entropy_unigram, iter_eval_batches, unigram_entropy
from .model import Transformer


def trailing_mean(values: Sequence[float], window: int = 10) -> list[float]:
    """Trailing mean of a logged curve over `window` values (the first ones over what there is).

    Raises:
        ValueError: if window < 1.
    """
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU. Raises ValueError for "cuda" without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch finds no CUDA device; use the CPU ('cpu')")
    return torch.device(name)


def autocast_for(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when cfg.bf16); plain fp32 on CPU."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Transformer, tokens: Tensor, cfg: TrainConfig) -> float:
    """Mean validation cross-entropy in nats/token over `cfg.eval_batches` fixed batches.

    The windows are `data.iter_eval_batches` (non-overlapping, spread evenly over the split): the same on every
    call and free of random numbers, so evaluation never perturbs the training RNG stream. The
    model runs in eval mode and is put back in train mode afterwards. The aux loss is not included.

    Args:
        model: the language model (any device).
        tokens: (N,) int64 validation token ids.
        cfg: batch_size, seq_len, eval_batches and bf16 are used.
    Returns:
        Loss per target token (a short last batch is weighted by its tokens, not as a whole batch).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in iter_eval_batches(tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
            x, y = x.to(device), y.to(device)
            with autocast_for(device, cfg):
                logits = model(x, mtp=False).logits  # (b, T, V); the main head only
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


def unigram_baselines(dataset: TokenDataset) -> tuple[float, float]:
    """(entropy of the train unigram, cross-entropy of val under the train unigram), both nats/token."""
    return (unigram_entropy(dataset.train, dataset.vocab_size),
            cross_entropy_unigram(dataset.train, dataset.val, dataset.vocab_size))
