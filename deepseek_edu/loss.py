"""The one training loss: next-token cross-entropy + the balance loss + the MTP terms.

    L = CE(main head) + aux (already weighted by its alphas) + (λ / D) Σ_k CE_k      (DeepSeek-V3 §2.1.2, §2.2)

`training_loss` returns tensors only -- no `.item()`, so no host sync inside a training step;
`loss_metrics` turns them into Python floats for logging with one transfer. Pre-training
(`train.Trainer`), SFT (`rl.supervised_finetune`, with a mask over the response tokens) and the
benchmarks all call it; GRPO's policy loss is another objective (`grpo.policy_loss`) but takes its
optimizer step through the same `optim.optimizer_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import ModelOutput
from .mtp import mtp_loss_terms


@dataclass
class LossTerms:
    """The parts of one training loss, all () fp32 tensors on the model's device.

    Attributes:
        loss: the total to backpropagate: ce + aux_loss + Σ mtp_loss.
        ce: the main head's mean cross-entropy (nats/token) over the targets (or the masked ones).
        aux_loss: the model's balance loss, already weighted (0 for a dense model).
        mtp_loss: {"mtp_loss_k": (λ/D)·CE_k} for k = 1..D, already weighted; empty without MTP.
        mtp_ce: {"mtp_ce_k": CE_k}, unweighted (comparable with ce); empty without MTP.
    """

    loss: Tensor
    ce: Tensor
    aux_loss: Tensor
    mtp_loss: dict[str, Tensor] = field(default_factory=dict)
    mtp_ce: dict[str, Tensor] = field(default_factory=dict)


def mtp_terms(output: ModelOutput, targets: Tensor,
              mtp_loss_weight: float | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({"mtp_loss_k": (λ/D)·CE_k}, {"mtp_ce_k": CE_k}) for k = 1..D; two empty dicts without MTP logits.

    Raises:
        ValueError: MTP logits without a weight, or logits whose positions do not fit the targets.
    """
    if not output.mtp_logits:
        return {}, {}
    if mtp_loss_weight is None:
        raise ValueError("the output has MTP logits: pass mtp_loss_weight (the model's cfg.mtp_loss_weight)")
    terms = mtp_loss_terms(output.mtp_logits, targets)
    scale = mtp_loss_weight / len(terms)
    weighted = {f"mtp_loss_{k}": scale * ce for k, ce in enumerate(terms, start=1)}
    return weighted, {f"mtp_ce_{k}": ce for k, ce in enumerate(terms, start=1)}


def training_loss(output: ModelOutput, targets: Tensor, mtp_loss_weight: float | None = None,
                  mask: Tensor | None = None) -> LossTerms:
    """The training loss of one forward, as tensors (no host sync).

    Args:
        output: the model's `ModelOutput` for inputs x; output.logits is (B, T, V).
        targets: (B, T) int64, the next token of every position (y[:, t] = x[:, t + 1]).
        mtp_loss_weight: λ of the MTP loss, needed when output.mtp_logits is not empty.
        mask: optional (B, T) bool: average the main cross-entropy over the True positions only
            (SFT: the response tokens). Not combinable with MTP logits (their targets are shifted).
    Returns:
        `LossTerms`; the main cross-entropy is computed in fp32.
    Raises:
        ValueError: logits and targets (or mask) disagree in (B, T); MTP logits without
            mtp_loss_weight; a mask together with MTP logits; an all-False mask.
    """
    logits = output.logits
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} in (B, T)")
    V = logits.shape[-1]
    flat_logits, flat_targets = logits.float().reshape(-1, V), targets.reshape(-1)  # (B*T, V), (B*T,)
    if mask is None:
        ce = F.cross_entropy(flat_logits, flat_targets)
        mtp_loss, mtp_ce = mtp_terms(output, targets, mtp_loss_weight)
    else:
        if mask.shape != targets.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
        if output.mtp_logits:
            raise ValueError("a loss mask cannot be combined with MTP logits; run the model with mtp=False")
        per_token = F.cross_entropy(flat_logits, flat_targets, reduction="none")  # (B*T,)
        m = mask.reshape(-1).to(per_token.dtype)
        ce = (per_token * m).sum() / m.sum()  # nan for an all-False mask: caught by the optimizer step
        mtp_loss, mtp_ce = {}, {}
    aux = output.aux_loss.float()
    loss = ce + aux + sum(mtp_loss.values(), torch.zeros((), device=ce.device))
    return LossTerms(loss=loss, ce=ce, aux_loss=aux, mtp_loss=mtp_loss, mtp_ce=mtp_ce)


def loss_metrics(terms: LossTerms) -> dict[str, float]:
    """Python floats for logging, read from the device in one transfer.

    Returns:
        "loss" (the total), "ce", "aux_loss", "mtp_loss_k" (weighted) and "mtp_ce_k" (unweighted).
    """
    named = {"loss": terms.loss, "ce": terms.ce, "aux_loss": terms.aux_loss, **terms.mtp_loss, **terms.mtp_ce}
    values = torch.stack([t.detach().float() for t in named.values()]).tolist()
    return dict(zip(named, values))
