"""Data-parallel training with torch's own engine: `torchrun` + `DistributedDataParallel`.

    torchrun --nproc_per_node=2 -m deepseek_edu train --steps 20          # 2 CPU processes (gloo)
    torchrun --nproc_per_node=8 -m deepseek_edu train --device cuda ...    # 8 GPUs (NCCL)

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process;
`make_trainer` reads them: with WORLD_SIZE > 1 it joins the process group (NCCL when the run is on
CUDA, one GPU per LOCAL_RANK; gloo on the CPU) and returns a `DataParallelTrainer`, else the plain
`Trainer`. What changes with N processes:

- **the batch**: `--batch-size` stays the *global* batch. Every rank draws the same global batch from
  the same seeded sampler and keeps rows [r B/N, (r+1) B/N): the samples, their order and the tokens
  counted are those of the one-process run (B must be divisible by N, else a ValueError);
- **gradients**: DDP averages them over ranks during backward, so with equal shards every rank steps
  with the gradient of the global mean loss; clipping, AdamW and the schedule then run identically;
- **router biases**: the auxiliary-loss-free update (V3 §2.1.2) needs the load of the whole batch:
  each MoE layer's token counts are all-reduced (summed) before `update_bias`, so the biases stay
  identical on every rank (DDP's buffer broadcast is off: it would overwrite the local counts);
- **logging and files**: the logged loss is the mean over ranks; rank 0 alone writes metrics.jsonl and
  the checkpoint; other ranks print nothing. Resume reads the same checkpoint on every rank.
- Evaluation runs the whole validation set on every rank (identical numbers; simple, not fast).

A 2-process run equals the 1-process run at the same global batch up to float rounding of the
gradient average (tests/test_data_parallel.py states the tolerance).
"""

from __future__ import annotations

import inspect
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import ModelConfig, TrainConfig
from ..data import load_dataset
from ..train import Trainer, resolve_device

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # covers rank 0 preparing a corpus while the others wait


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when absent."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


class _ShardedSampler:
    """Draws the global batch from the one-process sampler and keeps this rank's rows."""

    def __init__(self, sampler, rank: int, world_size: int) -> None:
        self.inner, self.rank, self.world_size = sampler, rank, world_size

    def next(self):
        x, y = self.inner.next()  # (B, T) each, the same on every rank
        per = x.shape[0] // self.world_size
        rows = slice(self.rank * per, (self.rank + 1) * per)
        return x[rows], y[rows]  # (B/N, T)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)


class _DDPModel(DistributedDataParallel):
    """DDP whose unknown attributes are the wrapped model's, and whose router update is global."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def update_router_biases(self):
        for moe in self.module.moe_layers():
            dist.all_reduce(moe.load_since_update)  # (E,) int64: the global batch's load
        return self.module.update_router_biases()


class DataParallelTrainer(Trainer):
    """`Trainer` on one rank of a data-parallel group (process group already initialised).

    Raises:
        ValueError: batch_size not divisible by the world size.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, resume: bool = False,
                 progress: bool = True, dataset=None) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if train_cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size={train_cfg.batch_size} (the global batch) is not divisible by the "
                             f"{self.world_size} data-parallel processes")
        super().__init__(model_cfg, train_cfg, resume=resume, progress=progress and self.rank == 0,
                         dataset=dataset)
        self.sampler = _ShardedSampler(self.sampler, self.rank, self.world_size)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast before each forward: it would overwrite this rank's routed-token counts
        # (newer torch names the switch forward_sync_buffers, older ones broadcast_buffers)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        self._ddp = _DDPModel(self.model, device_ids=device_ids, **no_sync)

    def train_step(self) -> dict:
        raw = self.model
        self.model = self._ddp  # the step's forward, clipping and router update go through DDP
        try:
            record = super().train_step()
        finally:
            self.model = raw
        keys = [k for k in record if isinstance(record[k], float)
                and (k in ("loss", "ce", "aux_loss") or k.startswith(("mtp_loss_", "mtp_ce_")))]
        if keys:  # the logged losses are means over ranks (each rank saw B/N sequences)
            t = torch.tensor([record[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            record.update({k: v / self.world_size for k, v in zip(keys, t.tolist())})
        return record

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            super()._log(record)
        else:
            self.history.append(record)

    def _start_metrics(self) -> None:
        if self.rank == 0:
            super()._start_metrics()

    def save(self, path=None):
        if self.rank == 0:
            return super().save(path)
        return path or self.checkpoint_path


def make_trainer(model_cfg: ModelConfig, train_cfg: TrainConfig, resume: bool = False,
                 progress: bool = True) -> Trainer:
    """The CLI's hook: a `Trainer`, or under torchrun (WORLD_SIZE > 1) a `DataParallelTrainer`.

    Joins the process group (NCCL for a CUDA run, gloo on the CPU), prepares the corpus on rank 0
    first (the others wait, then read the cache), and silences stdout on ranks other than 0.
    """
    rank, world_size, local_rank = world_from_env()
    if world_size == 1:
        return Trainer(model_cfg, train_cfg, resume=resume, progress=progress)
    device = resolve_device(train_cfg.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                             "NCCL needs one GPU per process; lower --nproc_per_node or use --device cpu")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- one copy of the output, from rank 0
    if rank == 0:
        dataset = load_dataset(train_cfg.corpus, train_cfg.vocab_size, progress=progress)
        dist.barrier()
    else:
        dist.barrier()
        dataset = load_dataset(train_cfg.corpus, train_cfg.vocab_size, progress=False)
    return DataParallelTrainer(model_cfg, train_cfg, resume=resume, progress=progress, dataset=dataset)
