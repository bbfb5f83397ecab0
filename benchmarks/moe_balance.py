"""Balancing ablation of DeepSeekMoE: expert-level aux loss vs auxiliary-loss-free bias vs neither.

DeepSeek-V3 §2.1.2 and §4.5.2 (Table 5) compare two ways of keeping the experts' load even:

- **aux-loss**: DeepSeekMoE's expert-level balance loss alpha_1 * sum_i f_i P_i added to the training
  loss (alpha_1 = 0.01, DeepSeekMoE §4.1), no selection bias (`bias_update_speed` = 0);
- **aux-free**: no balance loss; after every optimizer step each MoE layer moves its selection bias
  by gamma * sign(mean load - load_i) (`update_bias`), which only changes which experts are chosen;
- **none**: neither, as a control (routing is free to collapse onto a few experts).

All three arms train the same model (`PRESETS["moe-tiny"]` unless --preset says otherwise; the
complementary sequence-wise loss is off in every arm, so the arms differ in the balancing alone)
on the Shakespeare corpus with the same data order per seed. Per arm and seed it records:

- the final validation loss (nats/token, cross-entropy only, over the WHOLE validation split);
- MaxVio = (max_i load_i - mean load) / mean load of the step's batch (V3 §4.5.2), for every step and
  every MoE layer; reported as the worst layer's value: its mean over the last `--last` steps, its
  value at the final step, and the MaxVio of the load summed over the last `--last` steps (less noisy);
- the validation curve, the training loss and the final selection biases.

Per arm: each metric's per-seed values, mean, sample standard deviation, min and max. The
acceptance checks (aux-free MaxVio below none's; aux-free validation loss no worse than aux-loss's)
are written with the numbers and the paired per-seed differences, whatever they say.

Run (from the repository root)::

    python benchmarks/moe_balance.py --device cpu --steps 300 --seeds 0,1 --out /tmp/moe_balance_cpu.json
    python benchmarks/moe_balance.py --device cuda --steps 2000 --seeds 0,1,2 --jobs 9 \\
        --out benchmarks/results/moe_balance_h200.json
    python benchmarks/moe_balance.py --device cpu --quick     # seconds: the smoke test

On a GPU the tiny model is bound by kernel launches and Python, so --jobs runs the (arm, seed) runs
as parallel processes (each its own CUDA context). Needs the corpus in the data cache
(``python -m deepseek_edu prepare``) or network access to fetch it.
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

from deepseek_edu.config import TrainConfig, get_preset  # noqa: E402
from deepseek_edu.model import Transformer  # noqa: E402
from deepseek_edu.moe import max_violation  # noqa: E402

ARMS = ("aux-loss", "aux-free", "none")
ALPHA1 = 0.01  # DeepSeekMoE §4.1: expert-level balance factor at small scale
SERIES_POINTS = 100  # the per-step MaxVio series is stored as this many window means


def arm_config(preset: str, arm: str, gamma: float, alpha1: float) -> Any:
    """The ModelConfig of one arm: the preset with only the balancing switched."""
    base = get_preset(preset)
    balancing = {
        "aux-loss": dict(expert_aux_loss_alpha=alpha1, bias_update_speed=0.0),
        "aux-free": dict(expert_aux_loss_alpha=0.0, bias_update_speed=gamma),
        "none": dict(expert_aux_loss_alpha=0.0, bias_update_speed=0.0),
    }[arm]
    return base.replace(seq_aux_loss_alpha=0.0, **balancing)


def train_config(args: argparse.Namespace, seed: int, out_dir: str) -> TrainConfig:
    return TrainConfig(corpus="shakespeare", vocab_size=get_preset(args.preset).vocab_size, seq_len=args.seq_len,
                       batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
                       warmup_steps=min(30, args.steps // 10), eval_every=max(args.steps // 10, 1),
                       eval_batches=args.eval_batches, seed=seed, device=args.device, threads=args.threads,
                       out_dir=out_dir)


def _window_means(values: list[float], points: int) -> tuple[list[int], list[float]]:
    """(last step of each window, mean of the window): a long per-step series in `points` numbers."""
    n = len(values)
    size = max(1, math.ceil(n / points))
    steps, means = [], []
    for start in range(0, n, size):
        chunk = values[start:start + size]
        steps.append(start + len(chunk))
        means.append(round(sum(chunk) / len(chunk), 5))
    return steps, means


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) and measure its balance and validation loss. Runs in a worker process."""
    from deepseek_edu.data import load_dataset
    from deepseek_edu.train import Trainer, evaluate

    args = argparse.Namespace(**spec["args"])
    arm, seed = spec["arm"], spec["seed"]
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("shakespeare", get_preset(args.preset).vocab_size, progress=False)
    model_cfg = arm_config(args.preset, arm, args.gamma, args.alpha1)
    with tempfile.TemporaryDirectory(prefix=f"moe-balance-{arm}-{seed}-") as tmp:
        trainer = Trainer(model_cfg, train_config(args, seed, tmp), progress=False, dataset=dataset)
        model: Transformer = trainer.model
        n_layers = len(model.moe_layers())
        per_step: list[list[float]] = []  # [step][layer] MaxVio of that step's batch
        last_load = torch.zeros(n_layers, model_cfg.n_routed_experts)  # summed over the last `last` steps
        update = model.update_router_biases

        def update_and_record() -> list[torch.Tensor]:  # the trainer calls this once per optimizer step
            loads = update()
            per_step.append([max_violation(load) for load in loads])
            if trainer.step >= args.steps - args.last:  # trainer.step is incremented after this call
                last_load.add_(torch.stack(loads).cpu())
            return loads

        model.update_router_biases = update_and_record  # instance attribute shadows the method
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        final_batches = args.final_eval_batches or 10**9  # 0: every window of the validation split
        full_val = evaluate(model, dataset.val, trainer.cfg.replace(eval_batches=final_batches))
        biases = [moe.gate.bias.detach().cpu().tolist() for moe in model.moe_layers()]
    worst = [max(layers) for layers in per_step]
    last = worst[-args.last:]
    series_steps, series = _window_means(worst, SERIES_POINTS)
    hist = result.history
    return {
        "arm": arm, "seed": seed, "steps": result.step, "seconds": round(seconds, 2),
        "tokens_per_s": round(result.step * args.batch_size * args.seq_len / seconds, 1),
        "val_loss": full_val, "val_tokens": min(final_batches * args.batch_size * args.seq_len,
                                                  (dataset.val.numel() - 1) // args.seq_len * args.seq_len),
        "val_curve": [[r["step"], r["val_loss"]] for r in hist if r["val_loss"] is not None],
        "train_ce_last_mean": statistics.fmean(r["ce"] for r in hist[-args.last:]),
        "aux_loss_last_mean": statistics.fmean(r["aux_loss"] for r in hist[-args.last:]),
        "max_violation_last_mean": statistics.fmean(last),
        "max_violation_final": worst[-1],
        "max_violation_last_mean_per_layer": [statistics.fmean(s[i] for s in per_step[-args.last:])
                                              for i in range(n_layers)],
        "max_violation_of_summed_last_load": max(max_violation(load) for load in last_load),
        "load_summed_last": last_load.tolist(),
        "max_violation_series": {"window_end_step": series_steps, "worst_layer_window_mean": series},
        "selection_bias_final": [[round(b, 4) for b in layer] for layer in biases],
    }


METRICS = ("val_loss", "max_violation_last_mean", "max_violation_final", "max_violation_of_summed_last_load",
           "train_ce_last_mean")


def summarize_arms(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per arm and metric: per-seed values (in seed order), mean, std, min, max."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        by_seed = {r["seed"]: r for r in runs if r["arm"] == arm}
        done = [s for s in seeds if s in by_seed]
        if done:
            out[arm] = {"seeds": done, **{m: seed_stats([by_seed[s][m] for s in done]) for m in METRICS}}
    return out


def acceptance(summary: dict[str, Any]) -> dict[str, Any]:
    """The two claims of the issue, checked on the means and seed by seed (paired: same data order)."""
    if not all(a in summary for a in ARMS):
        return {"complete": False}
    free, aux, none = summary["aux-free"], summary["aux-loss"], summary["none"]
    seeds = [s for s in free["seeds"] if s in aux["seeds"] and s in none["seeds"]]

    def paired(a: dict, b: dict, metric: str) -> list[float]:
        va = dict(zip(a["seeds"], a[metric]["per_seed"]))
        vb = dict(zip(b["seeds"], b[metric]["per_seed"]))
        return [va[s] - vb[s] for s in seeds]

    vio = paired(free, none, "max_violation_last_mean")
    vio_final = paired(free, none, "max_violation_final")
    val = paired(free, aux, "val_loss")
    return {
        "complete": True, "seeds": seeds,
        "aux_free_maxvio_below_none": {
            "mean_aux_free": free["max_violation_last_mean"]["mean"], "mean_none": none["max_violation_last_mean"]["mean"],
            "paired_differences": vio, "holds_on_mean": free["max_violation_last_mean"]["mean"]
            < none["max_violation_last_mean"]["mean"], "holds_every_seed": all(d < 0 for d in vio),
            "final_step_paired_differences": vio_final, "final_step_holds_every_seed": all(d < 0 for d in vio_final),
        },
        "aux_free_val_loss_no_worse_than_aux_loss": {
            "mean_aux_free": free["val_loss"]["mean"], "mean_aux_loss": aux["val_loss"]["mean"],
            "paired_differences": val, "holds_on_mean": free["val_loss"]["mean"] <= aux["val_loss"]["mean"],
            "holds_every_seed": all(d <= 0 for d in val),
            "spread_note": "compare the mean difference with the per-arm std over seeds: a difference "
                           "smaller than the std is not a measured improvement",
        },
    }


def print_table(payload: dict[str, Any]) -> None:
    s = payload["summary"]
    print(f"\n{'arm':9s} {'val loss (nats/token)':>26s} {'MaxVio last-N mean':>22s} {'MaxVio final':>20s}")
    for arm, m in s.items():
        def f(key: str, digits: int) -> str:
            return f"{m[key]['mean']:.{digits}f} ± {m[key]['std']:.{digits}f}"
        print(f"{arm:9s} {f('val_loss', 4):>26s} {f('max_violation_last_mean', 3):>22s} "
              f"{f('max_violation_final', 3):>20s}")
        print(f"{'':9s} per seed val {['%.4f' % v for v in m['val_loss']['per_seed']]} "
              f"MaxVio {['%.3f' % v for v in m['max_violation_last_mean']['per_seed']]}")
    acc = payload["acceptance"]
    if acc.get("complete"):
        a, b = acc["aux_free_maxvio_below_none"], acc["aux_free_val_loss_no_worse_than_aux_loss"]
        print(f"aux-free MaxVio < none: mean {a['holds_on_mean']}, every seed {a['holds_every_seed']} "
              f"(paired {['%.3f' % d for d in a['paired_differences']]})")
        print(f"aux-free val <= aux-loss val: mean {b['holds_on_mean']}, every seed {b['holds_every_seed']} "
              f"(paired {['%+.4f' % d for d in b['paired_differences']]})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (model init and batch order)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--preset", default="moe-tiny", help="ModelConfig preset (an MoE one)")
    p.add_argument("--gamma", type=float, default=None,
                   help="bias update speed of the aux-free arm (default: the preset's bias_update_speed)")
    p.add_argument("--alpha1", type=float, default=ALPHA1, help="expert-level aux loss factor of the aux-loss arm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches of the periodic evaluations")
    p.add_argument("--final-eval-batches", type=int, default=0,
                   help="validation batches of the final evaluation; 0 = the whole validation split")
    p.add_argument("--last", type=int, default=None, help="steps at the end that MaxVio is averaged over "
                                                         "(default: a tenth of --steps, at least 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (useful on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run; 0 = torch's default "
                                                          "(with --jobs > 1: cores / jobs)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated arms to run (default all: {','.join(ARMS)}); the acceptance needs all three")
    p.add_argument("--quick", action="store_true", help="20 steps, one seed pair: the smoke test")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.quick:
        args.steps, args.seeds, args.batch_size, args.seq_len, args.eval_batches = 20, "0,1", 4, 32, 2
        args.final_eval_batches = 4
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.gamma is None:
        args.gamma = get_preset(args.preset).bias_update_speed
    if not get_preset(args.preset).uses_moe:
        p.error(f"--preset {args.preset} has no MoE layers")
    args.last = args.last or max(1, args.steps // 10)
    if args.jobs > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    spec_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        p.error(f"--arms {args.arms!r}: choose from {', '.join(ARMS)}")
    specs = [{"arm": arm, "seed": seed, "args": spec_args} for seed in seeds for arm in ARMS if arm in arms]

    device = torch.device(args.device)
    payload: dict[str, Any] = {
        "benchmark": "moe_balance",
        "created_utc": now_utc(),
        "command": command_line("moe_balance.py", argv),
        "machine": machine_info(device),
        "settings": {"preset": args.preset, "model_config_aux_free": arm_config(args.preset, "aux-free", args.gamma,
                                                                               args.alpha1).to_dict(),
                     "gamma": args.gamma, "alpha1": args.alpha1, "seq_aux_loss_alpha": 0.0,
                     "steps": args.steps, "seeds": seeds, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "lr": args.lr, "final_eval_batches": args.final_eval_batches or "all", "schedule": "cosine, warmup min(30, steps/10), TrainConfig defaults otherwise",
                     "bf16_autocast": device.type == "cuda", "last_steps_for_means": args.last, "jobs": args.jobs},
        "method": ("Each arm trains the same preset from the same seed (same initial weights and batch order); "
                   "only the balancing differs. val_loss: mean cross-entropy over every window of the validation "
                   "split (deepseek_edu.train.evaluate), nats/token, no aux loss. MaxVio per step: "
                   "(max load - mean load) / mean load over the step's batch, per MoE layer; the worst layer is "
                   "reported. std is the sample standard deviation over seeds."),
        "arms": {"aux-loss": f"expert-level aux loss alpha_1={args.alpha1}, bias_update_speed=0",
                 "aux-free": f"bias_update_speed={args.gamma}, no aux loss",
                 "none": "no aux loss, bias_update_speed=0"},
        "runs": [],
    }

    def save() -> None:
        runs = sorted(payload["runs"], key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
        payload["runs"] = runs
        payload["summary"] = summarize_arms(runs, seeds)
        payload["acceptance"] = acceptance(payload["summary"])
        if args.out is not None:
            write_json(args.out, payload)

    print(f"device {device}, torch {torch.__version__}, {len(specs)} runs x {args.steps} steps, gamma {args.gamma}, "
          f"alpha1 {args.alpha1}, jobs {args.jobs}, threads/run {args.threads or torch.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, specs):
                payload["runs"].append(r)
                print(f"  {r['arm']:9s} seed {r['seed']}: val {r['val_loss']:.4f}, MaxVio last-mean "
                      f"{r['max_violation_last_mean']:.3f}, {r['seconds']:.0f} s", flush=True)
                save()
    else:
        for spec in specs:
            r = run_one(spec)
            payload["runs"].append(r)
            print(f"  {r['arm']:9s} seed {r['seed']}: val {r['val_loss']:.4f}, MaxVio last-mean "
                  f"{r['max_violation_last_mean']:.3f}, {r['seconds']:.0f} s", flush=True)
            save()
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    payload["finished_utc"] = now_utc()
    payload["load_average_1min_at_end"] = machine_load()
    save()
    print_table(payload)
    return payload


if __name__ == "__main__":
    main()
