"""Quantisation error against scaling granularity on real activations of the trained tiny DeepSeek.

DeepSeek-V3 §3.3.1: activations have outlier channels, so one scale per tensor (or per token)
wastes E4M3's few bits on the rest; V3 scales activations per 1 x 128 tile and weights per
128 x 128 block. Per seed, this script trains the `tiny` preset in FP32 for `--steps` steps, captures
the input of every linear layer on held-out text, and for each input reports how far its outlier
channels stand out (largest channel max |x| over the median channel's) and the relative error
||x - dq(q(x))|| / ||x|| at four granularities: tensorwise, per row, 1 x b tiles, b x b blocks
(b = 128, V3's, and b = 32: our model is 96 wide, so b = 32 gives V3's ratio of tiles per row
more nearly). Means over layers and seeds come last.

Run (from the repository root, a few minutes on one busy core)::

    python benchmarks/fp8_granularity.py --out benchmarks/results/fp8_granularity_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import command_line, machine_info, machine_load, now_utc, write_json

from deepseek_edu.config import get_preset
from deepseek_edu.data import BatchSampler, load_dataset
from deepseek_edu.fp8_experiments import (
    GRANULARITY_NAMES,
    capture_linear_inputs,
    channel_outliers,
    granularity_errors,
    train_run,
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--block-sizes", default="128,32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    ds = load_dataset("shakespeare", cfg.vocab_size, progress=False)
    seeds = [int(s) for s in args.seeds.split(",")]
    blocks = [int(b) for b in args.block_sizes.split(",")]
    t0 = time.perf_counter()
    per_seed = {}
    for seed in seeds:
        r = train_run(cfg, ds.train, ds.val, "fp32", seed, args.steps, 8, 64, data_seed=seed, return_model=True)
        x, _ = BatchSampler(ds.val, 8, 128, seed=99).batch(0)
        inputs = capture_linear_inputs(r["model"], x)
        layers = {}
        for name, act in inputs.items():
            if act.shape[0] < 16:
                continue  # an expert that received few tokens: too little to measure
            layers[name] = {"shape": list(act.shape), "outliers": channel_outliers(act),
                            **{f"b{b}": granularity_errors(act, b) for b in blocks}}
        per_seed[str(seed)] = {"val_loss": r["val_loss"], "layers": layers}
        print(f"seed {seed}: trained to val loss {r['val_loss']:.3f}, {len(layers)} linear inputs", flush=True)
    summary = {}
    for b in blocks:
        summary[f"b{b}"] = {g: statistics.fmean(lay[f"b{b}"][g]["rel_error"] for s in per_seed.values()
                                                for lay in s["layers"].values()) for g in GRANULARITY_NAMES}
    outl = [lay["outliers"]["max_over_median"] for s in per_seed.values() for lay in s["layers"].values()]
    payload = {"script": "benchmarks/fp8_granularity.py", "command": command_line(__file__, argv),
               "date_utc": now_utc(), "machine": machine_info(torch.device("cpu")),
               "load_average_1min_at_end": machine_load(), "wall_s": time.perf_counter() - t0,
               "config": vars(args), "per_seed": per_seed, "mean_rel_error": summary,
               "outlier_ratio": {"median": statistics.median(outl), "max": max(outl)}}
    for b in blocks:
        print(f"block {b}: " + ", ".join(f"{g} {summary[f'b{b}'][g]:.4%}" for g in GRANULARITY_NAMES))
    print(f"outlier ratio (max channel / median channel): median {statistics.median(outl):.1f}, max {max(outl):.1f}")
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
