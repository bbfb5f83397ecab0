"""The course model: the tiny DeepSeek trained on Shakespeare once, cached, and loaded by the chapters.

Chapters that need a *trained* model (speculative decoding in 05, generation and continued training
in 07) load this one instead of training a few dozen steps of their own, which would only show
gibberish. It is the `tiny` preset (MLA, DeepSeekMoE with auxiliary-loss-free balancing, one MTP
module) trained by `train.Trainer` with the CLI's default `TrainConfig` for `COURSE_MODEL_STEPS`
steps: the run ``python -m deepseek_edu train --steps COURSE_MODEL_STEPS`` would make, cached under
the data cache instead of ``runs/``.

Built by ``python -m deepseek_edu prepare --course-model`` (Binder does it at image time), or on first
use by `load_course_model`, with a progress bar: a few minutes on 2 CPU cores. The build is
deterministic: the seed fixes the initial weights and every batch, and CPU kernels are deterministic,
so the same seed gives bitwise the same model on the same machine (another CPU's kernels may round
differently in the last bits; chapters check only what holds for any such model).

Layout: ``<cache>/course_model/<name>/checkpoint.safetensors`` (weights, model and train configs, the
tokenizer; `checkpoint.save_checkpoint` format, without optimizer state) and ``metrics.jsonl`` (one
record per step, as `Trainer` writes it), where ``<name>`` encodes the preset, corpus, steps and seed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, load_model, save_checkpoint
from .config import ModelConfig, TrainConfig, get_preset
from .data import Tokenizer, resolve_cache_dir
from .model import Transformer

COURSE_MODEL_PRESET = "tiny"
COURSE_MODEL_CORPUS = "shakespeare"
COURSE_MODEL_STEPS = 600  # twice the CLI default run (300); notebook 07 measures its bits per character
COURSE_MODEL_SEED = TrainConfig.seed
METRICS_NAME = "metrics.jsonl"


def course_model_configs(steps: int = COURSE_MODEL_STEPS, seed: int = COURSE_MODEL_SEED,
                         corpus: str = COURSE_MODEL_CORPUS) -> tuple[ModelConfig, TrainConfig]:
    """(model config, train config) of the course model: the CLI defaults with `steps` and `seed`.

    `corpus` is Shakespeare for the course; tests pass the offline "python-docs".

    Warmup follows the CLI's rule (30 steps, at most a tenth of the run). Evaluation every 100 steps.
    Raises:
        ValueError: steps < 1 or seed < 0 (from `TrainConfig`).
    """
    model_cfg = get_preset(COURSE_MODEL_PRESET)
    warmup = min(TrainConfig.warmup_steps, max(steps, 0) // 10)
    train_cfg = TrainConfig(corpus=corpus, vocab_size=model_cfg.vocab_size, max_steps=steps,
                            warmup_steps=warmup, seed=seed, device="cpu", save_every=0,
                            eval_every=min(TrainConfig.eval_every, steps))
    train_cfg.check_model(model_cfg)
    return model_cfg, train_cfg


def course_model_dir(steps: int = COURSE_MODEL_STEPS, seed: int = COURSE_MODEL_SEED,
                     cache_dir: str | Path | None = None, corpus: str = COURSE_MODEL_CORPUS) -> Path:
    """The folder of the cached course model (it may not exist yet)."""
    name = f"{COURSE_MODEL_PRESET}-{corpus}-{steps}steps-seed{seed}"
    return resolve_cache_dir(cache_dir) / "course_model" / name


def build_course_model(steps: int = COURSE_MODEL_STEPS, seed: int = COURSE_MODEL_SEED,
                       cache_dir: str | Path | None = None, progress: bool = True, force: bool = False,
                       corpus: str = COURSE_MODEL_CORPUS) -> Path:
    """Train the course model and cache it; returns the checkpoint path (no training when cached).

    The run trains in a temporary folder beside the cache entry; the checkpoint (weights, configs,
    tokenizer; no optimizer state) and the metrics are moved into place only when it has finished, so
    an interrupted build leaves no half-made model behind.

    Args:
        steps, seed, corpus: the run (see `course_model_configs`); the defaults are *the* course model.
        cache_dir: cache root; default `data.resolve_cache_dir()` ($DEEPSEEK_EDU_CACHE when set).
        progress: tqdm bars while preparing the corpus and training.
        force: train again even if cached.
    Raises:
        ValueError: invalid steps or seed; data.CorpusUnavailableError: the corpus cannot be fetched.
    """
    from .train import Trainer  # imported here: train imports the whole training stack

    model_cfg, train_cfg = course_model_configs(steps, seed, corpus)
    folder = course_model_dir(steps, seed, cache_dir, corpus)
    path = folder / CHECKPOINT_NAME
    if path.is_file() and not force:
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        trainer = Trainer(model_cfg, train_cfg.replace(out_dir=tmp), progress=progress)
        trainer.fit()
        save_checkpoint(Path(tmp) / CHECKPOINT_NAME, trainer.model, train_cfg=train_cfg, step=trainer.step,
                        tokenizer=trainer.dataset.tokenizer,
                        extra={"course_model": True, "elapsed": round(trainer.elapsed, 1)})
        if folder.exists():
            shutil.rmtree(folder)
        Path(tmp).rename(folder)  # same file system: the finished folder appears at once
        Path(tmp).mkdir()  # for TemporaryDirectory's clean-up
    return path


def load_course_model(progress: bool = True, steps: int = COURSE_MODEL_STEPS, seed: int = COURSE_MODEL_SEED,
                      cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                      corpus: str = COURSE_MODEL_CORPUS) -> tuple[Transformer, Tokenizer]:
    """The trained course model (eval mode) and its tokenizer, trained and cached first if absent.

    Args:
        progress: show the training progress bar when it has to be built (a few minutes on 2 cores).
        steps, seed, cache_dir, corpus: as `build_course_model` (tests pass a few steps, a temporary
            cache and the offline corpus).
        device: where the model is placed.
    Raises:
        checkpoint.CheckpointError: the cached file is damaged (delete the folder to rebuild it).
    """
    path = build_course_model(steps, seed, cache_dir, progress=progress, corpus=corpus)
    model, tokenizer = load_model(path, device=device)
    assert tokenizer is not None  # the build stores it in the checkpoint
    return model, tokenizer


def course_model_history(steps: int = COURSE_MODEL_STEPS, seed: int = COURSE_MODEL_SEED,
                         cache_dir: str | Path | None = None, corpus: str = COURSE_MODEL_CORPUS) -> list[dict]:
    """The per-step metric records of the cached course model's training run (empty if not built)."""
    path = course_model_dir(steps, seed, cache_dir, corpus) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
