"""Training loop, learning-rate schedules, evaluation and checkpoints that resume exactly.

A training run is a deterministic function of its configs: the seed fixes the initial weights,
`data.BatchSampler` makes the k-th batch a pure function of (seed, k), and on a CPU every kernel
is deterministic. So "resume" can have a strict meaning here: 6 straight steps and 3 steps, a
checkpoint, a fresh process, and 3 more steps must give *bitwise* the same parameters, optimizer
moments and losses (pitfalls kind K; tests/test_train.py). That only holds if the checkpoint holds
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
from torch import Tensor

from .checkpoint import (  # noqa: F401 -- re-exported: train is where users look for them
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
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
    load_dataset,
)
from .evaluation import (  # evaluate, resolve_device: also imported from here by scripts
    autocast_for,
    evaluate,
    resolve_device,
    unigram_baselines,
)
from .io import atomic_write
from .loss import loss_metrics, mtp_terms, training_loss
from .model import ModelOutput, Transformer
from .moe import max_violation
from .optim import (  # noqa: F401 -- re-exported: train is where users look for them
    NonFiniteError,
    SkipCounter,
    StepResult,
    lr_at,
    lr_multiplier,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    skip_step,
)

METRICS_NAME = "metrics.jsonl"
# TrainConfig fields that may differ when a run is resumed: they do not change what a step computes.
# max_steps is not one of them: the warmup/cosine/WSD schedule is laid out over it, so a resumed run
# with another max_steps would jump to another learning rate.
RESUMABLE_CHANGES = ("eval_every", "eval_batches", "save_every", "device", "threads", "out_dir", "bf16")


# --- loss and evaluation -------------------------------------------------------------------------------


def extra_loss_terms(output: ModelOutput, targets: Tensor, mtp_loss_weight: float | None = None) -> dict[str, Tensor]:
    """The loss terms added to the next-token loss: Multi-Token Prediction (DeepSeek-V3 §2.2).

    ``{"mtp_loss_1": (λ/D)·CE_1, ..., "mtp_loss_D": (λ/D)·CE_D}`` (`loss.mtp_terms`), each depth's
    cross-entropy against its own targets y[:, k:], already weighted; empty without MTP logits.

    Raises:
        ValueError: MTP logits without a weight, or logits whose positions do not fit the targets.
    """
    return mtp_terms(output, targets, mtp_loss_weight)[0]


def lm_loss(output: ModelOutput, targets: Tensor, mtp_loss_weight: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Training loss and its metrics: `loss.training_loss` then `loss.loss_metrics` (one host read).

    Returns:
        loss: () fp32 to backpropagate, and metrics (Python floats): "loss", "ce", "aux_loss",
        "mtp_loss_k" (weighted by λ/D) and "mtp_ce_k" (unweighted, nats/token).
    Raises:
        ValueError: as `loss.training_loss`.
    """
    terms = training_loss(output, targets, mtp_loss_weight)
    return terms.loss, loss_metrics(terms)


# --- the training loop ---------------------------------------------------------------------------------


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
        self.skips = SkipCounter(train_cfg.max_skipped_steps)  # optim.py: skipped steps and the limit
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
        self.step = ckpt.step
        self.history = list(ckpt.history) or self._read_metrics(ckpt.step)  # older checkpoints held it
        self.skips.skipped = int(ckpt.extra.get("skipped_steps", 0))
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
                               tokenizer=self.dataset.tokenizer,
                               extra={"corpus": self.cfg.corpus, "elapsed": self.elapsed,
                                      "skipped_steps": self.skips.skipped})

    def _read_metrics(self, step: int) -> list[dict]:
        """The records of steps 1..`step` from metrics.jsonl (the history is not in the checkpoint).

        Raises:
            CheckpointError: metrics.jsonl is missing or lacks some of those steps.
        """
        records = []
        if self.metrics_path.is_file():
            with open(self.metrics_path, encoding="utf-8") as f:
                records = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= step]
        if [r["step"] for r in records] != list(range(1, step + 1)):
            raise CheckpointError(f"cannot resume from step {step}: {self.metrics_path} does not hold the "
                                  f"metrics of steps 1..{step} (keep it beside the checkpoint)")
        return records

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
        with autocast_for(self.device, self.cfg):
            output = self.model(x)
        terms = training_loss(output, y, self.model_cfg.mtp_loss_weight)
        metrics = loss_metrics(terms)  # one host read for every logged term
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if math.isfinite(metrics["loss"]):
            step = optimizer_step(self.model, self.optimizer, self.scheduler, self.cfg.grad_clip)
        else:  # a non-finite loss is a non-finite gradient: skipped the same way (optim.py's policy)
            step = skip_step(self.model, self.scheduler, grad_norm=terms.loss.detach())
        self.skips.update(step, where=f"step {self.step + 1}")
        # Auxiliary-loss-free balancing (V3 §2.1.2) happened inside optimizer_step: each MoE layer moved
        # its selection bias by gamma * sign(mean load - load) with this step's load (not on a skipped step).
        loads = step.loads  # one (E,) per MoE layer; [] for a dense model or a skipped step
        self.step += 1
        record = {"step": self.step, "lr": lr, **metrics, "grad_norm": float(step.grad_norm),
                  "skipped_steps": self.skips.skipped,
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
            atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history).encode())
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
