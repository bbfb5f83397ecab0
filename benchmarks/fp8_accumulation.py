"""Accumulation precision of an FP8 GEMM: maximum relative error against K, with and without promotion.

DeepSeek-V3 §3.3.2: the H800's FP8 tensor-core GEMM keeps about 14 bits of its running sum; at
K = 4096 a GEMM's maximum relative error reached nearly 2%. Promoting the partial sums to an FP32
accumulator every N_C = 128 elements removes it. `deepseek_edu.fp8.limited_precision_matmul`
emulates both (its docstring states the model: one product added at a time, the sum truncated to
14 explicit mantissa bits); the reference multiplies the same FP8 inputs in fp64. Error:
max |C - C_ref| / max |C_ref| (`max_relative_error`). The acceptance checks are written with the numbers.

Run (from the repository root, under a minute)::

    python benchmarks/fp8_accumulation.py --out benchmarks/results/fp8_accumulation_cpu.json
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

from deepseek_edu.fp8_experiments import accumulation_sweep

V3_ERROR_AT_4096 = 0.02


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="128,256,512,1024,2048,4096,8192")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--mantissa-bits", type=int, default=14)
    p.add_argument("--n-c", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    rows = accumulation_sweep(ks, seeds, args.m, args.n, args.mantissa_bits, args.n_c)
    by_k = {}
    for k in ks:
        sel = [r for r in rows if r["k"] == k]
        by_k[str(k)] = {key: {"mean": statistics.fmean(r[key] for r in sel), "max": max(r[key] for r in sel),
                              "min": min(r[key] for r in sel)} for key in ("no_promotion", "promotion")}
    at = by_k.get("4096")
    acceptance = {} if at is None else {
        "no_promotion_at_4096_within_1.5x_of_2pct": V3_ERROR_AT_4096 / 1.5 <= at["no_promotion"]["mean"] <= V3_ERROR_AT_4096 * 1.5,
        "promotion_at_4096_below_0.1pct": at["promotion"]["max"] < 0.001,
    }
    payload = {"script": "benchmarks/fp8_accumulation.py", "command": command_line(__file__, argv),
               "date_utc": now_utc(), "machine": machine_info(torch.device("cpu")),
               "load_average_1min_at_end": machine_load(), "wall_s": time.perf_counter() - t0,
               "config": vars(args), "v3_error_at_4096": V3_ERROR_AT_4096,
               "rows": rows, "by_k": by_k, "acceptance": acceptance}
    print(f"{'K':>6} {'no promotion':>14} {'N_C promotion':>14}")
    for k in ks:
        b = by_k[str(k)]
        print(f"{k:>6} {b['no_promotion']['mean']:>13.4%} {b['promotion']['mean']:>13.4%}")
    print("acceptance:", acceptance)
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
