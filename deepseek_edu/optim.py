"""AdamW, the learning-rate schedules, and the one optimizer step every training loop takes.

`optimizer_step` is shared by pre-training (`train.Trainer`), SFT and GRPO (`rl.py`) and the
benchmarks: clip the gradient, check it is finite, step AdamW and the schedule, then move the MoE
routers' selection biases (auxiliary-loss-free balancing, DeepSeek-V3 §2.1.2).

**Policy for a non-finite gradient** (docs/pitfalls.md). One inf or NaN anywhere makes the total
gradient norm non-finite -- even when the loss itself is finite (an overflow in a backward kernel, a
0/0 in a masked mean). Such a step is *skipped*: AdamW's weights, moments and step counts are not
touched, the routers' biases do not move and the MoE load gathered for this step is dropped, so a
skipped step leaves no trace in the model. The batch is consumed and the learning-rate schedule
advances (the schedule stays a function of the step number). Each loop counts skipped steps in its
metrics ("skipped"); after `max_skipped_steps` skips in a row the run stops with `NonFiniteError`
(a `FloatingPointError`): a run that keeps producing non-finite gradients has diverged, and going on
would only burn compute. Checkpoints refuse non-finite weights (`checkpoint.save_checkpoint`), so the
last good checkpoint is never overwritten by a bad one.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import TrainConfig


class NonFiniteError(FloatingPointError):
    """A training run met non-finite values it cannot skip: too many skipped steps in a row, or
    non-finite weights about to be saved."""


# --- learning-rate schedule ----------------------------------------------------------------------------


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak `cfg.lr`.

    With W = warmup_steps, N = max_steps and m = min_lr_ratio:

    * warmup (all schedules), s < W: (s + 1) / (W + 1) -- linear from 0, and the first step
      already moves (a step at lr 0 would only fill AdamW's moments);
    * "cosine": m + (1 - m) * (1 + cos(pi * r)) / 2 with r = (s - W) / (N - 1 - W), i.e. the
      peak at s = W and exactly m at the last step s = N - 1;
    * "wsd" (warmup-stable-decay): 1 until the last n_d = round(decay_frac * N) steps, then
      1 - (1 - m) * (s - (N - n_d) + 1) / n_d, reaching m at s = N - 1;
    * "constant": 1.

    Steps past the end keep the last value.

    Returns:
        A float in [0, 1].
    """
    s = min(step, cfg.max_steps - 1)
    W, N, m = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    if s < W:
        return (s + 1) / (W + 1)
    if cfg.schedule == "cosine":
        r = (s - W) / max(N - 1 - W, 1)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * r))
    if cfg.schedule == "wsd":
        n_decay = max(1, round(cfg.decay_frac * N))
        into_decay = s - (N - n_decay) + 1  # 1 on the first decay step, n_decay on the last
        return 1.0 if into_decay <= 0 else 1.0 - (1.0 - m) * min(into_decay, n_decay) / n_decay
    return 1.0  # "constant" (TrainConfig.validate rejects other names)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): ``cfg.lr * lr_multiplier(step, cfg)``."""
    return cfg.lr * lr_multiplier(step, cfg)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_multiplier`; call ``.step()`` once after every ``optimizer.step()``.

    A `functools.partial` (not a lambda) so the scheduler's `state_dict` stays JSON-serialisable.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, cfg=cfg))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW with decoupled weight decay on matrices only.

    Parameters with >= 2 dimensions (projections, embedding, head) decay; vectors (RMSNorm
    weights, biases) do not -- decaying a norm's gain towards 0 only fights the normalisation.
    A tied head is one parameter and is listed once. When every parameter is on a CUDA device the
    fused implementation is used (a few kernel launches for the whole update instead of several per
    group of tensors; the same update up to rounding), else torch's default for the device.
    Call it after moving the model to its device.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) or None  # None: torch picks foreach or for-loop
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)

# --- the optimizer step --------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What `optimizer_step` did.

    Attributes:
        grad_norm: () fp32 tensor, the total gradient norm before clipping (inf or nan when skipped
            for that reason; on the parameters' device).
        skipped: True when the gradient was not finite and nothing was changed.
        loads: one (E,) fp32 load per MoE layer used for the bias step; empty for a dense model or a
            skipped step.
    """

    grad_norm: Tensor
    skipped: bool = False
    loads: list[Tensor] = field(default_factory=list)


def _router_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that balance their routers (`update_bias` / `load_since_update`), MTP blocks' included."""
    return [m for m in model.modules() if hasattr(m, "update_bias") and hasattr(m, "load_since_update")]


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, grad_clip: float = 0.0,
                   check_finite: bool = True) -> StepResult:
    """Clip, check, step: the one optimizer step of every training loop (after `loss.backward()`).

    1. total gradient norm over all parameters, clipped to `grad_clip` (0 = measure only);
    2. when `check_finite` and the norm is inf or nan: skip -- no AdamW step, the routers' load of
       this step dropped (no bias move); the scheduler still advances (see the module docstring);
    3. else AdamW steps, the scheduler steps, and every MoE layer moves its selection bias with the
       load gathered since the previous step (V3 §2.1.2; not a gradient step, so not AdamW's job).

    The gradients are left in place (call ``optimizer.zero_grad`` before the next backward).

    Args:
        model: the model whose `.parameters()` have gradients.
        optimizer, scheduler: the run's; scheduler may be None.
        grad_clip: max total gradient norm; <= 0 measures without scaling.
        check_finite: False skips the finite check (and its host sync); for throughput
            measurements only, where no step may be skipped anyway.
    Returns:
        `StepResult`.
    """
    max_norm = grad_clip if grad_clip > 0 else math.inf  # inf: measure, never scale
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if check_finite and not bool(torch.isfinite(grad_norm)):  # one host sync per step
        return skip_step(model, scheduler, grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    # Transformer.update_router_biases when the model has it (scripts may wrap it to record the loads)
    update = getattr(model, "update_router_biases", None)
    loads = update() if update is not None else [layer.update_bias() for layer in _router_layers(model)]
    return StepResult(grad_norm=grad_norm, skipped=False, loads=loads)


def skip_step(model: nn.Module, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
              grad_norm: Tensor | None = None) -> StepResult:
    """The skipped step of `optimizer_step`: no AdamW step, the MoE load gathered for it dropped (so no
    bias move), the scheduler advanced. Returns a `StepResult` with skipped=True."""
    for layer in _router_layers(model):
        layer.load_since_update.zero_()  # the skipped step's routing must not move the bias later
    if scheduler is not None:
        with warnings.catch_warnings():  # a skip before any optimizer.step() is intended, not the misuse torch warns of
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
    return StepResult(grad_norm=torch.tensor(math.nan) if grad_norm is None else grad_norm, skipped=True)


class SkipCounter:
    """Counts skipped steps, and raises `NonFiniteError` after `limit` skips in a row.

    Args:
        limit: consecutive skips allowed (>= 1).
        skipped: skips counted so far (a resumed run passes its count).
    """

    def __init__(self, limit: int, skipped: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"max_skipped_steps={limit} must be >= 1")
        self.limit, self.skipped, self.in_a_row = limit, skipped, 0

    def update(self, result: StepResult, where: str = "") -> None:
        """Record one step's outcome; raises `NonFiniteError` at the limit."""
        if not result.skipped:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"{self.in_a_row} optimizer steps in a row skipped for a non-finite gradient "
                                 f"(norm {float(result.grad_norm)}){' at ' + where if where else ''}; the run "
                                 f"has diverged: lower the learning rate or check the data")
