"""Training and generation throughput of the course's models, with model FLOPs utilisation.

What is measured, for the dense baseline (`PRESETS["baseline"]`, batch 16 x seq 128 as in
`TrainConfig`) and, on CUDA, for a larger dense model that can fill a GPU, and for the one-GPU
DeepSeek (`PRESETS["small"]`: MLA, DeepSeekMoE, MTP) against its dense counterpart at equal
activated parameters (`small` with every FFN a dense SwiGLU of width (K + shared) * moe_inter_dim):

- **Training tokens/s**: one optimizer step = forward, the training loss of `deepseek_edu.train`
  (cross-entropy + the MoE balance loss + the MTP loss), backward, gradient clipping, AdamW and,
  for MoE models, the auxiliary-loss-free bias update (hyper-parameters of `TrainConfig`), on synthetic random token ids (seeded; no corpus).
  Baselines from the same run: fp32 eager; on CUDA also bf16 autocast eager and bf16 autocast with
  `torch.compile`.
- **Model FLOPs utilisation** (PaLM, Chowdhery et al. 2022, appendix B)::

      model FLOPs per token = 6 * N + 6 * n_attn_layers * n_heads * (d_qk + d_v) * seq_len
      MFU = tokens/s * model FLOPs per token / peak FLOP/s

  N counts the parameters one token *activates*, except the token embedding (the output head is
  included, once more per MTP depth, which applies it again; of an MoE layer only the K routed
  experts a token uses, the shared ones and the gate); the first term is the matmuls of forward (2N)
  and backward (4N), the second the attention scores and their weighted sum (QK^T with d_qk per
  head, AV with d_v; forward and backward, over every attention layer including the MTP blocks',
  counted over the full square as in PaLM even though a causal mask needs only half). For MHA
  d_qk = d_v = head_dim and the term is PaLM's 12 L H d T. Recomputation is not counted (that would be hardware FLOPs
  utilisation). The peak is *measured in the same run* as an 8192^3 matrix product in the
  variant's dtype (random data, as REFERENCE.md's "Measured ceilings"); the vendor's datasheet
  dense rate is written beside it.
- **Generation tokens/s**: greedy decoding of `deepseek_edu.generate.generate` (prefill once, then
  one position per step against the KV cache) for batch 1 and batch 16, against the baseline of
  recomputing the whole prefix for every new token (`greedy_full_recompute`); the ratio is the KV
  cache's speed-up. The fraction of tokens on which the two agree is recorded (1.0 in fp32; a
  near-tie in bf16 can flip an argmax).

Run (from the repository root)::

    python benchmarks/train_throughput.py --device cpu --out benchmarks/results/train_throughput_cpu.json
    python benchmarks/train_throughput.py --device cuda --out benchmarks/results/train_throughput_h200.json
    python benchmarks/train_throughput.py --device cpu --quick   # seconds; for the smoke test
    python benchmarks/train_throughput.py --device cpu --threads 1 ...   # on a shared, loaded machine

Needs torch >= 2.4 and the package modules config/model/generate only (no triton, no tokenizers;
`torch.compile` on CUDA uses the triton that ships with torch and is skipped with a note if it fails).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import (  # noqa: E402
    command_line,
    datasheet_peak,
    machine_info,
    machine_load,
    matmul_peak,
    now_utc,
    rate,
    rate_per_cpu_second,
    summarize,
    time_repeats,
    write_json,
)

from deepseek_edu.analysis import count_params  # noqa: E402
from deepseek_edu.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from deepseek_edu.generate import generate  # noqa: E402
from deepseek_edu.loss import training_loss  # noqa: E402
from deepseek_edu.model import Transformer  # noqa: E402
from deepseek_edu.optim import make_optimizer, optimizer_step  # noqa: E402

FLOPS_FORMULA = ("model FLOPs per token = 6 * N_activated_non_embedding + 6 * n_attn_layers * n_heads * "
                 "(d_qk + d_v) * seq_len (PaLM, Chowdhery et al. 2022, appendix B; N = the parameters one "
                 "token activates except the token embedding, output head included once per head "
                 "application (main + each MTP depth); no recomputation counted)")
MFU_FORMULA = "MFU = median training tokens/s * model FLOPs per token / median measured matmul FLOP/s"

# A dense config large enough to fill an H200 with one batch: ~208M non-embedding parameters
# (GPT-2-medium-like width), head_dim 64, SwiGLU width ~8/3 * dim rounded to 256, the baseline's
# 2048-token vocabulary, batch 16 x seq 1024 = 16384 tokens per step (~24 TFLOP per step).
LARGE_NAME = "dense-d1024-l16"
LARGE_CONFIG = ModelConfig(vocab_size=2048, dim=1024, n_layers=16, n_heads=16, inter_dim=2816,
                           max_seq_len=1024)
LARGE_BATCH, LARGE_SEQ_LEN = 16, 1024

GEN_BATCHES = (1, 16)  # generation batch sizes: one stream, and the training batch

# The one-GPU DeepSeek and its dense counterpart at equal activated parameters (issue: >= 0.6x).
SMALL_BATCH, SMALL_SEQ_LEN = 16, 1024


def dense_counterpart(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every FFN dense, of width (K + n_shared) * moe_inter_dim: the same activated FFN
    parameters per token; attention, MTP, vocabulary and everything else unchanged."""
    width = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim
    return cfg.replace(n_routed_experts=0, n_shared_experts=0, n_activated_experts=0,
                       n_dense_layers=cfg.n_layers, inter_dim=width)


# --- iteration counts -------------------------------------------------------------------------------
@dataclass
class Schedule:
    """How many times each measurement runs. Warmup calls are timed but excluded from the figures."""

    train_warmup: int  # whole steps before timing (the first compiles under torch.compile)
    train_repeats: int  # timed samples
    train_steps: int  # optimizer steps per timed sample
    large_repeats: int
    large_steps: int
    gen_warmup: int
    gen_repeats: int  # timed generate() calls (cached)
    gen_repeats_uncached: int  # timed full-recompute calls (slow on CPU)
    gen_warmup_uncached: int  # 0 on CPU: the cached calls before them already warmed the model
    prompt_len: int
    new_tokens: int
    matmul_n: int  # side of the square matmul ceiling
    matmul_repeats: int
    matmul_inner: int

    @classmethod
    def make(cls, device: torch.device, quick: bool) -> Schedule:
        if quick:
            return cls(train_warmup=1, train_repeats=2, train_steps=1, large_repeats=2, large_steps=1,
                       gen_warmup=1, gen_repeats=2, gen_repeats_uncached=2, gen_warmup_uncached=1,
                       prompt_len=8, new_tokens=8,
                       matmul_n=1024 if device.type == "cpu" else 4096, matmul_repeats=2, matmul_inner=1)
        if device.type == "cuda":
            return cls(train_warmup=5, train_repeats=10, train_steps=10, large_repeats=7, large_steps=3,
                       gen_warmup=2, gen_repeats=10, gen_repeats_uncached=10, gen_warmup_uncached=2,
                       prompt_len=32, new_tokens=96,
                       matmul_n=8192, matmul_repeats=10, matmul_inner=10)
        return cls(train_warmup=2, train_repeats=7, train_steps=2, large_repeats=3, large_steps=1,
                   gen_warmup=1, gen_repeats=7, gen_repeats_uncached=2, gen_warmup_uncached=0,
                   prompt_len=32, new_tokens=96,
                   matmul_n=2048, matmul_repeats=7, matmul_inner=1)


# --- FLOP accounting --------------------------------------------------------------------------------
def parameter_counts(model: Transformer) -> dict[str, int]:
    """Total, embedding and non-embedding parameters (the output head counts as non-embedding), and
    the non-embedding parameters one token activates: `analysis.count_params`'s activated count without
    the input embedding, plus the MTP modules', plus the output head once more per MTP depth (it is
    applied again there) and, when it is tied to the embedding, once for the main head."""
    cfg = model.cfg
    pc = count_params(cfg)
    head = model.head.weight.numel()  # V * D, whether or not it is the embedding matrix
    total = model.num_parameters()
    non_embedding = total - pc.embedding + (head if cfg.tie_embeddings else 0)
    activated = (pc.activated_non_embedding + pc.mtp_activated + (head if cfg.tie_embeddings else 0)
                 + cfg.n_mtp_depth * head)
    return {"total": total, "embedding": pc.embedding, "non_embedding": non_embedding,
            "activated_non_embedding": activated}


def model_flops_per_token(model: Transformer, seq_len: int) -> dict[str, int]:
    """Training FLOPs per token, PaLM appendix B: 6 N_activated + 6 L H (d_qk + d_v) T (module docstring)."""
    cfg = model.cfg
    n = parameter_counts(model)["activated_non_embedding"]
    dense = 6 * n
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.attn_head_dim
    attn_layers = cfg.n_layers + len(getattr(model, "mtp", None) or [])
    attention = 6 * attn_layers * cfg.n_heads * (d_qk + d_v) * seq_len
    return {"dense_6N": dense, "attention_6LH(dqk+dv)T": attention, "total": dense + attention}


# --- training ---------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def random_batches(vocab_size: int, batch: int, seq_len: int, n: int, device: torch.device,
                   seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` seeded (inputs, targets) pairs of random ids, each (batch, seq_len), targets shifted by one."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, batch, seq_len + 1), generator=gen).to(device)
    return [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(n)]


def make_train_step(model: Transformer, forward: Any, opt: torch.optim.Optimizer, tc: TrainConfig, batches: Any,
                    device: torch.device, dtype: torch.dtype, cudagraphs: bool = False) -> Any:
    """One optimizer step as the benchmarks time it: forward (through `forward`, the model or its
    compiled form) under autocast, the training loss, backward, clipping, AdamW, the bias update.
    Returns `step() -> loss` (detached, never read to the host: that would be a sync per step)."""

    def step() -> torch.Tensor:
        x, y = next(batches)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        with autocast(device, dtype):
            out = forward(x)  # logits (B, S, V) fp32
        # the training loss of train.py (CE + aux + MTP terms), as tensors: no host sync per step
        loss = training_loss(out, y, model.cfg.mtp_loss_weight).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # train.py's optimizer step (clip, AdamW, the MoE bias step) without the finite check, whose
        # host read per step these measurements leave out (no step is skipped on random ids anyway)
        optimizer_step(model, opt, None, tc.grad_clip, check_finite=False)
        return loss.detach()

    return step


COMPILE_MODES = {None: "eager", "default": "compile", "reduce-overhead": "compile-cudagraphs"}


def bench_training(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype, compile_mode: str | None,
                   device: torch.device, warmup: int, repeats: int, steps: int, seed: int) -> dict[str, Any]:
    """Tokens/s of full optimizer steps; returns figures, warmup times, losses and peak memory.

    `compile_mode`: None = eager; else `torch.compile(model, mode=compile_mode)` ("default", or
    "reduce-overhead", which replays the compiled forward and backward as CUDA graphs). The number
    of graph breaks torch.compile met is recorded (0 = the whole forward is one graph).
    """
    torch.manual_seed(seed)
    tc = TrainConfig()
    model = Transformer(cfg).to(device)
    model.train()
    opt = make_optimizer(model, tc)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    batches = itertools.cycle(random_batches(cfg.vocab_size, batch, seq_len, 4, device, seed))
    losses: list[torch.Tensor] = []

    step = make_train_step(model, forward, opt, tc, batches, device, dtype, cudagraphs=compile_mode == "reduce-overhead")

    def sample() -> None:
        for _ in range(steps):
            loss = step()
        losses.append(loss)  # no .item() here: that would add a sync inside the timed region

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_repeats(sample, device, repeats=repeats, warmup=warmup)
    loss_values = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in loss_values):
        raise RuntimeError(f"non-finite training loss: {loss_values}")
    tokens = steps * batch * seq_len
    result: dict[str, Any] = {
        "dtype": "float32" if dtype == torch.float32 else "bfloat16 autocast",
        "compile": compile_mode or False,
        "steps_per_sample": steps,
        "tokens_per_s": rate(tokens, timing, "tokens/s"),
        "step_time_s": summarize([t / steps for t in timing.samples_s], "s"),
        "warmup_s": timing.warmup_s,
        "loss_first_last": [loss_values[0], loss_values[-1]],
    }
    if device.type == "cpu":
        result["tokens_per_cpu_s"] = rate_per_cpu_second(tokens, timing, "tokens")
    if compile_mode:
        result["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks_before
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, opt, forward
    return result


# --- generation -------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_full_recompute(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: every step runs the whole prefix again. (B, S0) -> (B, S0 + n)."""
    model.eval()
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens).logits[:, -1]  # (B, V) for the last position of the full prefix
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


def bench_generation(model: Transformer, batch: int, dtype: torch.dtype, device: torch.device,
                     sched: Schedule, seed: int) -> dict[str, Any]:
    """Cached vs full-recompute greedy decoding of `sched.new_tokens` tokens for `batch` prompts."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, sched.prompt_len), generator=gen).to(device)
    n = sched.new_tokens
    outputs: dict[str, torch.Tensor] = {}

    def run(name: str, fn: Any) -> None:
        with torch.no_grad(), autocast(device, dtype):
            outputs[name] = fn()

    modes = {
        "cached": (lambda: run("cached", lambda: generate(model, prompt, n)), sched.gen_repeats,
                   sched.gen_warmup),
        "uncached": (lambda: run("uncached", lambda: greedy_full_recompute(model, prompt, n)),
                     sched.gen_repeats_uncached, sched.gen_warmup_uncached),
    }
    result: dict[str, Any] = {"batch": batch, "prompt_len": sched.prompt_len, "new_tokens": n,
                              "dtype": "float32" if dtype == torch.float32 else "bfloat16 autocast"}
    for name, (fn, repeats, warmup) in modes.items():
        timing = time_repeats(fn, device, repeats=repeats, warmup=warmup)
        result[name] = {"tokens_per_s": rate(batch * n, timing, "new tokens/s (prefill included)"),
                        "warmup_s": timing.warmup_s}
        if device.type == "cpu":
            result[name]["tokens_per_cpu_s"] = rate_per_cpu_second(batch * n, timing, "new tokens")
    result["cached_over_uncached"] = (result["cached"]["tokens_per_s"]["median"]
                                      / result["uncached"]["tokens_per_s"]["median"])
    if device.type == "cpu":
        result["cached_over_uncached_cpu_time"] = (result["cached"]["tokens_per_cpu_s"]["median"]
                                                   / result["uncached"]["tokens_per_cpu_s"]["median"])
    same = outputs["cached"][:, sched.prompt_len:] == outputs["uncached"][:, sched.prompt_len:]
    result["same_tokens_fraction"] = float(same.float().mean())  # 1.0 unless near-ties flip an argmax
    return result


def bench_generation_without_input_check(model: Transformer, dtype: torch.dtype, device: torch.device,
                                         sched: Schedule, seed: int) -> dict[str, Any]:
    """Diagnostic: cached batch-1 decoding with `Transformer._check_tokens` switched off.

    The check reads `tokens.min()` / `.max()` to the host on every forward, which on a GPU forces a
    synchronisation per decoded token; the difference to the plain cached figure is its cost.
    """
    model._check_tokens = lambda tokens, start_pos: None  # instance attribute shadows the method
    try:
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.cfg.vocab_size, (1, sched.prompt_len), generator=gen).to(device)

        def fn() -> None:
            with torch.no_grad(), autocast(device, dtype):
                generate(model, prompt, sched.new_tokens)

        timing = time_repeats(fn, device, repeats=sched.gen_repeats, warmup=sched.gen_warmup)
    finally:
        del model._check_tokens
    return {"batch": 1, "tokens_per_s": rate(sched.new_tokens, timing, "new tokens/s (prefill included)")}


# --- driver -----------------------------------------------------------------------------------------
def _median(d: dict[str, Any]) -> float:
    return d["median"]


def _flops(x: float) -> str:
    """FLOP/s with a readable prefix: '780.1 TFLOP/s', '85.3 GFLOP/s'."""
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def measure_peaks(device: torch.device, sched: Schedule) -> dict[str, Any]:
    """Matmul ceilings of this run: bf16 (and fp32) on CUDA, fp32 on CPU; datasheet rates beside."""
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    peaks: dict[str, Any] = {"measured": {}, "datasheet_flops_per_s": {}}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        # fp32 products run ~15x slower than bf16 on a GPU: fewer of them.
        inner = sched.matmul_inner if dtype == torch.bfloat16 else max(1, sched.matmul_inner // 5)
        peaks["measured"][name] = matmul_peak(device, dtype, sched.matmul_n, repeats=sched.matmul_repeats,
                                              inner=inner)
        peaks["datasheet_flops_per_s"][name] = datasheet_peak(device, name)
    return peaks


def add_mfu(variant: dict[str, Any], flops_per_token: int, peaks: dict[str, Any]) -> None:
    """Write achieved model FLOP/s and MFU against the measured (and datasheet) peak of the dtype."""
    peak_dtype = "float32" if variant["dtype"] == "float32" else "bfloat16"
    achieved = _median(variant["tokens_per_s"]) * flops_per_token
    variant["model_flops_per_s"] = achieved
    if peak_dtype not in peaks["measured"]:  # bf16 on a CPU: no ceiling measured
        variant["mfu"] = variant["mfu_vs_datasheet"] = None
        return
    measured = _median(peaks["measured"][peak_dtype]["flops_per_s"])
    variant["mfu"] = achieved / measured
    variant["mfu_peak"] = f"measured {peak_dtype} matmul, {_flops(measured)}"
    sheet = peaks["datasheet_flops_per_s"].get(peak_dtype)
    variant["mfu_vs_datasheet"] = achieved / sheet if sheet else None
    if "tokens_per_cpu_s" in variant:  # CPU: the same ratio on CPU time (robust to load with 1 thread)
        variant["mfu_cpu_time"] = (_median(variant["tokens_per_cpu_s"]) * flops_per_token
                                   / _median(peaks["measured"][peak_dtype]["flops_per_cpu_s"]))


def run_model(name: str, cfg: ModelConfig, batch: int, seq_len: int, variants: list[tuple[torch.dtype, str | None]],
              device: torch.device, warmup: int, repeats: int, steps: int, peaks: dict[str, Any],
              seed: int) -> dict[str, Any]:
    """All training variants of one model; compile failures are recorded, not raised."""
    probe = Transformer(cfg)
    flops = model_flops_per_token(probe, seq_len)
    section: dict[str, Any] = {
        "config": cfg.to_dict(), "batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
        "parameters": parameter_counts(probe), "model_flops_per_token": flops, "training": {},
    }
    del probe
    for dtype, compile_mode in variants:
        key = f"{'fp32' if dtype == torch.float32 else 'bf16'}-{COMPILE_MODES[compile_mode]}"
        print(f"[{name}] training {key} ...", flush=True)
        try:
            v = bench_training(cfg, batch, seq_len, dtype, compile_mode, device, warmup, repeats, steps,
                               seed)
        except Exception as exc:  # noqa: BLE001 -- torch.compile may be unavailable; eager errors re-raise
            if not compile_mode:
                raise
            section["training"][key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"[{name}] {key} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        finally:
            if compile_mode:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        add_mfu(v, flops["total"], peaks)
        section["training"][key] = v
    # Ratios to the baselines of this run.
    t = {k: _median(v["tokens_per_s"]) for k, v in section["training"].items() if "tokens_per_s" in v}
    ratios = {}
    if "bf16-eager" in t and "fp32-eager" in t:
        ratios["bf16-eager / fp32-eager"] = t["bf16-eager"] / t["fp32-eager"]
    for key in ("bf16-compile", "bf16-compile-cudagraphs"):
        if key in t and "bf16-eager" in t:
            ratios[f"{key} / bf16-eager"] = t[key] / t["bf16-eager"]
    if "fp32-compile" in t and "fp32-eager" in t:
        ratios["fp32-compile / fp32-eager"] = t["fp32-compile"] / t["fp32-eager"]
    section["training_ratios"] = ratios
    return section


def _baseline_section(models: dict[str, Any], variants: list[tuple[torch.dtype, str | None]], device: torch.device,
                      on_cuda: bool, sched: Schedule, peaks: dict[str, Any], seed: int) -> None:
    """The default model: its training variants, then generation cached vs full recompute."""
    tc = TrainConfig()
    cfg = PRESETS["baseline"]
    models["baseline"] = run_model("baseline", cfg, tc.batch_size, tc.seq_len, variants, device,
                                   sched.train_warmup, sched.train_repeats, sched.train_steps, peaks,
                                   seed)

    # generation, cached vs full recompute
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device).eval()
    gen: dict[str, Any] = {}
    for dtype in ([torch.float32, torch.bfloat16] if on_cuda else [torch.float32]):
        for batch in GEN_BATCHES:
            key = f"{'fp32' if dtype == torch.float32 else 'bf16'}-batch{batch}"
            print(f"[baseline] generation {key} ...", flush=True)
            gen[key] = bench_generation(model, batch, dtype, device, sched, seed)
    if on_cuda:  # on a CPU the check's host read costs nothing measurable
        print("[baseline] generation diagnostic: no input check ...", flush=True)
        gen["diagnostic_fp32-batch1-cached-no-input-check"] = bench_generation_without_input_check(
            model, torch.float32, device, sched, seed)
    models["baseline"]["generation"] = gen
    del model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test); figures are rough")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile variants: auto = on CUDA only")
    parser.add_argument("--large", choices=("auto", "on", "off"), default="auto",
                        help=f"also train {LARGE_NAME}: auto = on CUDA only")
    parser.add_argument("--baseline", choices=("on", "off"), default="on",
                        help="train and decode PRESETS['baseline'] (off: only the large and small sections)")
    parser.add_argument("--small", choices=("auto", "on", "off"), default="auto",
                        help="also train PRESETS['small'] against its dense counterpart: auto = on CUDA only")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default, one per core); 1 on a shared, loaded "
                             "machine, where the per-CPU-second figures then stay meaningful")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads={args.threads} must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    use_compile = args.compile == "on" or (args.compile == "auto" and on_cuda)
    use_large = args.large == "on" or (args.large == "auto" and on_cuda)
    use_small = args.small == "on" or (args.small == "auto" and on_cuda)
    sched = Schedule.make(device, args.quick)
    tc = TrainConfig()

    payload: dict[str, Any] = {
        "benchmark": "train_throughput",
        "created_utc": now_utc(),
        "command": command_line("train_throughput.py", argv),
        "device": args.device,
        "quick": args.quick,
        "seed": args.seed,
        "machine": machine_info(device),
        "method": {
            "timing": "host clock around each sample, device synchronised before and after; warmup samples "
                      "excluded; figures are the median over samples with min/max and quartiles",
            "training_step": "forward, cross-entropy, backward, clip_grad_norm_(1.0), AdamW "
                             f"(lr {tc.lr}, betas ({tc.beta1}, {tc.beta2}), weight decay {tc.weight_decay} "
                             "on matrices), synthetic random token ids; bf16 = torch.autocast, fp32 master "
                             "weights; "
                             "compile = torch.compile(model) in its default mode (no max-autotune, no CUDA "
                             "graphs), compile-cudagraphs = mode 'reduce-overhead' (forward and backward "
                             "replayed as CUDA graphs), the optimizer step eager in both; fp32 = true fp32 matmuls (no TF32)",
            "generation": "greedy; cached = deepseek_edu.generate.generate (prefill + one position per step "
                          "on the KV cache); uncached = the whole prefix recomputed for each new token",
            "flops_per_token": FLOPS_FORMULA,
            "mfu": MFU_FORMULA,
        },
        "schedule": vars(sched),
    }

    def save() -> None:
        if args.out is not None:
            write_json(args.out, payload)

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"compile {use_compile}, large {use_large}, quick {args.quick}", flush=True)
    load = machine_load()
    if load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores before the run: other work is "
              "running, wall-clock figures will be low and noisy", flush=True)
    peaks = measure_peaks(device, sched)
    payload["peak"] = peaks
    save()

    # 1. The default model: training variants (the same for the large model). fp32 eager is the
    # baseline everywhere; bf16 autocast only on CUDA (CPUs without bf16 matrix units run it slower
    # than fp32).
    variants: list[tuple[torch.dtype, str | None]] = [(torch.float32, None)]
    if on_cuda:
        variants.append((torch.bfloat16, None))
    if use_compile:
        variants.append((torch.bfloat16 if on_cuda else torch.float32, "default"))
    models: dict[str, Any] = {}
    payload["models"] = models
    if args.baseline == "on":
        _baseline_section(models, variants, device, on_cuda, sched, peaks, args.seed)
        save()

    # 3. A larger dense model that can fill a GPU, so that MFU means something.
    if use_large:
        models[LARGE_NAME] = run_model(LARGE_NAME, LARGE_CONFIG, LARGE_BATCH, LARGE_SEQ_LEN, variants,
                                       device, max(1, sched.train_warmup // 2), sched.large_repeats,
                                       sched.large_steps, peaks, args.seed)
        save()

    # 4. The one-GPU DeepSeek against its dense counterpart at equal activated parameters, same run.
    if use_small:
        small = PRESETS["small"]
        small_variants = [v for v in variants if v[0] != torch.float32] or variants  # bf16 on CUDA
        if on_cuda and use_compile:  # both models are host-bound at this size: CUDA graphs remove that
            small_variants.append((torch.bfloat16, "reduce-overhead"))
        batch, seq_len = (2, 64) if args.quick else (SMALL_BATCH, SMALL_SEQ_LEN)
        warm, reps, steps = max(1, sched.train_warmup // 2), sched.large_repeats, sched.large_steps
        models["small"] = run_model("small", small, batch, seq_len, small_variants, device, warm, reps, steps,
                                    peaks, args.seed)
        save()
        models["small-dense"] = run_model("small-dense", dense_counterpart(small), batch, seq_len, small_variants,
                                          device, warm, reps, steps, peaks, args.seed)
        moe_t, dense_t = models["small"]["training"], models["small-dense"]["training"]
        payload["small_over_dense"] = {
            key: _median(moe_t[key]["tokens_per_s"]) / _median(dense_t[key]["tokens_per_s"])
            for key in moe_t if "tokens_per_s" in moe_t[key] and "tokens_per_s" in dense_t.get(key, {})}
        best = {name: max((_median(v["tokens_per_s"]), k) for k, v in models[name]["training"].items()
                          if "tokens_per_s" in v) for name in ("small", "small-dense")}
        payload["small_over_dense"]["best / best"] = best["small"][0] / best["small-dense"][0]
        payload["small_over_dense"]["best_variants"] = {n: b[1] for n, b in best.items()}
        save()

    payload["finished_utc"] = now_utc()
    payload["load_average_1min_at_end"] = machine_load()
    save()
    print_table(payload)
    return payload


def print_table(payload: dict[str, Any]) -> None:
    """A short human-readable table of the medians (the JSON has the spreads).

    Per-CPU-second figures are printed for one-thread CPU runs only (with more threads they count spinning).
    """
    one_thread = payload["machine"]["torch_threads"] == 1
    print()
    for name, p in payload["peak"]["measured"].items():
        sheet = payload["peak"]["datasheet_flops_per_s"].get(name)
        extra = f" (datasheet {_flops(sheet)})" if sheet else ""
        print(f"peak {name} matmul {p['n']}^3: {_flops(_median(p['flops_per_s']))}{extra}")
        if "flops_per_cpu_s" in p and one_thread:
            per_cpu_s = _median(p["flops_per_cpu_s"]) / 1e9
            print(f"peak {name} matmul {p['n']}^3: {per_cpu_s:.1f} GFLOP per CPU-second")
    for mname, section in payload["models"].items():
        print(f"\n{mname}: {section['parameters']['non_embedding'] / 1e6:.2f}M non-embedding params "
              f"({section['parameters']['activated_non_embedding'] / 1e6:.2f}M activated), "
              f"{section['model_flops_per_token']['total'] / 1e6:.1f} MFLOP/token, "
              f"batch {section['batch']} x seq {section['seq_len']}")
        for key, v in section["training"].items():
            if "error" in v:
                print(f"  train {key:13s} failed: {v['error'][:120]}")
                continue
            tps = v["tokens_per_s"]
            mfu = f"MFU {100 * v['mfu']:5.1f}% of {v['mfu_peak']}" if v.get("mfu") is not None else ""
            spread = f"[{tps['min']:,.0f} .. {tps['max']:,.0f}]"
            print(f"  train {key:13s} {_median(tps):12,.0f} tokens/s  {spread}  {mfu}")
            if "tokens_per_cpu_s" in v and one_thread:
                print(f"  train {key:13s} {_median(v['tokens_per_cpu_s']):12,.0f} tokens per CPU-second, "
                      f"MFU on CPU time {100 * v['mfu_cpu_time']:5.1f}%")
        for key, r in section["training_ratios"].items():
            print(f"  ratio {key}: {r:.2f}")
        for key, g in section.get("generation", {}).items():
            if "cached" in g:
                print(f"  generate {key:12s} cached {_median(g['cached']['tokens_per_s']):10,.0f} tok/s, "
                      f"uncached {_median(g['uncached']['tokens_per_s']):10,.0f} tok/s, "
                      f"ratio {g['cached_over_uncached']:.2f}, same tokens {g['same_tokens_fraction']:.3f}")
                if "tokens_per_cpu_s" in g["cached"] and one_thread:
                    c, u = (_median(g[m]["tokens_per_cpu_s"]) for m in ("cached", "uncached"))
                    print(f"  generate {key:12s} cached {c:10,.0f} tok/CPU-s, uncached {u:10,.0f} tok/CPU-s, "
                          f"ratio {c / u:.2f}")
            else:
                print(f"  {key}: {_median(g['tokens_per_s']):,.0f} tok/s")
    for key, r in payload.get("small_over_dense", {}).items():
        if isinstance(r, float):
            print(f"small / small-dense tokens/s, {key}: {r:.2f}")


if __name__ == "__main__":
    main()
