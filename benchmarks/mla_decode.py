"""Decoding speed and KV-cache size of one attention layer: MHA, GQA, MLA-naive and MLA-absorbed.

What is measured: one decoding step of ONE attention layer (the part that differs between the kinds;
the rest of a block is the same matmuls for all of them): a batch of B sequences, each with a warm
cache of `ctx` positions, attends from one new token to those ctx positions and itself. Reported
per (kind, ctx, B):

- **tokens/s** = B / median step time, with the median, min and max step time (seconds);
- **cache bytes**: allocated (`KVCache.nbytes`, room for ctx + 1 positions) against the formula
  ``elements per token x bytes per element x ctx x B`` (DeepSeek-V2 Table 1, per layer)::

      MHA  2 * H * Dh        GQA  2 * H_kv * Dh        MLA  C + R   (both paths: one latent cache)

- **cache GB/s** = bytes of cache read per step / median step time, the bytes counted once:
  B x (ctx + 1) x elements per token x bytes. For MLA-absorbed this is the latent cache read
  that REFERENCE.md's "Measured ceilings" quotes (plain PyTorch einsum path, V3 shapes, H200:
  554-616 GB/s); on CUDA the device-to-device copy bandwidth is measured in the same run as the
  ceiling (bytes read + bytes written per second).
- **absorbed / naive**: MLA-absorbed tokens/s over MLA-naive tokens/s for each (ctx, B), and the
  relative difference of their outputs on the same cache (they must compute the same function).
- **CUDA only, `cuda_graph`**: the same step captured once as a CUDA graph and timed as graph
  replays. Eager PyTorch launches each of a step's ~40 kernels from Python; at batch 1 that host
  work (about 0.7-1.5 ms per step on the H200 machine) is longer than the GPU work, so eager
  figures there compare dispatch overheads. Graph replay times the GPU work alone.
- **CUDA only, `alignment_probe`**: MLA-absorbed again at ctx - 1 for ctx >= 4096. The absorbed
  einsums use the attended length T = ctx + 1 as the leading dimension of the (B*H, T) score
  matrices; cuBLAS picks its Hopper kernels only when that is a multiple of 8 elements and falls
  back to slower 2-byte-aligned ones (`cutlass_75_..._align1`) otherwise. A real decode passes
  through both kinds of T; the probe shows the spread.

Shapes. CUDA (bf16): DeepSeek-V3's attention (dim 7168, H 128, q_lora_rank 1536, C 512, R 64,
N 128, Dv 128, YaRN softmax scale), an MHA of the same 128 heads of width 128, and a GQA with 8
KV heads (the usual deployed GQA; 1/16 of the MHA cache). CPU (fp32): a scaled-down copy that
runs in a few minutes on 2 cores (dim 1024, H 16, q_lora_rank 256, C 128, R 32, N 64, Dv 64;
MHA 16 x 64; GQA with 2 KV heads, 1/8 of the MHA cache: 1 KV head would be MQA).

Method (the device notes' METHOD.md): the cache is filled with random normal data of the run's
dtype directly (no prefill; `cache.length = ctx` before every step, so every step sees exactly
ctx cached positions); warm-up calls are excluded; CUDA is synchronised around every timed
sample; one sample runs `inner` steps back to back (so a sample lasts >= a few ms) and the
figures are medians over the samples. Where a cache is smaller than 4x the last-level cache (H200
L2 60 MB; CPU L3), several caches are allocated and the steps rotate among them, so that small
configurations are not timed out of the on-chip cache (`n_caches` in the JSON). A configuration
whose estimated memory (cache + the path's intermediates) does not fit is skipped with a note.

Run (from the repository root)::

    python benchmarks/mla_decode.py --device cpu --out benchmarks/results/mla_decode_cpu.json
    python benchmarks/mla_decode.py --device cuda --out benchmarks/results/mla_decode_h200.json
    python benchmarks/mla_decode.py --device cpu --quick     # seconds; smoke test

Needs torch >= 2.4 and the package modules config/attention/mla/rope (which import only torch).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import machine_info, now_utc, summarize, time_repeats, write_json  # noqa: E402

from deepseek_edu.attention import Attention, KVCache  # noqa: E402
from deepseek_edu.config import ModelConfig, get_preset  # noqa: E402
from deepseek_edu.mla import MLA  # noqa: E402
from deepseek_edu.rope import precompute_freqs_cis  # noqa: E402

KINDS = ("mha", "gqa", "mla-naive", "mla-absorbed")
CPU_CONTEXTS, CUDA_CONTEXTS = (512, 1024, 2048, 4096, 8192), (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 32)
CACHE_FORMULA = {
    "mha": "2 * n_heads * head_dim",
    "gqa": "2 * n_kv_heads * head_dim",
    "mla-naive": "kv_lora_rank + qk_rope_head_dim",
    "mla-absorbed": "kv_lora_rank + qk_rope_head_dim",
}
FORMULAS = {
    "tokens_per_s": "batch / median step time (one new token per sequence per step)",
    "cache_bytes_formula": "elements per token x bytes per element x ctx x batch (one layer)",
    "cache_bytes_allocated": "KVCache.nbytes: buffers of batch x (ctx + 1) positions (room for the new token)",
    "cache_GBps": "batch x (ctx + 1) x elements per token x bytes per element / median step time / 1e9 "
                  "(cache read once per step; for mla-absorbed the latent cache read of REFERENCE.md)",
    "absorbed_over_naive": "tokens/s of mla-absorbed / tokens/s of mla-naive, same cache, same (ctx, batch)",
    "naive_vs_absorbed_rel_diff": "||out_absorbed - out_naive|| / ||out_naive|| on the same inputs and cache",
    "copy_GBps": "device-to-device copy: (bytes read + bytes written) / median time / 1e9",
}
LAST_LEVEL_CACHE_FALLBACK = 32 * 2**20  # bytes, when the CPU's L3 cannot be read from /sys


# --- shapes ------------------------------------------------------------------------------------------
def attention_configs(device: torch.device, max_ctx: int) -> dict[str, ModelConfig]:
    """One attention config per kind (mla-naive and mla-absorbed share one), see the module docstring."""
    if device.type == "cuda":  # DeepSeek-V3's attention shapes (REFERENCE.md, config.PRESETS)
        v3 = get_preset("deepseek-v3")
        mla = {f: getattr(v3, f) for f in (
            "dim", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "rope_theta", "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale")}
        dim, n_heads, head_dim, n_kv_heads = v3.dim, v3.n_heads, 128, 8
    else:  # the same proportions scaled down for 2 CPU cores
        mla = dict(dim=1024, n_heads=16, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                   qk_rope_head_dim=32, v_head_dim=64)
        dim, n_heads, head_dim, n_kv_heads = 1024, 16, 64, 2
    max_seq_len = max_ctx + 1
    common = dict(vocab_size=2048, n_layers=1, n_dense_layers=0, max_seq_len=max_seq_len)
    mla_cfg = ModelConfig(attention="mla", **common, **mla)
    return {
        "mha": ModelConfig(attention="mha", dim=dim, n_heads=n_heads, head_dim=head_dim, **common),
        "gqa": ModelConfig(attention="gqa", dim=dim, n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads,
                           **common),
        "mla-naive": mla_cfg,
        "mla-absorbed": mla_cfg,
    }


def shape_record(kind: str, cfg: ModelConfig) -> dict[str, Any]:
    keys = (("dim", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
             "v_head_dim", "rope_factor") if kind.startswith("mla") else ("dim", "n_heads", "head_dim", "n_kv_heads"))
    rec = {k: getattr(cfg, k) for k in keys}
    if not kind.startswith("mla"):
        rec["n_kv_heads"] = cfg.kv_heads
    rec["softmax_scale"] = cfg.softmax_scale
    rec["cache_elements_per_token"] = elements_per_token(kind, cfg)
    rec["cache_elements_formula"] = CACHE_FORMULA[kind]
    return rec


def elements_per_token(kind: str, cfg: ModelConfig) -> int:
    """Cached numbers per token per layer (DeepSeek-V2 Table 1)."""
    if kind.startswith("mla"):
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.kv_heads * cfg.attn_head_dim


def peak_bytes_estimate(kind: str, cfg: ModelConfig, batch: int, ctx: int, elem: int, n_caches: int) -> int:
    """Cache plus the largest per-step intermediates of the path, in bytes (for skipping what cannot fit).

    GQA: attention.py repeats K and V to all H heads (repeat_interleave), 2 x (B, T, H, Dh).
    MLA-naive: the up-projected latents (B, T, H, N+Dv), the keys cat'ed with the rotary part
    (B, T, H, N+R), and room for one contiguous copy of V (B, T, H, Dv).
    """
    T = ctx + 1
    cache = n_caches * batch * T * elements_per_token(kind, cfg) * elem
    H = cfg.n_heads
    if kind == "gqa":
        extra = 2 * batch * T * H * cfg.attn_head_dim * elem
    elif kind == "mla-naive":
        N, R, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        extra = batch * T * H * ((N + Dv) + (N + R) + Dv) * elem
    elif kind == "mla-absorbed":
        extra = batch * T * H * (elem + 3 * 4)  # scores in the run's dtype, then fp32 copies
    else:
        extra = batch * T * H * 4  # the (B, H, 1, T) scores / mask of SDPA
    return cache + extra


# --- machine ------------------------------------------------------------------------------------------
def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 50 * 2**20
    sizes = []
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = p.read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=LAST_LEVEL_CACHE_FALLBACK)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the CPUs skew CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def copy_bandwidth(device: torch.device, nbytes: int = 4 * 2**30, repeats: int = 10) -> dict[str, Any]:
    """Device-to-device copy of `nbytes` (random data): (read + write) bytes per second."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_repeats(lambda: dst.copy_(src), device, repeats=repeats, warmup=3)  # noqa: F821 (deleted later; ruff reads the del as unbinding)
    out = {"bytes_copied": nbytes, "GBps": summarize([2 * nbytes / s / 1e9 for s in timing.samples_s], "GB/s"),
           "formula": FORMULAS["copy_GBps"]}
    del src, dst
    return out


# --- one configuration --------------------------------------------------------------------------------
def make_caches(module: nn.Module, batch: int, ctx: int, dtype: torch.dtype, device: torch.device,
                n: int, gen: torch.Generator) -> list[KVCache]:
    """`n` caches of ctx + 1 positions filled with random normal data, ctx of them marked as held."""
    caches = []
    for _ in range(n):
        cache = KVCache(batch, ctx + 1, module.cache_spec(), dtype, device)
        for buf in cache.buffers.values():
            buf.normal_(generator=gen)
        cache.length = ctx
        caches.append(cache)
    return caches


def time_steps(step: Any, device: torch.device, min_sample_s: float, budget_s: float,
               min_repeats: int, max_repeats: int) -> tuple[list[float], dict[str, Any]]:
    """Per-step seconds of each timed sample, and how they were taken (inner steps, repeats, warm-up)."""
    calib = time_repeats(step, device, repeats=1, warmup=2)  # two warm-ups, then one step for the scale
    t1 = calib.samples_s[0]
    inner = max(1, min(1000, math.ceil(min_sample_s / max(t1, 1e-7))))

    def sample() -> None:
        for _ in range(inner):
            step()

    repeats = max(min_repeats, min(max_repeats, int(budget_s / max(t1 * inner, 1e-9))))
    timing = time_repeats(sample, device, repeats=repeats, warmup=1)
    per_step = [s / inner for s in timing.samples_s]
    return per_step, {"inner_steps_per_sample": inner, "samples": repeats,
                      "warmup_s": calib.warmup_s + timing.warmup_s}


def capture_graphs(run_on: Callable[[KVCache], Tensor], caches: list[KVCache]) -> tuple[list[Any], list[Tensor]]:
    """One CUDA graph of a whole decoding step per cache (they share one memory pool; replayed in order).

    Replaying a graph launches the step's kernels without Python or dispatcher work in between, so
    its time is the GPU's; eager minus graph is the host's share (METHOD.md: time many small
    launches as graph replays).
    """
    gc.collect()
    torch.cuda.empty_cache()  # hand back the eager step's intermediates before the graph pool takes its own
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graph's docs ask
        run_on(caches[0])
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs, pool = [], [], None
    for cache in caches:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outs.append(run_on(cache))
        pool = graph.pool() if pool is None else pool
        graphs.append(graph)
    return graphs, outs


def bench_config(kinds: list[str], cfgs: dict[str, ModelConfig], modules: dict[str, nn.Module], batch: int,
                 ctx: int, dtype: torch.dtype, device: torch.device, sched: dict[str, Any],
                 gen: torch.Generator) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """Time every kind at one (ctx, batch). Returns results, skips, and the MLA naive/absorbed check."""
    results, skips, check = [], [], None
    elem = torch.empty((), dtype=dtype).element_size()
    llc = sched["last_level_cache_bytes"]
    groups: list[list[str]] = [[k] for k in kinds if not k.startswith("mla")]
    mla_kinds = [k for k in kinds if k.startswith("mla")]
    if mla_kinds:
        groups.append(mla_kinds)  # naive and absorbed share one module and one cache
    for group in groups:
        cfg, module = cfgs[group[0]], modules[group[0]]
        one_cache = batch * (ctx + 1) * elements_per_token(group[0], cfg) * elem
        n_caches = min(8, math.ceil(4 * llc / one_cache)) if one_cache < 4 * llc else 1
        free = free_memory_bytes(device)
        fits = {k: peak_bytes_estimate(k, cfg, batch, ctx, elem, n_caches) for k in group}
        runnable = [k for k in group if fits[k] <= 0.85 * free]
        for k in group:
            if k not in runnable:
                skips.append({"kind": k, "ctx": ctx, "batch": batch,
                              "note": f"skipped: estimated peak {fits[k] / 1e9:.1f} GB (cache + intermediates) "
                                      f"> 85% of free memory {free / 1e9:.1f} GB"})
        if not runnable:
            continue
        caches = []
        try:
            caches = make_caches(module, batch, ctx, dtype, device, n_caches, gen)
            x = torch.randn(batch, 1, cfg.dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
            freqs = precompute_freqs_cis(cfg, ctx + 1)[ctx:ctx + 1].to(device)  # (1, R/2) rotary of position ctx
            outs: dict[str, Tensor] = {}
            for k in runnable:
                impl = k.split("-")[1] if k.startswith("mla") else None
                counter = [0]

                def step(k: str = k, impl: str | None = impl, counter: list[int] = counter) -> Tensor:
                    cache = caches[counter[0] % len(caches)]  # noqa: F821 (deleted later; ruff reads the del as unbinding)
                    counter[0] += 1
                    cache.length = ctx  # every step sees exactly ctx cached positions
                    return module(x, freqs, cache) if impl is None else module(x, freqs, cache, impl=impl)

                try:
                    with torch.inference_mode():
                        if k.startswith("mla"):
                            caches[0].length = ctx
                            outs[k] = step().float()
                            counter[0] = 0
                        per_step, how = time_steps(step, device, **sched["timing"])
                except torch.cuda.OutOfMemoryError as err:  # estimate was too low: note it, go on
                    skips.append({"kind": k, "ctx": ctx, "batch": batch,
                                  "note": f"skipped: out of memory ({str(err).splitlines()[0][:160]})"})
                    outs.pop(k, None)
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                ept = elements_per_token(k, cfg)
                read_bytes = batch * (ctx + 1) * ept * elem
                graph_rec: dict[str, Any] = {}
                if sched["graphs"]:
                    def run_on(cache: KVCache, impl: str | None = impl) -> Tensor:
                        cache.length = ctx
                        return module(x, freqs, cache) if impl is None else module(x, freqs, cache, impl=impl)

                    graphs: list[Any] = []
                    try:
                        with torch.inference_mode():
                            graphs, graph_outs = capture_graphs(run_on, caches)
                        replays = [0]

                        def replay(graphs: list[Any] = graphs, replays: list[int] = replays) -> None:
                            graphs[replays[0] % len(graphs)].replay()
                            replays[0] += 1

                        g_step, g_how = time_steps(replay, device, **sched["timing"])
                        g_st = summarize(g_step, "s")
                        graph_rec = {"tokens_per_s": batch / g_st["median"], "step_s": g_st,
                                     "cache_GBps": read_bytes / g_st["median"] / 1e9, **g_how}
                        del graph_outs
                    except Exception as err:  # noqa: BLE001 -- a capture that fails is a note, not a crash
                        graph_rec = {"note": f"CUDA graph capture/replay failed: {type(err).__name__}: "
                                             f"{str(err).splitlines()[0][:160] if str(err) else ''}"}
                    graphs.clear()  # in place: the replay closure still holds the list, and with it each graph's pool
                    del graphs
                    gc.collect()
                    torch.cuda.empty_cache()
                st = summarize(per_step, "s")
                results.append({
                    "kind": k, "ctx": ctx, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                    "tokens_per_s": batch / st["median"],
                    "step_s": st,
                    "cache_elements_per_token": ept,
                    "cache_bytes_formula": ept * elem * ctx * batch,
                    "cache_bytes_allocated": caches[0].nbytes,
                    "cache_bytes_allocated_matches_formula_at_ctx_plus_1": caches[0].nbytes == ept * elem * (ctx + 1) * batch,
                    "cache_bytes_read_per_step": read_bytes,
                    "cache_GBps": read_bytes / st["median"] / 1e9,
                    "n_caches": len(caches),
                    "estimated_peak_bytes": fits[k],
                    **how,
                    **({"cuda_graph": graph_rec} if graph_rec else {}),
                })
            if "mla-naive" in outs and "mla-absorbed" in outs:
                ref = outs["mla-naive"]
                check = {"ctx": ctx, "batch": batch,
                         "rel_diff": ((outs["mla-absorbed"] - ref).norm() / ref.norm()).item()}
        finally:
            del caches
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results, skips, check


# --- report -------------------------------------------------------------------------------------------
def ratios(results: list[dict[str, Any]], checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["kind"], r["ctx"], r["batch"]): r for r in results}
    diff = {(c["ctx"], c["batch"]): c["rel_diff"] for c in checks}
    out = []
    for (kind, ctx, batch), r in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if kind != "mla-absorbed" or ("mla-naive", ctx, batch) not in by:
            continue
        naive = by[("mla-naive", ctx, batch)]
        out.append({"ctx": ctx, "batch": batch, "absorbed_over_naive": r["tokens_per_s"] / naive["tokens_per_s"],
                    "absorbed_tokens_per_s": r["tokens_per_s"], "naive_tokens_per_s": naive["tokens_per_s"],
                    "naive_vs_absorbed_rel_diff": diff.get((ctx, batch))})
        ga, gn = r.get("cuda_graph", {}).get("tokens_per_s"), naive.get("cuda_graph", {}).get("tokens_per_s")
        if ga and gn:
            out[-1]["cuda_graph_absorbed_over_naive"] = ga / gn
    return out


def print_table(payload: dict[str, Any]) -> None:
    res = {(r["kind"], r["ctx"], r["batch"]): r for r in payload["results"]}
    ctxs = sorted({r["ctx"] for r in payload["results"]})
    batches = sorted({r["batch"] for r in payload["results"]})
    timings = [("eager", lambda r: r)]
    if any("tokens_per_s" in r.get("cuda_graph", {}) for r in payload["results"]):
        timings.append(("CUDA-graph replay", lambda r: r.get("cuda_graph") if "tokens_per_s" in r.get("cuda_graph", {})
                        else None))
    for label, get in timings:
        print(f"\ndecode tokens/s, one attention layer ({payload['dtype']}, {payload['device']}, {label}); "
              f"absorbed/naive; absorbed latent-cache GB/s")
        for b in batches:
            print(f"batch {b}")
            print(f"{'ctx':>6} " + " ".join(f"{k:>13}" for k in KINDS) + f" {'abs/naive':>9} {'abs GB/s':>9}")
            for c in ctxs:
                got = {k: get(res[(k, c, b)]) if (k, c, b) in res else None for k in KINDS}
                cells = [f"{got[k]['tokens_per_s']:13.1f}" if got[k] else
                         f"{'skip' if k in payload['shapes'] else '-':>13}" for k in KINDS]
                a, n = got["mla-absorbed"], got["mla-naive"]
                ratio = f"{a['tokens_per_s'] / n['tokens_per_s']:9.2f}" if a and n else f"{'-':>9}"
                gbps = f"{a['cache_GBps']:9.1f}" if a else f"{'-':>9}"
                print(f"{c:>6} " + " ".join(cells) + f" {ratio} {gbps}")
    if payload.get("alignment_probe"):
        print("\nmla-absorbed at ctx - 1 (attended length T = ctx, a multiple of 8) vs ctx (T = ctx + 1):")
        for p in payload["alignment_probe"]:
            q = res.get(("mla-absorbed", p["ctx"] + 1, p["batch"]))
            pg, qg = p.get("cuda_graph", {}).get("cache_GBps"), (q or {}).get("cuda_graph", {}).get("cache_GBps")
            print(f"  batch {p['batch']:>3} ctx {p['ctx']:>6}: {p['tokens_per_s']:10.1f} tok/s, "
                  f"{p['cache_GBps']:7.1f} GB/s eager" + (f", {pg:7.1f} GB/s graph" if pg else "")
                  + (f"  | ctx {q['ctx']}: {q['cache_GBps']:7.1f} GB/s eager" if q else "")
                  + (f", {qg:7.1f} GB/s graph" if qg else ""))
    if payload.get("ceilings"):
        print("ceilings:", {k: round(v["GBps"]["median"], 1) for k, v in payload["ceilings"].items()}, "GB/s")
    for s in payload["skips"]:
        print(f"skip {s['kind']} ctx={s['ctx']} batch={s['batch']}: {s['note']}")
    for r in payload["results"]:
        if "note" in r.get("cuda_graph", {}):
            print(f"graph {r['kind']} ctx={r['ctx']} batch={r['batch']}: {r['cuda_graph']['note']}")


# --- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="two small contexts, few samples (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto = float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="override the context lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="override the batch sizes")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph replay timings")
    parser.add_argument("--no-align-probe", action="store_true",
                        help="CUDA: skip mla-absorbed at ctx - 1 (attended length a multiple of 8)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    contexts = args.contexts or ((256, 512) if args.quick else CUDA_CONTEXTS if device.type == "cuda" else CPU_CONTEXTS)
    batches = args.batches or ((1, 8) if args.quick else BATCHES)
    gpu = device.type == "cuda"
    sched = {
        "timing": {"min_sample_s": 0.005 if gpu else 0.02, "budget_s": 0.05 if args.quick else 0.4 if gpu else 0.6,
                   "min_repeats": 3 if args.quick else 7 if gpu else 5, "max_repeats": 50 if gpu else 30},
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "graphs": gpu and not args.no_graphs,
    }
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    cfgs = attention_configs(device, max(contexts))
    modules: dict[str, nn.Module] = {}
    for k in args.kinds:
        if k.startswith("mla") and any(m.startswith("mla") for m in modules):
            modules[k] = next(m for n, m in modules.items() if n.startswith("mla"))
            continue
        module = MLA(cfgs[k]) if k.startswith("mla") else Attention(cfgs[k])
        modules[k] = module.to(device=device, dtype=dtype).eval()

    started = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "mla_decode", "created_utc": now_utc(), "device": args.device,
        "dtype": str(dtype).replace("torch.", ""), "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine_info(device),
        "what": "one decoding step of ONE attention layer: B sequences x 1 new token against a random warm cache "
                "of ctx positions (cache.length = ctx before each step)",
        "shapes": {k: shape_record(k, cfgs[k]) for k in args.kinds},
        "formulas": FORMULAS, "schedule": sched, "contexts": list(contexts), "batches": list(batches),
        "ceilings": {}, "results": [], "skips": [], "checks": [], "absorbed_over_naive": [], "alignment_probe": [],
        "reference": "REFERENCE.md 'Measured ceilings': plain-PyTorch absorbed MLA decoding at V3 shapes on an "
                     "H200 (bf16, batch 64-128, ctx 4K-16K): einsum path 554-616 GB/s of latent cache read",
    }
    payload["load_average_1_5_15_at_start"] = load_average()
    if gpu:
        payload["ceilings"]["device_copy"] = copy_bandwidth(device)
    for batch in batches:
        for ctx in contexts:
            t0 = time.perf_counter()
            res, skips, check = bench_config(args.kinds, cfgs, modules, batch, ctx, dtype, device, sched, gen)
            payload["results"] += res
            payload["skips"] += skips
            if check:
                payload["checks"].append(check)
            if gpu and not args.no_align_probe and "mla-absorbed" in args.kinds and ctx >= 4096:
                # The absorbed einsums put the attended length T = ctx + 1 in the leading dimension of the
                # (B*H, T) score matrix; cuBLAS picks Hopper kernels only when it is a multiple of 8
                # (16 bytes), and falls back to 2-byte-aligned ("align1") kernels otherwise. ctx - 1 makes
                # T = ctx a multiple of 8: the same step, the other half of a real decode's positions.
                probe, probe_skips, _ = bench_config(["mla-absorbed"], cfgs, modules, batch, ctx - 1, dtype, device,
                                                     sched, gen)
                payload["alignment_probe"] += probe
                payload["skips"] += probe_skips
            if args.out:  # after every configuration, so a run stopped at its time limit keeps what it measured
                write_json(args.out, payload)
            line = " ".join(f"{r['kind']}={r['tokens_per_s']:.1f}" for r in res)
            print(f"batch={batch} ctx={ctx} ({time.perf_counter() - t0:.1f}s): {line}"
                  + (f" rel_diff={check['rel_diff']:.1e}" if check else ""), flush=True)
    payload["absorbed_over_naive"] = ratios(payload["results"], payload["checks"])
    payload["total_s"] = time.perf_counter() - started
    payload["load_average_1_5_15_at_end"] = load_average()
    if args.out:
        write_json(args.out, payload)
    print_table(payload)
    print(f"total {payload['total_s']:.1f}s" + (f"; wrote {args.out}" if args.out else ""))
    return payload


if __name__ == "__main__":
    main()
