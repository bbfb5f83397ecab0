"""Start N local processes joined by `torch.distributed`, run a function on each, collect results.

The course's stand-in for a cluster: gloo over CPU processes of one machine (or NCCL when every
rank owns a GPU). Used by the tests, the notebook and the `--selftest` entry points; real multi-
process training goes through torch's own launcher (`torchrun`, see `data_parallel.py`).

    results = run_ranks(fn, world_size=2, args=(cfg,))   # fn(rank, world_size, *args) on every rank

Rendezvous through a `FileStore` in a fresh temporary folder (no TCP port to find, none to clash);
every collective gets `timeout` seconds (`init_process_group(timeout=...)`), so a rank that
waits for a partner that died or took another branch fails with an error instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class RankError(RuntimeError):
    """One or more ranks raised. `errors` maps rank -> (exception type name, message)."""

    def __init__(self, errors: dict[int, tuple[str, str]], details: str = "") -> None:
        self.errors = errors
        lines = [f"rank {r}: {t}: {m}" for r, (t, m) in sorted(errors.items())]
        super().__init__("; ".join(lines) + (f"\n{details}" if details else ""))


def default_backend(world_size: int = 1) -> str:
    """NCCL when there is one CUDA device per rank (NCCL refuses two ranks on one GPU), else gloo."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def _worker(rank: int, world_size: int, store_path: str, backend: str, timeout_s: float,
            fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)  # N ranks share a few cores; oversubscribed threads only slow each other
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            # plain pickle bytes: the queue's own pickler would pass tensors as shared-memory handles
            # that vanish when this process exits
            queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 -- report every failure to the parent, never die silently
        queue.put((rank, "error", (type(exc).__name__, str(exc), traceback.format_exc())))


def run_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), backend: str | None = None,
              timeout_s: float = 60.0) -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` processes with a process group initialised.

    Args:
        fn: a module-level function (it is pickled under the "spawn" start method); its return value
            must be picklable (tensors are fine).
        world_size: number of processes, >= 1.
        backend: "gloo" | "nccl" | None (= `default_backend(world_size)`).
        timeout_s: per-collective timeout, and (x 3) the wall limit of the whole run.
    Returns:
        the return values, indexed by rank.
    Raises:
        ValueError: world_size < 1.
        RankError: if any rank raised (its type name and message for each) or did not finish.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    backend = backend or default_backend(world_size)
    # fork: no second import of torch per rank (seconds on a busy CPU); spawn where fork is absent
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() and backend == "gloo" else "spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store, backend, timeout_s, fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, str]] = {}
        details = []
        try:
            for _ in range(world_size):
                rank, status, value = queue.get(timeout=3 * timeout_s)
                if status == "ok":
                    results[rank] = pickle.loads(value)
                else:
                    errors[rank] = (value[0], value[1])
                    details.append(f"--- rank {rank} ---\n{value[2]}")
        except queue_mod.Empty:  # some rank neither finished nor reported
            for r in range(world_size):
                if r not in results and r not in errors:
                    errors[r] = ("TimeoutError", f"no result within {3 * timeout_s:.0f} s")
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RankError(errors, "\n".join(details))
    return [results[r] for r in range(world_size)]
