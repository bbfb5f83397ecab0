"""Where one training step's time goes: torch.profiler over a few steps of a preset, kernels ranked.

The same step as `train_throughput.py` (forward, the training loss, backward, clipping, AdamW, the
bias update), for a preset or its dense counterpart at equal activated parameters, eager or
compiled. Prints and writes (``--out``) the host and device time per step and the kernels with the
most device time, each with its share; kernels are grouped by name (a compiled graph's fused
triton kernels keep their generated names, which say what they fuse).

Run (from the repository root; a CUDA device gives the kernel table, a CPU gives operator times)::

    python benchmarks/profile_train_step.py --device cuda --preset small --compile default
    python benchmarks/profile_train_step.py --device cuda --preset small --dense --compile default
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, train_throughput
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import command_line, machine_info, now_utc, write_json  # noqa: E402
from train_throughput import SMALL_BATCH, SMALL_SEQ_LEN, dense_counterpart, make_train_step, random_batches  # noqa: E402

from deepseek_edu.config import PRESETS, TrainConfig, get_preset  # noqa: E402
from deepseek_edu.model import Transformer  # noqa: E402
from deepseek_edu.train import make_optimizer  # noqa: E402


def profile(preset: str, dense: bool, compile_mode: str | None, device: torch.device, batch: int, seq_len: int,
            warmup: int, steps: int, top: int) -> dict[str, Any]:
    """Profile `steps` bf16 (CUDA) or fp32 (CPU) training steps after `warmup` unprofiled ones."""
    cfg = dense_counterpart(get_preset(preset)) if dense else get_preset(preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    tc = TrainConfig()
    model = Transformer(cfg).to(device).train()
    opt = make_optimizer(model, tc)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    batches = itertools.cycle(random_batches(cfg.vocab_size, batch, seq_len, 4, device, 0))

    step = make_train_step(model, forward, opt, tc, batches, device, dtype)

    for _ in range(warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"
    rows: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        t = e.self_device_time_total if on_device else e.self_cpu_time_total  # microseconds
        # On the device a `record_function` range (torch.optim's "Optimizer.step#AdamW.step", say) shows
        # up as a GPU user annotation spanning the kernels it launched: counting it would count those
        # kernels twice. On the host its self time is its own and stays.
        if on_device and getattr(e, "is_user_annotation", False):
            continue
        if t > 0 and (not on_device or e.device_type == torch.autograd.DeviceType.CUDA):
            rows[e.key][0] += t
            rows[e.key][1] += e.count
    device_us = sum(t for t, _ in rows.values())
    host_us = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])
    table = [{"kernel": k[:160], "ms_per_step": t / 1e3 / steps, "share": t / device_us, "calls_per_step": n / steps}
             for k, (t, n) in ranked[:top]]
    return {"preset": preset, "dense_counterpart": dense, "compile": compile_mode or False,
            "dtype": str(dtype).removeprefix("torch."), "batch": batch, "seq_len": seq_len, "steps": steps,
            "host_ms_per_step": host_us / 1e3 / steps,
            ("device_ms_per_step" if on_device else "cpu_op_ms_per_step"): device_us / 1e3 / steps,
            "kernels_per_step": sum(n for _, n in rows.values()) / steps, "top": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default="small",
                        choices=[name for name in PRESETS if not name.startswith("deepseek-")])
    parser.add_argument("--dense", action="store_true", help="its dense counterpart at equal activated parameters")
    parser.add_argument("--compile", choices=("off", "default"), default="off")
    parser.add_argument("--batch", type=int, default=SMALL_BATCH)
    parser.add_argument("--seq-len", type=int, default=SMALL_SEQ_LEN)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if min(args.batch, args.seq_len, args.warmup, args.steps, args.top) < 1:
        parser.error("--batch, --seq-len, --warmup, --steps and --top must be >= 1")
    if args.seq_len > PRESETS[args.preset].max_seq_len:
        parser.error(f"--seq-len={args.seq_len} exceeds the preset's max_seq_len={PRESETS[args.preset].max_seq_len}")
    device = torch.device(args.device)
    result = profile(args.preset, args.dense, None if args.compile == "off" else args.compile, device,
                     args.batch, args.seq_len, args.warmup, args.steps, args.top)
    payload = {"benchmark": "profile_train_step", "created_utc": now_utc(),
               "command": command_line("profile_train_step.py", argv), "machine": machine_info(device), **result}
    if args.out is not None:
        write_json(args.out, payload)
    name = f"{args.preset}{' dense counterpart' if args.dense else ''}, compile {result['compile']}"
    time_key = "device_ms_per_step" if device.type == "cuda" else "cpu_op_ms_per_step"
    print(f"{name}: host {result['host_ms_per_step']:.1f} ms/step, {time_key} {result[time_key]:.1f}, "
          f"{result['kernels_per_step']:.0f} kernels/step")
    for row in result["top"]:
        print(f"  {row['ms_per_step']:8.3f} ms {100 * row['share']:5.1f}%  x{row['calls_per_step']:<5.0f} "
              f"{row['kernel'][:110]}")
    return payload


if __name__ == "__main__":
    main()
