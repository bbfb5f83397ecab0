"""Shared helpers for the benchmark scripts: what machine ran, how to time, how to write results.

Every benchmark in this folder follows the same method (the device notes' METHOD.md):

- **Warm up first.** The first calls pay for module loading, kernel selection and, with
  `torch.compile`, compilation; they are timed separately (`Timing.warmup_s`) and never enter the
  figures.
- **Synchronise the device** before reading the host clock: CUDA work is asynchronous, so
  `torch.cuda.synchronize()` is called before the start and after the end of every timed region.
- **Repeat and report the median** with its spread (min, max and the interquartile range), never a
  single run or a mean that one slow outlier can move.
- **Measure the ceiling in the same run** (`matmul_peak`): a datasheet rate is a lead, and clocks,
  drivers and libraries differ between runs; ratios to a ceiling measured alongside are comparable.

Results are plain JSON (`write_json`) with the machine description (`machine_info`) at the top, so
a committed file in `benchmarks/results/` says where its numbers came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root (holds deepseek_edu/)

# Vendor datasheet rates (dense, no sparsity), in FLOP/s. Leads only: figures are divided by the
# ceiling measured in the same run; these are written next to it for comparison.
DATASHEET_PEAK_FLOPS = {
    # NVIDIA H100/H200 SXM datasheet: bf16 tensor core 989.5 TFLOP/s dense (1979 with sparsity),
    # TF32 494.7, plain fp32 66.9. nvidia-smi names the SXM part plainly "NVIDIA H200".
    "NVIDIA H200": {"bfloat16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.5e12, "tf32": 494.7e12, "float32": 66.9e12},
}


# --- machine description ---------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of `cmd` stripped, or None if it is missing, fails or hangs."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_digest() -> str:
    """sha256 (first 16 hex digits) of the package's Python sources, in path order.

    Ties a result to the exact code even when the tree was dirty or travelled without `.git`:
    two runs with the same digest ran the same `deepseek_edu`.
    """
    h = hashlib.sha256()
    for path in sorted((ROOT / "deepseek_edu").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_info() -> dict[str, Any]:
    """Commit of the repository, whether the tree had uncommitted changes, and `package_digest`.

    Where the tree travelled without `.git` (the GPU machine gets a copy), the commit can be passed
    in the environment as DEEPSEEK_EDU_GIT_COMMIT.
    """
    commit = _run(["git", "rev-parse", "HEAD"], cwd=ROOT)
    if commit is None:
        info = {"commit": os.environ.get("DEEPSEEK_EDU_GIT_COMMIT"), "dirty": None,
                "source": "environment DEEPSEEK_EDU_GIT_COMMIT" if "DEEPSEEK_EDU_GIT_COMMIT" in os.environ
                else "unavailable"}
    else:
        status = _run(["git", "status", "--porcelain"], cwd=ROOT)
        info = {"commit": commit, "dirty": bool(status), "source": "git"}
    info["package_sha256_16"] = package_digest()
    return info


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, threads, Python, torch, and the GPU if one is used."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes on the same cores slow every figure: the load when the run started.
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest" = no TF32
        "git": git_info(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "l2_cache_MB": round(getattr(props, "L2_cache_size", 0) / 1e6, 1) or None,
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "cudnn": torch.backends.cudnn.version(),
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


# --- timing ------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of each warmup call (excluded from figures) and of each timed repeat.

    `cpu_samples_s` is the process's CPU time (all its threads) of each timed repeat. With one
    thread on a CPU run it leaves out the time spent waiting for a core while other work runs (not
    the shared caches and memory bandwidth); with several threads it also counts their spinning,
    so read it only for one.
    """

    warmup_s: list[float] = field(default_factory=list)
    samples_s: list[float] = field(default_factory=list)
    cpu_samples_s: list[float] = field(default_factory=list)


def time_repeats(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """Call `fn` `warmup` times, then `repeats` times, timing each call on the host clock.

    The device is synchronised before and after each call, so a sample covers all the work `fn`
    queued. Returns the per-call seconds of both phases (and the CPU time of the timed calls).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    timing = Timing()
    for phase, n in ((timing.warmup_s, warmup), (timing.samples_s, repeats)):
        for _ in range(n):
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            phase.append(time.perf_counter() - t0)
            if phase is timing.samples_s:
                timing.cpu_samples_s.append(time.process_time() - c0)
    return timing


def summarize(values: list[float], unit: str) -> dict[str, Any]:
    """Median, spread (min, max, quartiles) and count of `values`, with their unit."""
    if not values:
        raise ValueError("summarize needs at least one value")
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[i] for i in (0, 2)) \
        if len(values) > 1 else (values[0], values[0])
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": q1, "q3": q3, "n": len(values), "unit": unit}


def rate(amount: float, timing: Timing, unit: str) -> dict[str, Any]:
    """`amount` of work per call over each timed call: summary of amount / wall seconds."""
    return summarize([amount / s for s in timing.samples_s], unit)


def rate_per_cpu_second(amount: float, timing: Timing, unit: str) -> dict[str, Any]:
    """`amount` per second of process CPU time: less sensitive to other load for a one-thread CPU run."""
    return summarize([amount / max(s, 1e-9) for s in timing.cpu_samples_s], unit + " per CPU-second")


def machine_load() -> float | None:
    """1-minute load average (runnable processes, all users), or None where unavailable."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --- ceilings ---------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10, inner: int = 1,
                warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Measured matrix-product ceiling: FLOP/s of an (n x n) @ (n x n) product on random data.

    Random normal inputs, never zeros (zeros ran 13% faster on an H200). Each sample times `inner`
    back-to-back products between two synchronisations; FLOPs per product = 2 n^3.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def products() -> None:
        for _ in range(inner):
            torch.matmul(a, b, out=c)  # noqa: F821 (deleted later; ruff reads the del as unbinding)

    timing = time_repeats(products, device, repeats=repeats, warmup=warmup)
    flops = 2.0 * n**3 * inner
    result = {"n": n, "dtype": str(dtype).removeprefix("torch."), "inner": inner,
              "flops_per_s": rate(flops, timing, "FLOP/s")}
    if device.type == "cpu":
        result["flops_per_cpu_s"] = rate_per_cpu_second(flops, timing, "FLOP")
    del a, b, c
    return result


def datasheet_peak(device: torch.device, dtype_name: str) -> float | None:
    """Vendor dense peak in FLOP/s for this GPU and dtype name, or None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    return DATASHEET_PEAK_FLOPS.get(torch.cuda.get_device_name(device), {}).get(dtype_name)


# --- results ----------------------------------------------------------------------------------------
def command_line(script: str, argv: list[str] | None = None) -> str:
    """How the script was run, for the JSON: `python benchmarks/<script> ARGS`, with the machine's own
    folders written as variables ($OUT for the device tool's output folder, $TMPDIR, ~), so that no
    committed result names a path of the machine that made it."""
    text = " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else list(argv))])
    for path, name in ((os.environ.get("OUT"), "$OUT"), (tempfile.gettempdir(), "$TMPDIR"),
                       (str(Path.home()), "~")):
        if path and len(path) > 1:
            text = text.replace(path.rstrip("/") + "/", name + "/")
    return text


def seed_stats(values: list[float]) -> dict[str, Any]:
    """Per-seed values with their mean, sample standard deviation (0 for one seed), min and max."""
    return {"per_seed": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)  # a run killed mid-write leaves the previous complete file
    return path
