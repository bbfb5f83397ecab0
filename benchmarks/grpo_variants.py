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

Recorded per variant: the held-out greedy accuracy every `--eval-every` steps (the same
`--n-eval` distinct test problems, disjoint from every training problem), and per step the mean
reward, accuracy and format rate of the sampled batch, response length, KL to the SFT model, clip
fraction and the share of zero-variance groups; the wall time. The acceptance check -- held-out
accuracy after GRPO at least 15 points above the SFT model's -- is written with the numbers,
whatever they say.

Run (from the repository root; about 15 minutes on one CPU thread)::

    python benchmarks/grpo_variants.py --threads 1 --out benchmarks/results/grpo_variants_cpu.json
    python benchmarks/grpo_variants.py --quick     # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import command_line, machine_info, machine_load, now_utc, write_json  # noqa: E402

from deepseek_edu.config import GRPO_VARIANTS, GRPOConfig  # noqa: E402
from deepseek_edu.grpo import evaluate, grpo_train, supervised_finetune, task_model_config  # noqa: E402
from deepseek_edu.model import Transformer  # noqa: E402
from deepseek_edu.tasks import CharTokenizer, make_task  # noqa: E402

TARGET_GAIN = 0.15  # the acceptance: +15 points of held-out accuracy over the SFT model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    d = GRPOConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=d.task)
    p.add_argument("--variants", default=",".join(GRPO_VARIANTS), help="comma-separated loss variants")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps)
    p.add_argument("--steps", type=int, default=d.steps, help="GRPO steps per variant")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.sft_steps, args.steps, args.eval_every, args.n_eval = 5, 2, 1, 8
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    configs = {v: GRPOConfig.for_variant(v, task=args.task, steps=args.steps, eval_every=args.eval_every,
                                         n_eval=args.n_eval, sft_steps=args.sft_steps, seed=args.seed,
                                         sft_schedule_steps=0 if args.quick else d.sft_schedule_steps)
               for v in variants}
    base = configs[variants[0]]
    machine = machine_info(torch.device("cpu"))
    if (machine_load() or 0) > 1:
        print(f"warning: load average {machine_load():.1f}: wall times include waiting for a core", flush=True)

    torch.manual_seed(args.seed)
    tokenizer, task = CharTokenizer(), make_task(args.task)
    model = Transformer(task_model_config())
    test = task.problems(args.n_eval, "test", seed=12345, distinct=True)
    t0 = time.perf_counter()
    sft_losses = supervised_finetune(model, tokenizer, task, base.sft_steps, base.sft_batch_size, base.sft_lr,
                                     args.seed, progress=False, schedule_steps=base.sft_schedule_steps)
    sft_seconds = time.perf_counter() - t0
    sft_eval = evaluate(model, tokenizer, test, base.max_new_tokens)
    print(f"SFT: {base.sft_steps} steps in {sft_seconds:.0f} s, held-out accuracy {sft_eval['accuracy']:.3f}",
          flush=True)
    sft_state = copy.deepcopy(model.state_dict())

    runs = {}
    for v in variants:
        policy = Transformer(task_model_config())
        policy.load_state_dict(sft_state)
        ref = copy.deepcopy(policy)
        res = grpo_train(policy, tokenizer, task, configs[v], test, ref_model=ref, progress=False)
        evals = [{"step": 0, **sft_eval}] + res.evals
        runs[v] = {"config": configs[v].to_dict(), "evals": evals, "history": res.history,
                   "seconds": res.elapsed, "accuracy_final": evals[-1]["accuracy"],
                   "accuracy_best": max(e["accuracy"] for e in evals)}
        print(f"{v:8s} held-out accuracy {sft_eval['accuracy']:.3f} -> {evals[-1]['accuracy']:.3f} "
              f"(best {runs[v]['accuracy_best']:.3f}) in {res.elapsed:.0f} s", flush=True)

    gains = {v: r["accuracy_final"] - sft_eval["accuracy"] for v, r in runs.items()}
    payload = {
        "benchmark": "grpo_variants", "created": now_utc(), "machine": machine,
        "load_average_1min_at_end": machine_load(),
        "command": command_line("grpo_variants.py", argv),
        "settings": {"task": args.task, "variants": variants, "sft_steps": base.sft_steps,
                     "sft_schedule_steps": base.sft_schedule_steps, "steps": args.steps,
                     "eval_every": args.eval_every, "n_eval": args.n_eval, "seed": args.seed,
                     "model": model.cfg.to_dict(), "n_parameters": model.num_parameters()},
        "sft": {"losses": sft_losses, "seconds": sft_seconds, "eval": sft_eval},
        "runs": runs,
        "acceptance": {
            "target_gain": TARGET_GAIN, "gain_final": gains,
            "met_by": [v for v, g in gains.items() if g >= TARGET_GAIN],
        },
    }
    print(f"{'variant':8s} {'SFT':>6s} {'final':>6s} {'gain':>6s}")
    for v, g in gains.items():
        print(f"{v:8s} {sft_eval['accuracy']:6.3f} {runs[v]['accuracy_final']:6.3f} {g:+6.3f}")
    if args.out:
        write_json(args.out, payload)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
