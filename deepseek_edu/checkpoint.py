"""Checkpoints that resume exactly: one safetensors file, written atomically, checked on reading.

A checkpoint holds everything the next training step reads (`train.py` says why each piece matters
for a bitwise resume): the weights, with tied tensors written once and the tie re-made on load;
AdamW's moments and per-parameter step counts; the LR scheduler's position; the data position and
every RNG stream; the tokenizer; the configs. Not the per-step metric history: that grows with the
run and lives in ``metrics.jsonl`` beside the checkpoint, so a checkpoint's size does not depend on
the run's length.

It never holds a non-finite weight or optimizer moment: `save_checkpoint` refuses with
`NonFiniteError` rather than overwrite the last good checkpoint with a broken one.

It is never pickle, so loading one cannot run code. It is never half-written: it is written to a
temporary file in the same folder, fsync'ed and then renamed over the old one (`os.replace` is
atomic on POSIX and Windows), so a crash leaves either the old or the new file. Reading checks three
layers: safetensors validates the header and that every tensor's byte range lies inside the file (a
truncated file fails here); a SHA-256 stored in the metadata covers every tensor's name, dtype, shape
and bytes *and* all other metadata (a flipped bit anywhere fails here); and the stored `ModelConfig`
must equal the one asked for (the error names each differing field).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import tokenizers
import torch
from torch import Tensor, nn

from .config import ModelConfig, TrainConfig
from .data import Tokenizer, load_tokenizer
from .io import atomic_write
from .model import Transformer
from .optim import NonFiniteError

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "deepseek-edu-checkpoint"
CHECKPOINT_VERSION = 1  # bump when the layout below changes; older readers then refuse clearly


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, of an unknown format, or made for another model."""




def _state_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict with shared tensors written once.

    Returns:
        tensors: name -> CPU tensor, each storage once; aliases: dropped name -> kept name (a tied
        head gives {"head.weight": "embed.weight"}; the MTP modules of V3 share the same way).
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
               t.device)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().to("cpu", copy=True).contiguous()  # views of one buffer: separate
    return tensors, aliases


def _digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (sorted by name: name, dtype, shape, bytes) and every metadata item."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG stream training may read: (tensors, JSON-able metadata)."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}  # (5056,) uint8
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.cpu()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))  # (624,) MT19937 words
    meta = {"python": random.getstate(), "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = []
    while f"rng.cuda.{len(cuda)}" in tensors:
        cuda.append(tensors[f"rng.cuda.{len(cuda)}"])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def _check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Raise `NonFiniteError` naming the first floating tensor that holds an inf or a nan."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"refusing to save a checkpoint: {what} {name!r} holds non-finite values "
                                 f"(the last good checkpoint is kept)")


def save_checkpoint(path: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                    train_cfg: TrainConfig | None = None, step: int = 0, sampler_state: dict | None = None,
                    history: list[dict] | None = None, tokenizer: Tokenizer | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write everything needed to continue training to one safetensors file, atomically.

    Layout: tensors ``model.<name>`` (shared storages once), ``optim.<param index>.<key>`` (AdamW's
    exp_avg, exp_avg_sq, step), ``rng.torch_cpu``, ``rng.cuda.<i>``, ``rng.numpy_keys``; metadata
    (str -> JSON str): format, format_version, model_config, train_config, aliases, optim_param_groups,
    optim_scalar_state, scheduler, step, sampler, rng, history, tokenizer (the tokenizer's own JSON,
    so the checkpoint decodes anywhere), tokenizer_sha256, extra, and sha256 (see `_digest`).

    Args:
        path: the file to (over)write.
        model: its config and weights are saved; the CPU RNG state is taken from this process.
        optimizer, scheduler: saved when given.
        train_cfg, step, sampler_state, tokenizer, extra: saved as metadata when given.
        history: metric records to store (empty by default; `train.Trainer` keeps them in
            metrics.jsonl instead, so the checkpoint does not grow with the run).
    Returns:
        The path written.
    Raises:
        NonFiniteError: a weight or an optimizer moment is inf or nan (nothing is written).
    """
    path = Path(path)
    tensors, aliases = _state_tensors(model)
    _check_finite(tensors, "weight")
    tensors = {f"model.{k}": v for k, v in tensors.items()}
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": int(step),
        "model_config": model.cfg.to_dict(), "aliases": aliases,
        "train_config": train_cfg.to_dict() if train_cfg is not None else None,
        "sampler": sampler_state, "history": history or [], "extra": extra or {},
    }
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                    _check_finite({f"optim.{idx}.{key}": tensors[f"optim.{idx}.{key}"]}, "optimizer state")
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta["optim_param_groups"] = sd["param_groups"]
        meta["optim_scalar_state"] = scalars
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    rng_tensors, meta["rng"] = _rng_state()
    tensors.update(rng_tensors)
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.backend.to_str()
        meta["tokenizer_sha256"] = hashlib.sha256(meta["tokenizer"].encode()).hexdigest()
    metadata = {k: json.dumps(v, default=_jsonable) for k, v in meta.items()}
    metadata["sha256"] = _digest(tensors, metadata)
    atomic_write(path, safetensors.torch.save(tensors, metadata=metadata))
    return path


@dataclass
class Checkpoint:
    """What `load_checkpoint` read, decoded.

    Attributes:
        path: the file.
        step: optimizer steps completed when it was written.
        model_config: the `ModelConfig` of the saved weights.
        train_config: the `TrainConfig` of the run, or None.
        model_state: the model's full state dict (tied names restored), CPU tensors.
        optimizer_state: an `Optimizer.state_dict()`, or None.
        scheduler_state, sampler_state: their `state_dict()`s, or None.
        history: metric records stored in the file (empty for the Trainer's checkpoints: see metrics.jsonl).
        tokenizer: the run's tokenizer, or None when none was saved.
        extra: free-form metadata (corpus, elapsed seconds, ...).
    """

    path: Path
    step: int
    model_config: ModelConfig
    train_config: TrainConfig | None
    model_state: dict[str, Tensor]
    optimizer_state: dict | None
    scheduler_state: dict | None
    sampler_state: dict | None
    history: list[dict]
    tokenizer: Tokenizer | None
    extra: dict[str, Any]
    rng_tensors: dict[str, Tensor] = field(repr=False, default_factory=dict)
    rng_meta: dict[str, Any] = field(repr=False, default_factory=dict)

    def restore_rng(self) -> None:
        """Put every RNG stream (torch CPU/CUDA, Python, NumPy) back where it was at `step`."""
        _set_rng_state(self.rng_tensors, self.rng_meta)


def config_differences(saved: dict[str, Any], asked: dict[str, Any],
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences "checkpoint has dim=192, this run asks dim=128", one per field."""
    return [f"checkpoint has {k}={saved.get(k)!r}, this run asks {k}={asked.get(k)!r}"
            for k in sorted(set(saved) | set(asked)) if k not in ignore and saved.get(k) != asked.get(k)]


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and raw metadata of a safetensors file, with clear errors; nothing stays mapped."""
    if path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: it is a folder; name the .safetensors file inside it")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    data = path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)  # validates the header and every tensor's byte range
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own (non-ValueError) error types
        raise CheckpointError(f"checkpoint {path} is corrupted or incomplete: safetensors cannot read it "
                              f"({type(exc).__name__}: {exc})") from exc
    return tensors, metadata


def _decode(path: Path, tensors: dict[str, Tensor], raw: dict[str, str]) -> Checkpoint:
    """Turn verified tensors and metadata into a `Checkpoint` (KeyError/ValueError on a foreign layout)."""
    meta = {k: json.loads(v) for k, v in raw.items() if k != "sha256"}
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, target in meta["aliases"].items():
        state[name] = state[target]  # a tied head: the same tensor under both names
    optim_state = None
    if "optim_param_groups" in meta:
        per_param: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                per_param.setdefault(int(idx), {})[key] = v
        for idx, scalars in meta["optim_scalar_state"].items():
            per_param.setdefault(int(idx), {}).update(scalars)
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["optim_param_groups"]]  # JSON turned AdamW's betas tuple into a list
        optim_state = {"state": dict(sorted(per_param.items())), "param_groups": groups}
    tokenizer = None
    if meta.get("tokenizer"):
        tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(meta["tokenizer"]))
    return Checkpoint(
        path=path, step=int(meta["step"]), model_config=ModelConfig.from_dict(meta["model_config"]),
        train_config=TrainConfig.from_dict(meta["train_config"]) if meta.get("train_config") else None,
        model_state=state, optimizer_state=optim_state, scheduler_state=meta.get("scheduler"),
        sampler_state=meta.get("sampler"), history=meta.get("history", []), tokenizer=tokenizer,
        extra=meta.get("extra", {}), rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng.")},
        rng_meta=meta["rng"])


_OPTIM_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")  # not part of a run's state


def load_checkpoint(path: str | Path, model: Transformer | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    model_config: ModelConfig | None = None) -> Checkpoint:
    """Read and verify a checkpoint; load it into `model` / `optimizer` / `scheduler` when given.

    RNG streams are not touched; call `Checkpoint.restore_rng` to continue a run exactly.

    Args:
        path: a file written by `save_checkpoint`.
        model: receives the weights; its config must equal the saved one (the tie, if any, is kept:
            a tied head is loaded once through the shared parameter).
        optimizer, scheduler: receive their saved states (built for `model` the same way).
        model_config: the config this run asks for, checked as `model.cfg` is.
    Returns:
        The decoded `Checkpoint`.
    Raises:
        CheckpointError: (a) the file does not exist; (b) it is corrupted or incomplete (safetensors
            refuses it, or the SHA-256 does not match); (c) it was written for another ModelConfig
            (every differing field named); (d) an unknown format or format version; or it lacks
            the optimizer / scheduler state that was asked for.
    """
    path = Path(path)
    tensors, raw = _read(path)
    if raw.get("format") != json.dumps(CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path} is a safetensors file but not a deepseek-edu checkpoint "
                              f"(metadata 'format' is {raw.get('format')!r})")
    try:
        version = json.loads(raw["format_version"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted or incomplete: no readable "
                              f"format_version") from exc
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this deepseek-edu reads "
                              f"version {CHECKPOINT_VERSION} only")
    if raw.get("sha256") != _digest(tensors, raw):
        raise CheckpointError(f"checkpoint {path} is corrupted or incomplete: the SHA-256 of its tensors and "
                              f"metadata does not match the one stored when it was written")
    try:
        ckpt = _decode(path, tensors, raw)
    except Exception as exc:  # the checksum matched, so the writer had another layout
        raise CheckpointError(f"checkpoint {path} cannot be decoded by this deepseek-edu "
                              f"({type(exc).__name__}: {exc}); it was written by another version") from exc
    for asked in (model_config, model.cfg if model is not None else None):
        if asked is not None and asked != ckpt.model_config:
            diff = config_differences(ckpt.model_config.to_dict(), asked.to_dict())
            raise CheckpointError(f"checkpoint {path} was written for another model: " + "; ".join(diff))
    try:
        if model is not None:
            model.load_state_dict(ckpt.model_state)
        if optimizer is not None:
            if ckpt.optimizer_state is None:
                raise CheckpointError(f"checkpoint {path} holds no optimizer state")
            # How the optimizer steps (fused, foreach, capturable) belongs to this process's device
            # (`train.make_optimizer` picks it), not to the saved run: keep the new optimizer's choice,
            # else a run resumed on CUDA from a CPU checkpoint would step unfused, and one resumed on
            # the CPU from a CUDA checkpoint fused.
            state = dict(ckpt.optimizer_state)
            state["param_groups"] = [{**saved, **{k: current[k] for k in _OPTIM_IMPL_KEYS if k in current}}
                                     for saved, current in zip(state["param_groups"], optimizer.param_groups)]
            optimizer.load_state_dict(state)
        if scheduler is not None:
            if ckpt.scheduler_state is None:
                raise CheckpointError(f"checkpoint {path} holds no scheduler state")
            scheduler.load_state_dict(ckpt.scheduler_state)
    except (RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} does not fit the objects it is loaded into: {exc}") from exc
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer | None]:
    """A model ready for `generate.generate`, and its tokenizer.

    The tokenizer comes from the checkpoint itself (its JSON is stored there, checked by SHA-256);
    for a checkpoint without one it is re-loaded from the data cache by the corpus and vocabulary
    size recorded in the train config, and None when that fails.

    Returns:
        (model in eval mode on `device`, tokenizer or None).
    Raises:
        CheckpointError: as `load_checkpoint`.
    """
    ckpt = load_checkpoint(path)
    model = Transformer(ckpt.model_config)
    model.load_state_dict(ckpt.model_state)
    model.to(device).eval()
    tokenizer = ckpt.tokenizer
    if tokenizer is None and ckpt.train_config is not None:
        try:
            tokenizer = load_tokenizer(ckpt.train_config.corpus, ckpt.train_config.vocab_size, progress=False)
        except (OSError, ValueError, RuntimeError):  # no cache and no network (CorpusUnavailableError)
            tokenizer = None
    return model, tokenizer
