"""Training loop, learning-rate schedules, evaluation and checkpoints that resume exactly.

A training run is a deterministic function of its configs: the seed fixes the initial weights,
`data.BatchSampler` makes the k-th batch a pure function of (seed, k), and on a CPU every kernel
is deterministic. So "resume" can have a strict meaning here: 6 straight steps and 3 steps, a
checkpoint, a fresh process, and 3 more steps must give *bitwise* the same parameters, optimizer
moments and losses (FAULTS kind K; tests/test_train.py). That only holds if the checkpoint holds
everything the next step reads:

* the weights -- with tied tensors written once (safetensors refuses two names for one storage)
  and the tie re-made on load, because a tie that silently becomes two copies trains differently;
* AdamW's moments *and* its per-parameter step counts (the bias correction depends on them);
* the LR scheduler's position, which is why the schedule is a `LambdaLR` and not a bare function;
* the MoE routers' selection biases (fp32 buffers of the model's state dict, moved once per step
  by `Transformer.update_router_biases`, not by AdamW);
* the data position (the sampler's batch counter) and every RNG stream: torch CPU (and CUDA),
  Python's `random`, NumPy's legacy global generator.

Evaluation reads fixed, non-overlapping validation windows and draws no random numbers, so
evaluating (or not) never shifts the training stream.

Checkpoints (`checkpoint.py`, re-exported here) are one safetensors file, never pickle, written
atomically and checked on reading.

The loss is the mean next-token cross-entropy in nats/token, computed in fp32, plus the model's
own auxiliary (balancing) loss. Lower is better; ln V is the loss of a uniform guess and the
unigram entropy of the training tokens the loss of a model that has learned frequencies but no
context -- a trained model must land clearly below both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (  # noqa: F401 -- re-exported: train is where users look for them
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
    _atomic_write,
    config_differences,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from .config import ModelConfig, TrainConfig
from .data import (
    BatchSampler,
    TokenDataset,
    Tokenizer,
    cross_entropy_unigram,
    iter_eval_batches,
    load_dataset,
    unigram_entropy,
)
from .model import ModelOutput, Transformer
from .moe import max_violation
from .mtp import mtp_loss_terms

METRICS_NAME = "metrics.jsonl"
# TrainConfig fields that may differ when a run is resumed: they do not change what a step computes.
# max_steps is not one of them: the warmup/cosine/WSD schedule is laid out over it, so a resumed run
# with another max_steps would jump to another learning rate.
RESUMABLE_CHANGES = ("eval_every", "eval_batches", "save_every", "device", "threads", "out_dir", "bf16")


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


# --- loss and evaluation -------------------------------------------------------------------------------


def extra_loss_terms(output: ModelOutput, targets: Tensor, mtp_loss_weight: float | None = None) -> dict[str, Tensor]:
    """The loss terms added to the next-token loss: Multi-Token Prediction (DeepSeek-V3 §2.2).

    With D depths of MTP logits, returns ``{"mtp_loss_1": (λ/D)·CE_1, ..., "mtp_loss_D": (λ/D)·CE_D}``:
    each depth's cross-entropy against its own targets y[:, k:] (never wrapped around,
    `mtp.mtp_targets`), already weighted so that their sum is L_MTP = (λ/D) Σ_k CE_k. An empty dict
    for a model without MTP (or a forward that did not run it).

    Args:
        output: the model's `ModelOutput`; depth k's logits are (B, S - k, V).
        targets: (B, S) int64 next-token targets of the main head.
        mtp_loss_weight: λ; required when `output.mtp_logits` is not empty (the model's
            `cfg.mtp_loss_weight`; `lm_loss` passes it).
    Returns:
        name -> () fp32 tensor, already weighted; added to the loss by `lm_loss`.
    Raises:
        ValueError: MTP logits without a weight, or logits whose positions do not fit the targets.
    """
    return _mtp_terms(output, targets, mtp_loss_weight)[0]


def _mtp_terms(output: ModelOutput, targets: Tensor,
               mtp_loss_weight: float | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({"mtp_loss_k": (λ/D)·CE_k}, {"mtp_ce_k": CE_k}) for k = 1..D; two empty dicts without MTP logits."""
    if not output.mtp_logits:
        return {}, {}
    if mtp_loss_weight is None:
        raise ValueError("the output has MTP logits: pass mtp_loss_weight (the model's cfg.mtp_loss_weight)")
    terms = mtp_loss_terms(output.mtp_logits, targets)
    scale = mtp_loss_weight / len(terms)
    weighted = {f"mtp_loss_{k}": scale * ce for k, ce in enumerate(terms, start=1)}
    return weighted, {f"mtp_ce_{k}": ce for k, ce in enumerate(terms, start=1)}


def lm_loss(output: ModelOutput, targets: Tensor, mtp_loss_weight: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Training loss: mean next-token cross-entropy (fp32, nats/token) + the model's aux loss + MTP.

    Args:
        output: the model's `ModelOutput` for inputs x; output.logits is (B, T, V).
        targets: (B, T) int64, the next token of every position (y[:, t] = x[:, t + 1]).
        mtp_loss_weight: λ of the MTP loss, needed when output.mtp_logits is not empty.
    Returns:
        loss: () fp32 to backpropagate, and metrics (Python floats): "loss" (the total), "ce"
        (the main head's cross-entropy over all B * T positions, MTP excluded), "aux_loss", plus one
        entry per `extra_loss_terms` ("mtp_loss_k", weighted by λ/D) and, with MTP, "mtp_ce_k" (the
        unweighted cross-entropy of depth k, nats/token, for logging).
    Raises:
        ValueError: logits and targets disagree in (B, T); MTP logits without mtp_loss_weight.
    """
    logits = output.logits
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} "
                         f"in (B, T)")
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1))  # (B*T, V) vs (B*T,) -> ()
    aux = output.aux_loss.float()
    extra, mtp_ce = _mtp_terms(output, targets, mtp_loss_weight)  # the same terms as `extra_loss_terms`
    loss = ce + aux + sum(extra.values(), torch.zeros((), device=ce.device))
    metrics = {"loss": loss.item(), "ce": ce.item(), "aux_loss": aux.item()}
    metrics.update({name: term.item() for name, term in extra.items()})
    metrics.update({name: term.item() for name, term in mtp_ce.items()})  # unweighted, comparable with "ce"
    return loss, metrics


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager:
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
            with _autocast(device, cfg):
                logits = model(x, mtp=False).logits  # (b, T, V); the main head only
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


# --- the training loop ---------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU. Raises ValueError for "cuda" without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch finds no CUDA device; use the CPU ('cpu')")
    return torch.device(name)


@dataclass
class TrainResult:
    """What a training run returns.

    Attributes:
        model: the trained model (train mode, on the training device).
        tokenizer: the tokenizer of the corpus.
        history: one record per step: step, lr, loss, ce, aux_loss, grad_norm (before clipping),
            tokens (seen so far), elapsed (s), val_loss (nats/token, None when not evaluated), and for
            MoE models max_violation (MaxVio of the most unbalanced layer this step).
        val_loss: the last validation loss (nats/token), None if never evaluated.
        unigram_entropy: entropy of the train split's unigram distribution (nats/token).
        unigram_cross_entropy: val tokens under the train unigram (nats/token) -- the baseline.
        val_chars_per_token: characters of the val split per val token (for bits per character).
        checkpoint_path: where the last checkpoint is.
        step: optimizer steps completed.
        elapsed: training seconds, summed over resumed runs.
    """

    model: Transformer
    tokenizer: Tokenizer
    history: list[dict]
    val_loss: float | None
    unigram_entropy: float
    unigram_cross_entropy: float
    val_chars_per_token: float
    checkpoint_path: Path
    step: int
    elapsed: float

    @property
    def val_bits_per_char(self) -> float | None:
        """Validation loss in bits per character: nats/token / ln 2 / (chars/token)."""
        return None if self.val_loss is None else self.val_loss / math.log(2) / self.val_chars_per_token


class _Interrupt:
    """Turns the first SIGINT into a flag checked between steps, so the checkpoint is consistent.

    A second Ctrl-C raises KeyboardInterrupt at once (no checkpoint). Only the main thread can
    install signal handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (press again to abort at once)",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupt]:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread of the main interpreter: Ctrl-C stays as it is
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """One training run: data, model, AdamW, schedule, sampler, metrics and checkpoints.

    ``Trainer(model_cfg, train_cfg).fit()`` trains to `max_steps`; ``fit(until=k)`` stops after
    step k (for notebooks and tests); `save` and ``resume=True`` continue exactly.

    Args:
        model_cfg, train_cfg: validated here; their vocabulary sizes must agree.
        resume: continue from ``out_dir/checkpoint.safetensors`` when it exists (fresh start otherwise).
        progress: show a `tqdm.auto` bar with the loss and lr.
        callback: called as callback(record) after every completed step (after its evaluation
            and checkpoint); raising KeyboardInterrupt there acts like Ctrl-C.
        dataset: an already loaded `TokenDataset` of train_cfg.corpus (else `load_dataset`).
    Raises:
        ValueError: invalid configs, or device="cuda" without a GPU.
        CheckpointError: resuming from a checkpoint of another model, corpus or training setup.
        data.CorpusUnavailableError: the corpus cannot be fetched.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, resume: bool = False,
                 progress: bool = True, callback: Callable[[dict], None] | None = None,
                 dataset: TokenDataset | None = None) -> None:
        model_cfg.validate()
        train_cfg.validate()
        train_cfg.check_model(model_cfg)
        self.model_cfg, self.cfg, self.progress, self.callback = model_cfg, train_cfg, progress, callback
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        self.device = resolve_device(train_cfg.device)
        if dataset is not None and (dataset.corpus_name, dataset.vocab_size) != (train_cfg.corpus,
                                                                                 train_cfg.vocab_size):
            raise ValueError(f"dataset is {dataset.corpus_name!r} with vocab_size={dataset.vocab_size}, but "
                             f"corpus={train_cfg.corpus!r}, vocab_size={train_cfg.vocab_size} was asked for")
        self.dataset = dataset or load_dataset(train_cfg.corpus, train_cfg.vocab_size, progress=progress)
        self.out_dir = Path(train_cfg.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.metrics_path = self.out_dir / METRICS_NAME

        random.seed(train_cfg.seed)
        torch.manual_seed(train_cfg.seed)  # fixes the initial weights
        self.model = Transformer(model_cfg).to(self.device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.scheduler = make_scheduler(self.optimizer, train_cfg)
        self.sampler = BatchSampler(self.dataset.train, train_cfg.batch_size, train_cfg.seq_len,
                                    train_cfg.seed)
        self.step = 0
        self.history: list[dict] = []
        self._elapsed_before = 0.0  # training seconds before the current `fit` (earlier calls, resumed runs)
        self._running_since: float | None = None  # perf_counter() at the start of the current `fit`
        self._baselines: tuple[float, float] | None = None
        self._metrics_started = False
        self.resumed_from: int | None = None
        if resume and self.checkpoint_path.is_file():
            self._restore(self.checkpoint_path)

    # -- state ------------------------------------------------------------------------------------------
    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        if ckpt.train_config is not None:
            diff = config_differences(ckpt.train_config.to_dict(), self.cfg.to_dict(),
                                      ignore=RESUMABLE_CHANGES)
            if diff:
                raise CheckpointError(f"cannot resume {path}: " + "; ".join(diff) + f" (only "
                                      f"{', '.join(RESUMABLE_CHANGES)} may change when resuming)")
        current = self.dataset.tokenizer.backend.to_str()
        if ckpt.tokenizer is not None and ckpt.tokenizer.backend.to_str() != current:
            raise CheckpointError(f"cannot resume {path}: its tokenizer differs from the data cache's for "
                                  f"corpus={self.cfg.corpus!r} (another corpus text or Python version?), "
                                  f"so its token ids would mean other text")
        if ckpt.sampler_state is None:
            raise CheckpointError(f"checkpoint {path} holds no data position (sampler state); cannot resume")
        self.sampler.load_state_dict(ckpt.sampler_state)
        ckpt.restore_rng()
        self.step, self.history = ckpt.step, list(ckpt.history)
        self._elapsed_before = float(ckpt.extra.get("elapsed", 0.0))
        self.resumed_from = ckpt.step

    @property
    def elapsed(self) -> float:
        """Training seconds, including those of the runs this one resumed."""
        running = 0.0 if self._running_since is None else time.perf_counter() - self._running_since
        return self._elapsed_before + running

    def save(self, path: str | Path | None = None) -> Path:
        """Write the whole training state atomically (default ``out_dir/checkpoint.safetensors``)."""
        return save_checkpoint(path or self.checkpoint_path, self.model, self.optimizer, self.scheduler,
                               train_cfg=self.cfg, step=self.step, sampler_state=self.sampler.state_dict(),
                               history=self.history, tokenizer=self.dataset.tokenizer,
                               extra={"corpus": self.cfg.corpus, "elapsed": self.elapsed})

    def evaluate(self) -> float:
        """Validation loss now (nats/token); see `evaluate`."""
        return evaluate(self.model, self.dataset.val, self.cfg)

    # -- one step ---------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step on the next batch; returns its metric record (no evaluation)."""
        self.model.train()  # a sample or an evaluation in between may have left it in eval mode
        x, y = self.sampler.next()  # (B, T) each
        x, y = x.to(self.device), y.to(self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        with _autocast(self.device, self.cfg):
            output = self.model(x)
        loss, metrics = lm_loss(output, y, self.model_cfg.mtp_loss_weight)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {self.step + 1}; lower "
                                     f"lr={self.cfg.lr} or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf  # inf: measure, never scale
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        # Auxiliary-loss-free balancing (V3 §2.1.2): each MoE layer moves its selection bias by
        # gamma * sign(mean load - load) with this step's load. Not a gradient step, so not AdamW's job.
        loads = self.model.update_router_biases()  # one (E,) per MoE layer; [] for a dense model
        self.step += 1
        record = {"step": self.step, "lr": lr, **metrics, "grad_norm": grad_norm.item(),
                  "tokens": self.step * self.cfg.batch_size * self.cfg.seq_len,
                  "elapsed": round(self.elapsed, 3), "val_loss": None}
        if loads:
            record["max_violation"] = max(max_violation(load) for load in loads)  # worst layer's MaxVio
        return record

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _start_metrics(self) -> None:
        """metrics.jsonl = the history so far (drops lines a crashed run wrote after its checkpoint)."""
        if not self._metrics_started:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history).encode())
            self._metrics_started = True

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> TrainResult:
        """Train up to step `until` (default max_steps), evaluating and saving on schedule.

        At max_steps the model is evaluated and saved. On KeyboardInterrupt (Ctrl-C, or raised by
        the callback) a checkpoint of the last completed step is written, its path printed, and
        the KeyboardInterrupt re-raised.
        """
        cfg = self.cfg
        end = cfg.max_steps if until is None else min(until, cfg.max_steps)
        self._start_metrics()
        self._running_since = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        interrupt = _Interrupt()
        in_step = False  # True from the batch draw to the logged record: a checkpoint there would be torn
        try:
            with interrupt.installed():
                while self.step < end:
                    in_step = True
                    record = self.train_step()
                    last = self.step == cfg.max_steps
                    if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                        record["val_loss"] = self.evaluate()
                    self._log(record)
                    in_step = False
                    if last or (cfg.save_every and self.step % cfg.save_every == 0):
                        self.save()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
                    bar.update(1)
                    if self.callback is not None:
                        self.callback(record)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if in_step:
                print(f"interrupted inside step {self.step + 1}: no checkpoint written; the last saved one "
                      f"({self.checkpoint_path}) is kept", file=sys.stderr, flush=True)
            else:
                path = self.save()
                print(f"interrupted: saved the checkpoint of step {self.step} to {path}", file=sys.stderr,
                      flush=True)
            raise
        finally:
            self._elapsed_before, self._running_since = self.elapsed, None
        bar.close()
        return self.result()

    def result(self) -> TrainResult:
        """The `TrainResult` of the run so far."""
        val = next((r["val_loss"] for r in reversed(self.history) if r.get("val_loss") is not None), None)
        ds = self.dataset
        if self._baselines is None:
            self._baselines = unigram_baselines(ds)
        return TrainResult(
            model=self.model, tokenizer=ds.tokenizer, history=self.history, val_loss=val,
            unigram_entropy=self._baselines[0], unigram_cross_entropy=self._baselines[1],
            val_chars_per_token=ds.n_chars_val / max(ds.val.numel(), 1), checkpoint_path=self.checkpoint_path,
            step=self.step, elapsed=self.elapsed)


def unigram_baselines(dataset: TokenDataset) -> tuple[float, float]:
    """(entropy of the train unigram, cross-entropy of val under the train unigram), both nats/token."""
    return (unigram_entropy(dataset.train, dataset.vocab_size),
            cross_entropy_unigram(dataset.train, dataset.val, dataset.vocab_size))


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, resume: bool = False, progress: bool = True,
          callback: Callable[[dict], None] | None = None, dataset: TokenDataset | None = None) -> TrainResult:
    """Train a `Transformer` from scratch (or resume) to train_cfg.max_steps; see `Trainer`.

    Returns:
        `TrainResult` with the model, history, final validation loss, unigram baselines and the
        checkpoint path (``train_cfg.out_dir/checkpoint.safetensors``).
    Raises:
        As `Trainer`; KeyboardInterrupt after saving a checkpoint when interrupted.
    """
    return Trainer(model_cfg, train_cfg, resume=resume, progress=progress, callback=callback,
                   dataset=dataset).fit()
