"""Speculative decoding with the MTP module as the draft: acceptance and tokens/s against plain greedy.

DeepSeek-V3 §5.4.3: drafting the second token with the MTP module, 85-90% of the drafts are accepted
and decoding runs about 1.8x as many tokens/s. This script measures the same on the course's `tiny`
preset (MLA + DeepSeekMoE + one MTP module, D = 1) trained on Shakespeare:

1. **Model.** Trains `PRESETS["tiny"]` with `deepseek_edu.train.Trainer` (bf16 autocast on CUDA) for
   `--train-steps` steps of `--batch-size` x `--seq-len` tokens, or loads `--checkpoint`. Records the
   validation loss of the main head and the teacher-forced MTP figures on validation windows:
   ``draft_agreement`` = how often the MTP module's argmax for t_{i+2} equals the main model's argmax at
   position i+1 (what decides acceptance when the text being decoded is the validation text), and
   both heads' top-1 accuracy against the text itself.
2. **Decoding.** `--prompts` prompts of `--prompt-len` tokens taken evenly from the validation split;
   each continued by `--new-tokens` tokens with `generate.generate` (greedy, KV cache) and with
   `generate.speculative_generate` (MTP draft, one verification forward per step). Every call is timed
   with `_common.time_repeats` (warmup excluded, device synchronised, median of `--repeats`);
   tokens/s counts new tokens and includes the prefill. ``same_tokens`` checks token-for-token
   equality per prompt (exact in fp32; in bf16 a near-tie can flip an argmax, see `speculative_generate`).
   ``acceptance_rate`` = accepted drafts / proposed drafts, over all prompts.
3. **Where the time goes.** On a warm cache (prompt-len positions) the median time of: one plain
   decoding step (main model, 1 position), one verification (main model, 2 positions), one draft
   (the MTP module on 1 and on 2 positions: after a rejection it recomputes 1 position, after an
   acceptance 2). The speed-up they predict, tokens_per_step x t_plain / (t_verify + t_draft), is set
   beside the measured one.

Run (from the repository root)::

    python benchmarks/speculative.py --device cuda --out benchmarks/results/speculative_h200.json \\
        --save-checkpoint /tmp/tiny_mtp.safetensors
    python benchmarks/speculative.py --device cpu --threads 1 --checkpoint /tmp/tiny_mtp.safetensors \\
        --out benchmarks/results/speculative_cpu.json
    python benchmarks/speculative.py --device cpu --quick        # seconds: the smoke test

Needs the Shakespeare corpus in the data cache (``python -m deepseek_edu prepare``; on a machine
without network the prepared cache travels with the call, ``DEEPSEEK_EDU_CACHE``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import (  # noqa: E402
    command_line,
    machine_info,
    machine_load,
    now_utc,
    summarize,
    time_repeats,
    write_json,
)

from deepseek_edu.config import TrainConfig, get_preset  # noqa: E402
from deepseek_edu.data import load_dataset  # noqa: E402
from deepseek_edu.generate import generate, speculative_generate  # noqa: E402
from deepseek_edu.model import Transformer  # noqa: E402
from deepseek_edu.train import Trainer, load_checkpoint, load_model  # noqa: E402

PAPER = {"acceptance_rate": [0.85, 0.90], "tokens_per_s_ratio": 1.8, "source": "DeepSeek-V3 §5.4.3"}
GOALS = {"acceptance_rate": 0.6, "speedup": 1.3}


# --- the model -------------------------------------------------------------------------------------------
def train_model(args: argparse.Namespace, dataset, device: torch.device) -> tuple[Transformer, dict[str, Any]]:
    cfg = get_preset(args.preset)
    out_dir = tempfile.mkdtemp(prefix="speculative_")
    tc = TrainConfig(corpus="shakespeare", vocab_size=cfg.vocab_size, seq_len=args.seq_len,
                     batch_size=args.batch_size, max_steps=args.train_steps, lr=args.lr,
                     warmup_steps=min(100, args.train_steps // 10), eval_every=0, eval_batches=args.eval_batches,
                     seed=args.seed, device=device.type, bf16=True, threads=args.threads, out_dir=out_dir)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, tc, progress=False, dataset=dataset)
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if args.save_checkpoint:
        shutil.copyfile(result.checkpoint_path, args.save_checkpoint)
    shutil.rmtree(out_dir, ignore_errors=True)
    last = result.history[-max(1, args.train_steps // 20):]
    info = {"source": "trained here", "train_config": tc.to_dict(), "train_seconds": round(seconds, 1),
            "val_loss": result.val_loss, "val_bits_per_char": result.val_bits_per_char,
            "unigram_cross_entropy": result.unigram_cross_entropy,
            "train_ce_last_5pct": statistics.fmean(r["ce"] for r in last),
            "train_mtp_ce_1_last_5pct": statistics.fmean(r["mtp_ce_1"] for r in last)}
    return result.model, info


def checkpoint_info(path: Path) -> dict[str, Any]:
    """How a checkpoint was trained, from its own metadata (train config, history, elapsed seconds)."""
    ckpt = load_checkpoint(path)
    hist = ckpt.history
    last = hist[-max(1, len(hist) // 20):]
    val = next((r["val_loss"] for r in reversed(hist) if r.get("val_loss") is not None), None)
    info: dict[str, Any] = {"source": f"checkpoint {path.name}, step {ckpt.step}",
                            "train_config": ckpt.train_config.to_dict() if ckpt.train_config else None,
                            "train_seconds": round(float(ckpt.extra.get("elapsed", 0.0)), 1), "val_loss": val}
    if last and "mtp_ce_1" in last[0]:
        info["train_ce_last_5pct"] = statistics.fmean(r["ce"] for r in last)
        info["train_mtp_ce_1_last_5pct"] = statistics.fmean(r["mtp_ce_1"] for r in last)
    return info


@torch.no_grad()
def teacher_forced(model: Transformer, tokens: torch.Tensor, windows: int, seq_len: int) -> dict[str, Any]:
    """Agreement of the MTP draft with the main model, and both heads' accuracy, on validation windows."""
    device = model.embed.weight.device
    n = min(windows, (tokens.numel() - 1) // seq_len)
    step = (tokens.numel() - seq_len - 1) // max(n, 1)
    x = torch.stack([tokens[i * step:i * step + seq_len] for i in range(n)]).to(device)  # (n, S)
    out = model(x)
    main = out.logits.argmax(-1)  # (n, S): main's guess for t_{i+1}
    draft = out.mtp_logits[0].argmax(-1)  # (n, S-1): depth 1's guess for t_{i+2}, position i
    return {"windows": n, "seq_len": seq_len,
            "draft_agreement": (draft == main[:, 1:]).float().mean().item(),
            "main_top1_accuracy": (main[:, :-1] == x[:, 1:]).float().mean().item(),
            "mtp_top1_accuracy": (draft[:, :-1] == x[:, 2:]).float().mean().item()}


# --- decoding --------------------------------------------------------------------------------------------
def decode(model: Transformer, prompts: list[torch.Tensor], args: argparse.Namespace,
           device: torch.device) -> dict[str, Any]:
    rows = []
    plain_s, spec_s, plain_cpu, spec_cpu = [], [], [], []
    drafted = accepted = steps = 0
    for i, prompt in enumerate(prompts):
        ref = generate(model, prompt, args.new_tokens)
        out = speculative_generate(model, prompt, args.new_tokens)
        t_plain = time_repeats(lambda: generate(model, prompt, args.new_tokens), device, args.repeats, warmup=1)
        t_spec = time_repeats(lambda: speculative_generate(model, prompt, args.new_tokens), device, args.repeats,
                              warmup=1)
        same = ref[0].tolist() == out.tokens[0].tolist()
        agree = sum(a == b for a, b in zip(ref[0].tolist(), out.tokens[0].tolist())) - prompt.numel()
        p_med, s_med = statistics.median(t_plain.samples_s), statistics.median(t_spec.samples_s)
        plain_s.append(p_med)
        spec_s.append(s_med)
        plain_cpu.append(statistics.median(t_plain.cpu_samples_s))
        spec_cpu.append(statistics.median(t_spec.cpu_samples_s))
        drafted += sum(out.drafted)
        accepted += sum(out.accepted)
        steps += out.steps
        rows.append({"prompt": i, "same_tokens": same, "same_tokens_fraction": agree / args.new_tokens,
                     "acceptance_rate": out.acceptance_rate, "tokens_per_step": out.tokens_per_step,
                     "plain_s": summarize(t_plain.samples_s, "s"), "speculative_s": summarize(t_spec.samples_s, "s"),
                     "plain_warmup_s": t_plain.warmup_s, "speculative_warmup_s": t_spec.warmup_s,
                     "speedup": p_med / s_med})
        print(f"prompt {i}: same tokens {same}, acceptance {out.acceptance_rate:.3f}, {out.tokens_per_step:.2f} "
              f"tokens/forward, plain {args.new_tokens / p_med:7.1f} tok/s, speculative "
              f"{args.new_tokens / s_med:7.1f} tok/s ({p_med / s_med:.2f}x)", flush=True)
    total = args.new_tokens * len(prompts)
    res = {
        "rows": rows,
        "all_same_tokens": all(r["same_tokens"] for r in rows),
        "acceptance_rate": accepted / max(drafted, 1),
        "tokens_per_step": total / (steps + len(prompts)),
        "plain_tokens_per_s": total / sum(plain_s),
        "speculative_tokens_per_s": total / sum(spec_s),
        "speedup": sum(plain_s) / sum(spec_s),
        "speedup_per_prompt": summarize([r["speedup"] for r in rows], "x"),
    }
    if device.type == "cpu":  # less sensitive to other processes on the cores (read it for one thread)
        res["plain_tokens_per_cpu_s"] = total / sum(plain_cpu)
        res["speculative_tokens_per_cpu_s"] = total / sum(spec_cpu)
        res["speedup_cpu_time"] = sum(plain_cpu) / sum(spec_cpu)
    return res


@torch.no_grad()
def breakdown(model: Transformer, prompt: torch.Tensor, args: argparse.Namespace, device: torch.device,
              tokens_per_step: float) -> dict[str, Any]:
    """Median time of each piece of a decoding step on a warm cache of len(prompt) positions."""
    P = prompt.numel()
    cache = model.new_cache(1, P + 4)
    out = model(prompt[None].to(device), cache)
    nxt = out.logits[0, -1].argmax().view(1, 1)
    two = torch.cat([nxt, nxt], 1)
    mtp = model.mtp[0]
    mcache = model.new_mtp_caches(1, P + 4)[0]
    h = out.hidden  # (1, P, D)
    mtp(h[:, :P - 2], prompt[None, 1:P - 1].to(device), model.embed, model.head, model.freqs_cis[:P - 2], mcache)

    def main_step(x):
        def fn():
            model(x, cache)
            cache.truncate(P)
        return fn

    def draft_step(n):
        def fn():
            mtp(h[:, P - 2:P - 2 + n], prompt[None, P - 1:P - 1 + n].to(device) if n == 1
                else torch.cat([prompt[None, P - 1:].to(device), nxt], 1), model.embed, model.head,
                model.freqs_cis[P - 2:P - 2 + n], mcache)
            mcache.truncate(P - 2)
        return fn

    reps = max(args.repeats * 10, 20)
    t = {"plain_step (main, 1 position)": time_repeats(main_step(nxt), device, reps, warmup=3),
         "verification (main, 2 positions)": time_repeats(main_step(two), device, reps, warmup=3),
         "draft (MTP, 1 position)": time_repeats(draft_step(1), device, reps, warmup=3),
         "draft (MTP, 2 positions)": time_repeats(draft_step(2), device, reps, warmup=3)}
    med = {k: statistics.median(v.samples_s) for k, v in t.items()}
    a = tokens_per_step - 1  # accepted drafts per step (D = 1): after an acceptance the draft sees 2 positions
    draft = (1 - a) * med["draft (MTP, 1 position)"] + a * med["draft (MTP, 2 positions)"]
    step = med["verification (main, 2 positions)"] + draft
    return {"cache_positions": P, "timings_s": {k: summarize(v.samples_s, "s") for k, v in t.items()},
            "draft_over_plain_step": draft / med["plain_step (main, 1 position)"],
            "verification_over_plain_step": med["verification (main, 2 positions)"] / med["plain_step (main, 1 position)"],
            "predicted_speedup": tokens_per_step * med["plain_step (main, 1 position)"] / step,
            "formula": "tokens_per_step * t_plain_step / (t_verification + t_draft), t_draft mixing the 1- and "
                       "2-position drafts by the acceptance rate; ignores the prefill and Python bookkeeping"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--preset", default="tiny", help="a ModelConfig preset with n_mtp_depth >= 1")
    p.add_argument("--checkpoint", type=Path, default=None, help="use this trained checkpoint instead of training")
    p.add_argument("--save-checkpoint", type=Path, default=None, help="copy the trained checkpoint here")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--prompts", type=int, default=None, help="prompts (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default: 128 CUDA, 96 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per call (default: 5 CUDA, 3 CPU)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="decoding dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--quick", action="store_true", help="30 training steps, 2 short prompts: the smoke test")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    args.prompts = args.prompts or (8 if cuda else 4)
    args.new_tokens = args.new_tokens or (128 if cuda else 96)
    args.repeats = args.repeats or (5 if cuda else 3)
    if args.quick:
        args.train_steps, args.batch_size, args.seq_len, args.eval_batches = 30, 4, 32, 2
        args.prompts, args.prompt_len, args.new_tokens, args.repeats = 2, 16, 24, 1
    if get_preset(args.preset).n_mtp_depth < 1:
        p.error(f"--preset {args.preset} has no MTP module")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    payload: dict[str, Any] = {
        "benchmark": "speculative",
        "created_utc": now_utc(),
        "command": command_line("speculative.py", argv),
        "machine": machine_info(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
            "decode_dtype": str(dtype).removeprefix("torch."), "batch_size_decoding": 1},
        "paper": PAPER,
        "goals": GOALS,
    }
    t0 = time.perf_counter()
    dataset = load_dataset("shakespeare", get_preset(args.preset).vocab_size, progress=False)
    if args.checkpoint is not None:
        model, _ = load_model(args.checkpoint, device)
        payload["model"] = checkpoint_info(args.checkpoint)
    else:
        model, payload["model"] = train_model(args, dataset, device)
        print(f"trained {args.train_steps} steps in {payload['model']['train_seconds']} s: val loss "
              f"{payload['model']['val_loss']:.3f} nats/token", flush=True)
    payload["model"]["config"] = model.cfg.to_dict()
    model = model.to(device=device, dtype=dtype).eval()
    torch.manual_seed(args.seed)
    val = dataset.val
    payload["teacher_forced"] = teacher_forced(model, val, windows=32, seq_len=args.seq_len)
    print(f"teacher-forced: draft agrees with the main model {payload['teacher_forced']['draft_agreement']:.3f}",
          flush=True)
    step = (val.numel() - args.prompt_len) // args.prompts
    prompts = [val[i * step:i * step + args.prompt_len].to(device) for i in range(args.prompts)]
    payload["load_before_decoding"] = machine_load()
    payload["decoding"] = decode(model, prompts, args, device)
    payload["breakdown"] = breakdown(model, prompts[0], args, device, payload["decoding"]["tokens_per_step"])
    payload["load_after_decoding"] = machine_load()
    dec = payload["decoding"]
    payload["acceptance"] = {
        "speculative_equals_greedy": dec["all_same_tokens"],
        "acceptance_rate_at_least_0.6": dec["acceptance_rate"] >= GOALS["acceptance_rate"],
        "speedup_at_least_1.3": dec["speedup"] >= GOALS["speedup"],
    }
    payload["total_seconds"] = round(time.perf_counter() - t0, 1)
    if args.out is not None:
        write_json(args.out, payload)
    b = payload["breakdown"]
    print(f"\n{'':34s}{'plain':>12s}{'speculative':>14s}")
    print(f"{'tokens/s (new tokens, prefill in)':34s}{dec['plain_tokens_per_s']:12.1f}{dec['speculative_tokens_per_s']:14.1f}")
    if "speedup_cpu_time" in dec:
        print(f"{'tokens per CPU-second':34s}{dec['plain_tokens_per_cpu_s']:12.1f}{dec['speculative_tokens_per_cpu_s']:14.1f}")
    print(f"speed-up {dec['speedup']:.2f}x (predicted from the step pieces {b['predicted_speedup']:.2f}x; draft = "
          f"{b['draft_over_plain_step']:.2f}, verification = {b['verification_over_plain_step']:.2f} plain steps); "
          f"acceptance {dec['acceptance_rate']:.3f}; {dec['tokens_per_step']:.2f} tokens per main forward; "
          f"same tokens: {dec['all_same_tokens']}; paper: 85-90%, 1.8x")
    return payload


if __name__ == "__main__":
    main()
