"""Pre-training ablation: the tiny DeepSeek against its dense twin at equal activated parameters and tokens.

DeepSeekMoE §4 and DeepSeek-V2/V3 compare MoE models with dense ones of the same *activated* size:
the MoE layer holds E experts but a token uses K of them (plus the shared ones), so per token both
models do the same matmul work. This script trains, on the Shakespeare corpus, from the same seed
(same data order):

- **deepseek-tiny**: `PRESETS["tiny"]` (MLA, DeepSeekMoE with 8 routed experts top-2 + 1 shared,
  auxiliary-loss-free balancing, one MTP module);
- **dense-tiny**: `PRESETS["dense-tiny"]`, the same model with every FFN a dense SwiGLU of width
  (K + shared) * moe_inter_dim (= the MoE layer's activated width); attention, MTP and all else equal.

Both see exactly the same tokens (`--steps` x `--batch-size` x `--seq-len`). Per arm and seed: the
final validation loss of the main head (nats/token, cross-entropy over every window of the
validation split) and in bits per character, the validation curve, the MTP loss at the end, the
parameters (total and activated), training seconds. Per arm: mean, sample std, min and max over
seeds, and the paired per-seed differences (deepseek-tiny minus dense-tiny).

Run (from the repository root)::

    python benchmarks/pretrain_ablation.py --device cuda --steps 2000 --seeds 0,1,2 --jobs 6 \\
        --out benchmarks/results/pretrain_ablation_h200.json
    python benchmarks/pretrain_ablation.py --device cpu --steps 300 --seeds 0,1 --threads 1 --out /tmp/abl.json
    python benchmarks/pretrain_ablation.py --quick        # seconds: the smoke test

Needs the corpus in the data cache (``python -m deepseek_edu prepare``) or network access to fetch it.
On a GPU these tiny models are bound by kernel launches and Python, so --jobs runs the (arm, seed)
runs as parallel processes.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import command_line, machine_info, machine_load, now_utc, seed_stats, write_json  # noqa: E402

from deepseek_edu.analysis import count_params  # noqa: E402
from deepseek_edu.config import TrainConfig, get_preset  # noqa: E402

ARMS = {"deepseek-tiny": "tiny", "dense-tiny": "dense-tiny"}  # arm -> preset


def train_config(args: argparse.Namespace, seed: int, out_dir: str) -> TrainConfig:
    return TrainConfig(corpus="shakespeare", vocab_size=get_preset("tiny").vocab_size, seq_len=args.seq_len,
                       batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
                       warmup_steps=min(30, args.steps // 10), eval_every=max(args.steps // 10, 1),
                       eval_batches=args.eval_batches, seed=seed, device=args.device, threads=args.threads,
                       out_dir=out_dir)


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) and measure it. Runs in a worker process."""
    from deepseek_edu.data import load_dataset
    from deepseek_edu.train import Trainer, evaluate

    args = argparse.Namespace(**spec["args"])
    arm, seed = spec["arm"], spec["seed"]
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = get_preset(ARMS[arm])
    dataset = load_dataset("shakespeare", model_cfg.vocab_size, progress=False)
    with tempfile.TemporaryDirectory(prefix=f"pretrain-ablation-{arm}-{seed}-") as tmp:
        trainer = Trainer(model_cfg, train_config(args, seed, tmp), progress=False, dataset=dataset)
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        final_batches = args.final_eval_batches or 10**9  # 0: every window of the validation split
        full_val = evaluate(trainer.model, dataset.val, trainer.cfg.replace(eval_batches=final_batches))
        pc = count_params(model_cfg)  # main model + MTP modules: what one token activates, as they train
        params = {"total": trainer.model.num_parameters(), "activated": pc.activated + pc.mtp_activated}
    hist = result.history
    last = hist[-max(1, args.steps // 10):]
    mtp_keys = sorted({k for r in hist for k in r if k.startswith("mtp_ce")})
    chars_per_token = result.val_chars_per_token
    return {
        "arm": arm, "preset": ARMS[arm], "seed": seed, "steps": result.step, "seconds": round(seconds, 2),
        "tokens_seen": result.step * args.batch_size * args.seq_len,
        "parameters": params,
        "val_loss": full_val, "val_bits_per_char": full_val / math.log(2) / chars_per_token,
        "val_curve": [[r["step"], r["val_loss"]] for r in hist if r["val_loss"] is not None],
        "train_ce_last_mean": statistics.fmean(r["ce"] for r in last),
        "mtp_last_mean": {k: statistics.fmean(r[k] for r in last if k in r) for k in mtp_keys},
        "max_violation_last_mean": (statistics.fmean(r["max_violation"] for r in last)
                                    if "max_violation" in last[-1] else None),
    }


def summarize(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        by_seed = {r["seed"]: r for r in runs if r["arm"] == arm}
        done = [s for s in seeds if s in by_seed]
        if done:
            out[arm] = {"seeds": done, "parameters": by_seed[done[0]]["parameters"],
                        **{m: seed_stats([by_seed[s][m] for s in done])
                           for m in ("val_loss", "val_bits_per_char", "train_ce_last_mean", "seconds")}}
    return out


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Is deepseek-tiny's validation loss lower than dense-tiny's by more than the seed-to-seed spread?"""
    if not all(a in summary for a in ARMS):
        return {"complete": False}
    moe, dense = summary["deepseek-tiny"]["val_loss"], summary["dense-tiny"]["val_loss"]
    seeds = [s for s in summary["deepseek-tiny"]["seeds"] if s in summary["dense-tiny"]["seeds"]]
    vm = dict(zip(summary["deepseek-tiny"]["seeds"], moe["per_seed"]))
    vd = dict(zip(summary["dense-tiny"]["seeds"], dense["per_seed"]))
    paired = [vm[s] - vd[s] for s in seeds]
    diff = moe["mean"] - dense["mean"]
    spread = max(moe["std"], dense["std"])
    return {"complete": True, "seeds": seeds, "mean_difference": diff, "paired_differences": paired,
            "largest_std": spread, "lower_on_mean": diff < 0, "lower_every_seed": all(d < 0 for d in paired),
            "lower_by_more_than_spread": diff < 0 and -diff > spread}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (both arms)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (model init and batch order)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches of the periodic evaluations")
    p.add_argument("--final-eval-batches", type=int, default=0,
                   help="validation batches of the final evaluation (0 = the whole validation split)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (useful on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run; 0 = torch's default "
                                                          "(with --jobs: cores / jobs)")
    p.add_argument("--quick", action="store_true", help="20 steps, two seeds: the smoke test")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.quick:
        args.steps, args.seeds, args.batch_size, args.seq_len, args.eval_batches = 20, "0,1", 4, 32, 2
        args.final_eval_batches = 4
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.jobs > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    spec_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    specs = [{"arm": arm, "seed": seed, "args": spec_args} for seed in seeds for arm in ARMS]
    device = torch.device(args.device)
    payload: dict[str, Any] = {
        "benchmark": "pretrain_ablation",
        "created_utc": now_utc(),
        "command": command_line("pretrain_ablation.py", argv),
        "machine": machine_info(device),
        "settings": {"arms": ARMS, "model_configs": {a: get_preset(pr).to_dict() for a, pr in ARMS.items()},
                     "steps": args.steps, "seeds": seeds, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens_per_run": args.steps * args.batch_size * args.seq_len, "lr": args.lr,
                     "final_eval_batches": args.final_eval_batches or "all",
                     "schedule": "cosine, warmup min(30, steps/10), TrainConfig defaults otherwise",
                     "bf16_autocast": device.type == "cuda", "jobs": args.jobs},
        "method": ("Both arms train from the same seed (same batch order; the initial weights differ where the "
                   "FFNs differ) on the same number of tokens. val_loss: mean main-head cross-entropy over every "
                   "window of the validation split (deepseek_edu.train.evaluate), nats/token; bits/char = "
                   "val_loss / ln 2 / (validation characters per token). std: sample standard deviation over "
                   "seeds. Activated parameters: all minus the routed experts a token does not choose."),
        "runs": [],
    }

    def save() -> None:
        payload["runs"] = sorted(payload["runs"], key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
        payload["summary"] = summarize(payload["runs"], seeds)
        payload["verdict"] = verdict(payload["summary"])
        if args.out is not None:
            write_json(args.out, payload)

    def report(r: dict[str, Any]) -> None:
        payload["runs"].append(r)
        print(f"  {r['arm']:13s} seed {r['seed']}: val {r['val_loss']:.4f} nats/token "
              f"({r['val_bits_per_char']:.3f} bits/char), {r['seconds']:.0f} s", flush=True)
        save()

    print(f"device {device}, torch {torch.__version__}, {len(specs)} runs x {args.steps} steps x "
          f"{args.batch_size}x{args.seq_len} tokens, jobs {args.jobs}", flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, specs):
                report(r)
    else:
        for spec in specs:
            report(run_one(spec))
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    payload["finished_utc"] = now_utc()
    payload["load_average_1min_at_end"] = machine_load()
    save()
    print()
    for arm, m in payload["summary"].items():
        v, b = m["val_loss"], m["val_bits_per_char"]
        print(f"{arm:13s} {m['parameters']['total']:>10,} params ({m['parameters']['activated']:,} activated): "
              f"val {v['mean']:.4f} ± {v['std']:.4f} nats/token, {b['mean']:.3f} ± {b['std']:.3f} bits/char, "
              f"per seed {[round(x, 4) for x in v['per_seed']]}")
    vd = payload["verdict"]
    if vd.get("complete"):
        print(f"deepseek-tiny - dense-tiny: {vd['mean_difference']:+.4f} nats/token on the mean (paired "
              f"{[round(d, 4) for d in vd['paired_differences']]}); lower by more than the spread "
              f"({vd['largest_std']:.4f}): {vd['lower_by_more_than_spread']}")
    return payload


if __name__ == "__main__":
    main()
