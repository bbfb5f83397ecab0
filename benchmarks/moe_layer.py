"""Forward + backward tokens/s of one DeepSeekMoE layer against a dense SwiGLU of equal activated size.

For each expert layout below, in the same run and on the same input:

- **dense**: `deepseek_edu.ffn.MLP(D, (K + n_shared) * moe_inter_dim)`: a SwiGLU with exactly the
  parameters one token activates in the MoE layer (routed K experts + the shared ones), so both do
  the same matmul FLOPs per token; the MoE layer adds the gate and the routing;
- **moe**: `deepseek_edu.moe.MoE` (sigmoid gate, top-K, shared experts, the package's `dispatch`)
  with its default `dispatch_impl="auto"`: the experts' GEMMs as one `torch._grouped_mm` per matrix
  where available (CUDA bf16 on Hopper; CPU), the per-expert loop elsewhere;
- **moe-loop**: the same layer with `dispatch_impl="loop"` (one GEMM launch per expert and matrix,
  and a host sync for the block sizes);
- with `--compile`: **dense-compile** and **moe-compile**, both layers under `torch.compile` (default
  mode; the grouped path has no host synchronisation, so the whole layer is one graph);
- **moe-v0**: the same layer with the first `dispatch` of the package (commit 244e9d6: per-expert
  slices of the sorted tokens and an `index_add_` of weighted outputs into y), kept here as
  `dispatch_v0` to show what the current one changed.

Layouts (equal activated parameters: (K + n_shared) * moe_inter_dim = 3 M):

    8 routed top-2 + 1 shared, width M           (the acceptance case)
    16 routed top-2 + 1 shared, width M          (more experts, same compute)
    64 routed top-8 + 4 shared, width M / 4      (fine-grained: every expert split in 4, DeepSeekMoE §3.1)

Measured: tokens/s of forward + backward (input gradient and every weight gradient) as the median of
timed repeats (host clock, device synchronised around each; warmup excluded: _common.py), and the
ratio moe / dense. **Where the time goes** (package MoE): each stage of the layer is run on its own,
forward + backward, on inputs prepared beforehand, and timed the same way:

    gate          scores (fp32 GEMM + sigmoid), top-K, weights; backward through the weights
    sort+gather   argsort of the N*K expert ids, inverse permutation, bincount, gather of x's rows and
                  of the weights into expert order
    experts       the experts' SwiGLUs on their contiguous blocks, weighted (grouped GEMMs, or the loop
                  with its .tolist() host sync -- whichever "moe" uses)
    combine       rows back to (token, slot) order, sum of the K slots
    shared        the shared expert (one SwiGLU of n_shared * M)

Their sum against the whole layer's time says how much is left over (launch gaps, the load
bincount of `MoE.forward`; stages timed alone also pay their own synchronisation, so the sum can
exceed the whole). A `torch.profiler` table of the whole layer (top operators by self device time on
CUDA, self CPU time on a CPU) is stored as a cross-check, with the summed kernel time per step: over
the step's wall time it is `gpu_busy_fraction` (near 1: GPU-bound; far below: host/launch-bound).
`--scaling-batches` (default 32 on CUDA: 65,536 tokens) times the 8-expert layout again at larger
batches, because the per-call host and launch costs stay fixed while the matmul work grows.

Run (from the repository root)::

    python benchmarks/moe_layer.py --device cuda --out benchmarks/results/moe_layer_h200.json
    python benchmarks/moe_layer.py --device cpu --threads 1 --out benchmarks/results/moe_layer_cpu.json
    python benchmarks/moe_layer.py --device cpu --quick     # seconds: the smoke test

bf16 weights and activations on CUDA (the gate still scores in fp32), fp32 on a CPU. Balance losses
are off (alphas 0): this measures the layer, not the losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import (  # noqa: E402
    command_line,
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

from deepseek_edu.config import ModelConfig  # noqa: E402
from deepseek_edu.dispatch import gather_pairs, permute_rows, sum_slots  # noqa: E402
from deepseek_edu.ffn import MLP  # noqa: E402
from deepseek_edu.moe import MoE, Routing  # noqa: E402

# name -> (routed experts E, top-K, shared experts, width divisor: moe_inter_dim = M // divisor)
LAYOUTS = {
    "8 routed top-2 + 1 shared": (8, 2, 1, 1),
    "16 routed top-2 + 1 shared": (16, 2, 1, 1),
    "64 routed top-8 + 4 shared (fine-grained)": (64, 8, 4, 4),
}
ACCEPTANCE_LAYOUT = "8 routed top-2 + 1 shared"


def dispatch_v0(self: MoE, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's first `MoE.dispatch` (commit 244e9d6), for comparison. x (N, D) -> ((N, D), counts (E,)).

    (It returned y alone; the counts, which `MoE.forward` now takes from `dispatch`, are added here.)"""
    N, K = routing.indices.shape
    flat_experts = routing.indices.flatten()
    order = flat_experts.argsort(stable=True)
    counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()
    token_of = order // K
    weight_of = routing.weights.flatten()[order]
    x_sorted = x[token_of]
    y = torch.zeros_like(x)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        out = self.experts[e](x_sorted[start:end]) * weight_of[start:end, None].to(x.dtype)
        y.index_add_(0, token_of[start:end], out)
        start = end
    return y, torch.bincount(flat_experts, minlength=self.n_experts)


def make_config(dim: int, width: int, layout: tuple[int, int, int, int]) -> ModelConfig:
    E, K, S, div = layout
    return ModelConfig(dim=dim, n_heads=8, inter_dim=(K + S) * (width // div), n_routed_experts=E,
                       n_shared_experts=S, n_activated_experts=K, moe_inter_dim=width // div,
                       score_func="sigmoid", route_scale=1.0, norm_topk_prob=True,
                       seq_aux_loss_alpha=0.0, expert_aux_loss_alpha=0.0)


def _params(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    """A closure: clear grads, run `forward`, backpropagate `grad` (no sync inside)."""
    def step() -> None:
        for p in params:
            p.grad = None
        forward().backward(grad)
    return step


def stage_breakdown(moe: MoE, x2d: torch.Tensor, device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """Each stage of the package's MoE layer, forward + backward on its own (see module docstring)."""
    N, D = x2d.shape
    K = moe.topk
    gen = torch.Generator().manual_seed(1)

    def rnd(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = x2d.detach().requires_grad_(True)
    with torch.no_grad():
        routing = moe.gate(x)
    impl = moe.resolve_impl(x)
    idx = routing.indices
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=moe.n_experts)
    position = torch.empty_like(order).index_copy_(0, order, torch.arange(N * K, device=device))
    x_sorted = x.detach()[order // K].requires_grad_(True)
    weights = routing.weights.detach().requires_grad_(True)
    w_sorted = weights.detach().flatten()[order].to(x.dtype).requires_grad_(True)
    out_sorted = torch.randn(N * K, D, generator=gen).to(device=device, dtype=x.dtype).requires_grad_(True)
    run = moe.experts_grouped if impl == "grouped" else moe.experts_loop

    # The stages of MoE.dispatch (deepseek_edu/moe.py), written out the same way.
    def gate() -> torch.Tensor:
        return moe.gate(x).weights

    def sort_gather() -> torch.Tensor:
        fl = idx.flatten()
        o = fl.argsort(stable=True)
        pos = torch.empty_like(o).index_copy_(0, o, torch.arange(N * K, device=device))
        torch.bincount(fl, minlength=moe.n_experts)
        ws = permute_rows(weights.flatten().to(x.dtype), o, pos)
        return gather_pairs(x, o, pos, K) * 1 + ws.unsqueeze(-1) * 0  # both in the graph

    def experts() -> torch.Tensor:
        return run(x_sorted, counts, w_sorted)

    def combine() -> torch.Tensor:
        return sum_slots(permute_rows(out_sorted, position, order).view(N, K, D))

    stages: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor, list[torch.Tensor]]] = {
        "gate": (gate, rnd(N, K, dtype=torch.float32), [x, *_params(moe.gate)]),
        "sort+gather": (sort_gather, rnd(N * K, D, dtype=x.dtype), [x]),
        "experts": (experts, rnd(N * K, D, dtype=x.dtype), [x_sorted, w_sorted, *_params(moe.experts)]),
        "combine": (combine, rnd(N, D, dtype=x.dtype), [out_sorted]),
    }
    if moe.shared_experts is not None:
        stages["shared"] = (lambda: moe.shared_experts(x), rnd(N, D, dtype=x.dtype), [x, *_params(moe.shared_experts)])
    out: dict[str, Any] = {"experts_impl": impl}
    for name, (fn, grad, params) in stages.items():
        t = time_repeats(fwd_bwd(fn, grad, params), device, repeats=repeats, warmup=warmup)
        out[name] = summarize(t.samples_s, "s")
    return out


def profile_table(step: Callable[[], None], device: torch.device, top: int = 15) -> dict[str, Any]:
    """Top operators of one forward + backward by self device time (CUDA) or self CPU time (CPU), and
    on CUDA the summed time of all kernels per step: over the step's wall time, how busy the GPU was."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    kernel_us = 0.0
    for evt in prof.key_averages():
        if str(getattr(evt, "device_type", "")).endswith("CUDA"):  # a kernel (or memcpy/memset) row
            kernel_us += getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        rows.append({"op": evt.key, "calls_per_step": evt.count / 3, "self_device_ms_per_step": dev / 1e3 / 3,
                     "self_cpu_ms_per_step": evt.self_cpu_time_total / 1e3 / 3})
    key = "self_device_ms_per_step" if device.type == "cuda" else "self_cpu_ms_per_step"
    rows.sort(key=lambda r: -r[key])
    return {"device_kernel_ms_per_step": kernel_us / 1e3 / 3,
            "top_ops": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:top]]}


def bench_layout(name: str, layout: tuple[int, int, int, int], args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype, batch: int, full: bool = True) -> dict[str, Any]:
    """dense, moe and moe-v0 forward + backward tokens/s for `batch` sequences; with `full`, also the
    stage breakdown and the profiler tables."""
    cfg = make_config(args.dim, args.width, layout)
    torch.manual_seed(args.seed)
    moe = MoE(cfg).to(device=device, dtype=dtype).train()
    dense = MLP(cfg.dim, cfg.inter_dim).to(device=device, dtype=dtype).train()
    for m in (moe, dense):  # the model's init: normal(0, init_std); the gate as Gate initialises it
        for p in m.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=cfg.init_std)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, args.seq_len, cfg.dim, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    tokens = batch * args.seq_len
    variants = {
        "dense": (lambda: dense(x), [x, *dense.parameters()]),  # noqa: F821 (deleted later; ruff reads the del as unbinding)
        "moe": (lambda: moe(x).y, [x, *moe.parameters()]),  # noqa: F821 (deleted later; ruff reads the del as unbinding)
    }
    loop = MoE(cfg).to(device=device, dtype=dtype).train()
    loop.load_state_dict(moe.state_dict())
    loop.dispatch_impl = "loop"
    variants["moe-loop"] = (lambda: loop(x).y, [x, *loop.parameters()])  # noqa: F821 (deleted later; ruff reads the del as unbinding)
    v0 = MoE(cfg).to(device=device, dtype=dtype).train()
    v0.load_state_dict(moe.state_dict())
    v0.dispatch = types.MethodType(dispatch_v0, v0)
    variants["moe-v0"] = (lambda: v0(x).y, [x, *v0.parameters()])  # noqa: F821 (deleted later; ruff reads the del as unbinding)

    # Same function: the current dispatch and v0 give the same output (fp32: 1e-5; bf16: rounding).
    with torch.no_grad():
        a, b = moe(x).y.float(), v0(x).y.float()
        rel = float((a - b).norm() / b.norm())
    result: dict[str, Any] = {
        "layout": {"n_routed_experts": layout[0], "top_k": layout[1], "n_shared_experts": layout[2],
                   "moe_inter_dim": cfg.moe_inter_dim, "dense_inter_dim": cfg.inter_dim, "dim": cfg.dim},
        "activated_params_per_token": {"moe_experts": 3 * cfg.dim * cfg.moe_inter_dim * (layout[1] + layout[2]),
                                       "moe_gate": cfg.dim * layout[0], "dense": 3 * cfg.dim * cfg.inter_dim},
        "total_params": {"moe": sum(p.numel() for p in moe.parameters()),
                         "dense": sum(p.numel() for p in dense.parameters())},
        "tokens": tokens, "moe_dispatch_impl": moe.resolve_impl(x), "rel_diff_moe_vs_v0": rel, "variants": {},
    }
    if args.compile and full and name == ACCEPTANCE_LAYOUT:  # torch.compile of both layers (default mode)
        cdense, cmoe = torch.compile(dense), torch.compile(moe)
        variants["dense-compile"] = (lambda: cdense(x), [x, *dense.parameters()])
        variants["moe-compile"] = (lambda: cmoe(x).y, [x, *moe.parameters()])
    flops = 6 * 3 * cfg.dim * cfg.inter_dim * tokens  # fwd 2, bwd 4 FLOPs per weight per token; 3 matrices
    for vname, (fn, params) in list(variants.items()):
        print(f"[{name}] {vname} ...", flush=True)
        try:
            t = time_repeats(fwd_bwd(fn, grad, list(params)), device, repeats=args.repeats, warmup=args.warmup)
        except Exception as exc:  # noqa: BLE001 -- a compile failure is recorded, an eager one re-raised
            if not vname.endswith("-compile"):
                raise
            result.setdefault("errors", {})[vname] = f"{type(exc).__name__}: {exc}"[:2000]
            del variants[vname]
            continue
        v = {"tokens_per_s": rate(tokens, t, "tokens/s (forward + backward)"), "step_s": summarize(t.samples_s, "s"),
             "warmup_s": t.warmup_s,
             "matmul_flops_per_s": summarize([flops / s for s in t.samples_s], "FLOP/s (expert/dense matmuls only)")}
        if device.type == "cpu":
            v["tokens_per_cpu_s"] = rate_per_cpu_second(tokens, t, "tokens")
        result["variants"][vname] = v
    med = {k: v["tokens_per_s"]["median"] for k, v in result["variants"].items()}
    if "moe-compile" in med and "dense-compile" in med:
        result["ratios_compiled"] = {"moe-compile / dense-compile": med["moe-compile"] / med["dense-compile"],
                                     "moe-compile / moe": med["moe-compile"] / med["moe"]}
    result["ratios"] = {"moe / dense": med["moe"] / med["dense"], "moe-loop / dense": med["moe-loop"] / med["dense"],
                        "moe-v0 / dense": med["moe-v0"] / med["dense"], "moe / moe-loop": med["moe"] / med["moe-loop"],
                        "moe / moe-v0": med["moe"] / med["moe-v0"]}
    if device.type == "cpu":
        cpu = {k: v["tokens_per_cpu_s"]["median"] for k, v in result["variants"].items()}
        result["ratios_cpu_time"] = {"moe / dense": cpu["moe"] / cpu["dense"],
                                     "moe-loop / dense": cpu["moe-loop"] / cpu["dense"],
                                     "moe-v0 / dense": cpu["moe-v0"] / cpu["dense"]}
    if not full:
        del moe, v0, dense, loop
        return result
    print(f"[{name}] breakdown ...", flush=True)
    x2d = x.detach().reshape(-1, cfg.dim)
    stages = stage_breakdown(moe, x2d, device, args.repeats, args.warmup)
    total = result["variants"]["moe"]["step_s"]["median"]
    timed = {k: v for k, v in stages.items() if k != "experts_impl"}
    result["breakdown"] = {
        "stages_s": stages,
        "stage_share_of_moe_step": {k: v["median"] / total for k, v in timed.items()},
        "unattributed_share": 1 - sum(v["median"] for v in timed.values()) / total,
        "dense_step_s": result["variants"]["dense"]["step_s"]["median"],
        "moe_step_s": total,
    }
    if not args.no_profile:
        print(f"[{name}] profile ...", flush=True)
        result["profile_moe"] = profile_table(fwd_bwd(variants["moe"][0], grad, list(variants["moe"][1])), device)
        result["profile_moe_loop"] = profile_table(fwd_bwd(variants["moe-loop"][0], grad,
                                                           list(variants["moe-loop"][1])), device)
        result["profile_moe_v0"] = profile_table(fwd_bwd(variants["moe-v0"][0], grad, list(variants["moe-v0"][1])),
                                                 device)
        result["profile_dense"] = profile_table(fwd_bwd(variants["dense"][0], grad, list(variants["dense"][1])),
                                                device, top=5)
        if device.type == "cuda":  # kernel time over wall time: near 1 = GPU-bound, far below = host-bound
            result["gpu_busy_fraction"] = {
                k: result[f"profile_{k.replace('-', '_')}"]["device_kernel_ms_per_step"]
                / (result["variants"][k]["step_s"]["median"] * 1e3) for k in ("dense", "moe", "moe-loop", "moe-v0")}
    del moe, v0, dense, loop
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dim", type=int, default=None, help="D (default: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--width", type=int, default=None, help="M, the width of a non-fine-grained expert "
                                                           "(default: 1024 on CUDA, 128 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 8 on CUDA, 4 on CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048 on CUDA, 256 on CPU)")
    p.add_argument("--scaling-batches", default=None,
                   help="comma-separated batch sizes at which the 8-expert layout is timed again (default: 32 on "
                        "CUDA, none on CPU)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layouts", default="all", help="comma-separated indices into LAYOUTS (0, 1, 2) or 'all'")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default; 1 on a shared machine)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd dense and MoE layers (the first layout, with its breakdown)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: the smoke test")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    defaults = dict(dim=2048, width=1024, batch=8, seq_len=2048, repeats=20) if on_cuda else \
        dict(dim=256, width=128, batch=4, seq_len=256, repeats=7)
    if args.quick:
        defaults = dict(dim=64, width=32, batch=2, seq_len=32, repeats=2)
        args.warmup = 1
    if args.scaling_batches is None:
        args.scaling_batches = "32" if on_cuda and not args.quick else ""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = list(LAYOUTS) if args.layouts == "all" else [list(LAYOUTS)[int(i)] for i in args.layouts.split(",")]

    payload: dict[str, Any] = {
        "benchmark": "moe_layer",
        "created_utc": now_utc(),
        "command": command_line("moe_layer.py", argv),
        "machine": machine_info(device),
        "settings": {"dim": args.dim, "width_M": args.width, "batch": args.batch, "seq_len": args.seq_len,
                     "tokens": args.batch * args.seq_len, "dtype": str(dtype).removeprefix("torch."),
                     "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick},
        "method": ("forward + backward of one layer (input and weight gradients), a fixed random upstream gradient; "
                   "host clock around each repeat with the device synchronised; median over repeats; dense = SwiGLU "
                   "of width (K + n_shared) * moe_inter_dim. Stage breakdown: each stage run on its own, forward + "
                   "backward, same timing."),
        "layouts": {},
    }
    print(f"device {device}, torch {torch.__version__}, {dtype}, D={args.dim}, M={args.width}, "
          f"tokens={args.batch * args.seq_len}, threads {torch.get_num_threads()}", flush=True)
    load = machine_load()
    if load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores: wall-clock figures will be noisy", flush=True)
    if on_cuda and not args.quick:
        payload["peak_bf16_matmul"] = matmul_peak(device, torch.bfloat16, 8192, repeats=5, inner=5)
    for name in names:
        payload["layouts"][name] = bench_layout(name, LAYOUTS[name], args, device, dtype, args.batch)
        if args.out is not None:
            write_json(args.out, payload)
    # Launch and host costs per layer call are fixed while the matmul work grows with the tokens: the
    # acceptance layout again at larger batches, same method (no breakdown).
    for b in [int(v) for v in args.scaling_batches.split(",") if v.strip()]:
        key = f"{ACCEPTANCE_LAYOUT}, {b * args.seq_len} tokens"
        payload.setdefault("token_scaling", {})[key] = bench_layout(key, LAYOUTS[ACCEPTANCE_LAYOUT], args, device,
                                                                    dtype, b, full=False)
        if args.out is not None:
            write_json(args.out, payload)
    payload["finished_utc"] = now_utc()
    payload["load_average_1min_at_end"] = machine_load()
    if ACCEPTANCE_LAYOUT in payload["layouts"]:
        r = payload["layouts"][ACCEPTANCE_LAYOUT]["ratios"]["moe / dense"]
        payload["acceptance"] = {"layout": ACCEPTANCE_LAYOUT, "moe_over_dense_tokens_per_s": r, "at_least_0.5": r >= 0.5}
    if args.out is not None:
        write_json(args.out, payload)
    print_table(payload)
    return payload


def print_table(payload: dict[str, Any]) -> None:
    print()
    for name, r in payload["layouts"].items():
        tps = {k: v["tokens_per_s"]["median"] for k, v in r["variants"].items()}
        ratios = r["ratios"]
        print(f"{name}: dense {tps['dense']:,.0f}  moe ({r['moe_dispatch_impl']}) {tps['moe']:,.0f}  "
              f"moe-loop {tps['moe-loop']:,.0f}  moe-v0 {tps['moe-v0']:,.0f} tokens/s | "
              f"moe/dense {ratios['moe / dense']:.2f}  loop/dense {ratios['moe-loop / dense']:.2f}  "
              f"v0/dense {ratios['moe-v0 / dense']:.2f}  "
              f"(rel diff moe vs v0 {r['rel_diff_moe_vs_v0']:.1e})")
        share = r["breakdown"]["stage_share_of_moe_step"]
        print("   breakdown of the moe step: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items())
              + f", unattributed {100 * r['breakdown']['unattributed_share']:.0f}%")
        if "ratios_compiled" in r:
            print(f"   compiled: moe/dense {r['ratios_compiled']['moe-compile / dense-compile']:.2f}")
        for vname, err in r.get("errors", {}).items():
            print(f"   {vname} failed: {err[:200]}")
    for key, r in payload.get("token_scaling", {}).items():
        print(f"{key}: moe/dense {r['ratios']['moe / dense']:.2f}, loop/dense {r['ratios']['moe-loop / dense']:.2f}, "
              f"v0/dense {r['ratios']['moe-v0 / dense']:.2f}")
    if "acceptance" in payload:
        a = payload["acceptance"]
        print(f"acceptance ({a['layout']}): moe/dense = {a['moe_over_dense_tokens_per_s']:.2f} (>= 0.5: {a['at_least_0.5']})")


if __name__ == "__main__":
    main()
