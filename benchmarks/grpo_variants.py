"""GRPO vs Dr. GRPO vs DAPO from one supervised starting point: R1-Zero in miniature, on a CPU.

One tiny DeepSeek (MLA + DeepSeekMoE, `grpo.task_model_config`) learns the R1-Zero layout and part
of the task from worked solutions (`grpo.supervised_finetune`); its held-out greedy accuracy is
measured; then each loss variant starts from that *same* checkpoint and runs the same number of
GRPO steps with the same seeds (same prompts, same sampling stream as far as the policies agree):

- **grpo**: DeepSeekMath §4.1: std-scaled group advantages, mean over each output's tokens then
  over outputs, clip ε = 0.2, k3 KL to the SFT model with β;
- **dr_grpo**: Dr. GRPO: mean-centred advantages, token sums divided by the constant response
  budget, same clip and KL;
- **dapo**: DAPO: std-scaled advantages, token-level mean over the batch, clip-higher (0.2, 0.28),
  groups with all-equal rewards dropped, no KL.

Every seed (``--seeds 0,1,2``) repeats the whole experiment: its own SFT model (seeded init and
data), then each variant from it; the spread over seeds is the honest error bar of a gain measured
on one small model. ``--jobs N`` runs the (seed, variant) pairs in N processes; each process
repeats its seed's SFT, which is deterministic on one machine and thread count, and the script
checks that every variant of a seed started from bit-identical weights (a checksum).

Recorded per seed and variant: the held-out greedy accuracy every `--eval-every` steps (the same
`--n-eval` distinct test problems, disjoint from every training problem), and per step the mean
reward, accuracy and format rate of the sampled batch, response length, KL to the SFT model, clip
fraction and the share of zero-variance groups; the wall time. The acceptance check -- held-out
accuracy after GRPO at least 15 points above the SFT model's, and at least 3 binomial standard
errors of the difference, sqrt(p0(1-p0)/n + p1(1-p1)/n) -- is written with the numbers, per seed,
whatever they say.

Run (from the repository root; one seed, 100 steps: about 5 minutes of one CPU core)::

    python benchmarks/grpo_variants.py --threads 1 --seeds 0,1,2 --jobs 9 --n-eval 500 \
        --out benchmarks/results/grpo_variants_cpu.json
    python benchmarks/grpo_variants.py --quick     # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import command_line, machine_info, machine_load, now_utc, write_json

from deepseek_edu.config import GRPO_VARIANTS, GRPOConfig
from deepseek_edu.grpo import evaluate, grpo_train, supervised_finetune, task_model_config
from deepseek_edu.model import Transformer
from deepseek_edu.tasks import CharTokenizer, make_task

TARGET_GAIN = 0.15  # the first acceptance: +15 points of held-out accuracy over the SFT model
TARGET_SE = 3.0  # the second: the gain is at least 3 binomial standard errors of the difference


def gain_in_se(before: float, after: float, n: int) -> float:
    """(after - before) / sqrt(before(1-before)/n + after(1-after)/n): the gain in standard errors of
    the difference of two independent binomial proportions (conservative: both are measured on the
    same n problems, whose pairing would only shrink the error)."""
    se = math.sqrt(before * (1 - before) / n + after * (1 - after) / n)
    return (after - before) / se if se > 0 else (math.inf if after > before else 0.0)


def _checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_pair(seed: int, variant: str, cfg: GRPOConfig, task_name: str, n_eval: int, threads: int) -> dict[str, Any]:
    """SFT with `seed`, then `variant`'s GRPO from that checkpoint; everything one (seed, variant) records."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer, task = CharTokenizer(), make_task(task_name)
    model = Transformer(task_model_config())
    test = task.problems(n_eval, "test", seed=12345, distinct=True)
    t0 = time.perf_counter()
    sft_losses = supervised_finetune(model, tokenizer, task, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr,
                                     seed, progress=False, schedule_steps=cfg.sft_schedule_steps)
    sft_seconds = time.perf_counter() - t0
    sft_eval = evaluate(model, tokenizer, test, cfg.max_new_tokens)
    checksum = _checksum(model)
    ref = copy.deepcopy(model)
    res = grpo_train(model, tokenizer, task, cfg, test, ref_model=ref, progress=False)
    evals = [{"step": 0, **sft_eval}] + res.evals
    return {"seed": seed, "variant": variant, "sft_losses": sft_losses, "sft_seconds": sft_seconds,
            "sft_eval": sft_eval, "sft_checksum": checksum, "n_parameters": model.num_parameters(),
            "model": model.cfg.to_dict(), "config": cfg.to_dict(), "evals": evals, "history": res.history,
            "seconds": res.elapsed, "accuracy_final": evals[-1]["accuracy"],
            "accuracy_best": max(e["accuracy"] for e in evals)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    d = GRPOConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=d.task)
    p.add_argument("--variants", default=",".join(GRPO_VARIANTS), help="comma-separated loss variants")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps)
    p.add_argument("--steps", type=int, default=d.steps, help="GRPO steps per variant")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--sft-schedule-steps", type=int, default=d.sft_schedule_steps,
                   help="steps the SFT cosine is laid out over (larger: stop SFT before it anneals)")
    p.add_argument("--lr", type=float, default=d.lr, help="GRPO learning rate")
    p.add_argument("--updates-per-batch", type=int, default=d.updates_per_batch, help="mu: optimizer steps per batch")
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    p.add_argument("--seeds", default=str(d.seed), help="comma-separated seeds; each repeats SFT and every variant")
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    p.add_argument("--jobs", type=int, default=1, help="processes running (seed, variant) pairs at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.sft_steps, args.steps, args.eval_every, args.n_eval = 5, 2, 1, 8
    seeds = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {args.seeds!r} must name distinct integers")
    variants = [v for v in args.variants.split(",") if v]
    configs = {(s, v): GRPOConfig.for_variant(v, task=args.task, steps=args.steps, eval_every=args.eval_every,
                                              n_eval=args.n_eval, sft_steps=args.sft_steps, seed=s,
                                              lr=args.lr, updates_per_batch=args.updates_per_batch,
                                              sft_schedule_steps=0 if args.quick else args.sft_schedule_steps)
               for s in seeds for v in variants}
    machine = machine_info(torch.device("cpu"))
    if (machine_load() or 0) > 1:
        print(f"warning: load average {machine_load():.1f}: wall times include waiting for a core", flush=True)

    t0 = time.perf_counter()
    pairs = list(configs)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            futures = [ex.submit(run_pair, s, v, configs[s, v], args.task, args.n_eval, args.threads) for s, v in pairs]
            done = [f.result() for f in futures]
    else:
        done = [run_pair(s, v, configs[s, v], args.task, args.n_eval, args.threads) for s, v in pairs]
    wall = time.perf_counter() - t0

    runs: dict[str, dict[str, Any]] = {v: {} for v in variants}
    sft: dict[str, Any] = {}
    for r in done:
        s, v = r["seed"], r["variant"]
        first = sft.setdefault(str(s), {"losses": r["sft_losses"], "seconds": r["sft_seconds"], "eval": r["sft_eval"],
                                        "checksum": r["sft_checksum"]})
        if first["checksum"] != r["sft_checksum"]:
            raise RuntimeError(f"seed {s}: variant {v} started from different SFT weights than the first variant")
        se = gain_in_se(r["sft_eval"]["accuracy"], r["accuracy_final"], args.n_eval)
        runs[v][str(s)] = {k: r[k] for k in ("config", "evals", "history", "seconds", "accuracy_final", "accuracy_best")}
        runs[v][str(s)].update(gain_final=r["accuracy_final"] - r["sft_eval"]["accuracy"], gain_se=se)
        print(f"seed {s} {v:8s} held-out accuracy {r['sft_eval']['accuracy']:.3f} -> {r['accuracy_final']:.3f} "
              f"({se:+.1f} SE; best {r['accuracy_best']:.3f}) in {r['seconds']:.0f} s", flush=True)

    summary = {}
    for v, by_seed in runs.items():
        g = [r["gain_final"] for r in by_seed.values()]
        summary[v] = {"gain_mean": statistics.fmean(g), "gain_min": min(g), "gain_max": max(g),
                      "gain_se_min": min(r["gain_se"] for r in by_seed.values())}
    payload = {
        "benchmark": "grpo_variants", "created": now_utc(), "machine": machine,
        "load_average_1min_at_end": machine_load(), "wall_seconds": wall,
        "command": command_line("grpo_variants.py", argv),
        "settings": {"task": args.task, "variants": variants, "seeds": seeds, "sft_steps": args.sft_steps,
                     "sft_schedule_steps": configs[pairs[0]].sft_schedule_steps, "steps": args.steps,
                     "eval_every": args.eval_every, "n_eval": args.n_eval, "jobs": args.jobs,
                     "threads_per_job": args.threads, "model": done[0]["model"],
                     "n_parameters": done[0]["n_parameters"]},
        "sft": sft,
        "runs": runs,
        "summary": summary,
        "acceptance": {
            "target_gain": TARGET_GAIN, "target_se": TARGET_SE,
            "met_by": [v for v, by_seed in runs.items()
                       if all(r["gain_final"] >= TARGET_GAIN and r["gain_se"] >= TARGET_SE for r in by_seed.values())],
        },
    }
    print(f"{'variant':8s} {'mean gain':>9s} {'min':>6s} {'max':>6s} {'min SE':>6s}  over seeds {seeds}")
    for v, sm in summary.items():
        print(f"{v:8s} {sm['gain_mean']:+9.3f} {sm['gain_min']:+6.3f} {sm['gain_max']:+6.3f} {sm['gain_se_min']:6.1f}")
    print(f"{wall:.0f} s wall with {args.jobs} job(s)")
    if args.out:
        write_json(args.out, payload)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
