"""Forward + backward of `FP8Linear` against a BF16 `nn.Linear` (DeepSeek-V3 §3.3, Fig. 6).

The layer of V3's shape class: 4096 x 4096 weights, 8192 tokens per call; one call = forward, then
backward (input and weight gradients) -- three GEMMs of 2 * T * K * M FLOPs each. Reported:
tokens/s of each layer (median and spread), the FP8/BF16 ratio, and which path FP8Linear took.

- `--check` (CPU, seconds): small irregular shapes; FP8Linear's output and gradients against a
  BF16 and an FP32 nn.Linear of the same weights (relative errors), and the exact emulation checked
  bit for bit against the quantise-dequantise reference; with `--device cuda`, also the tensor-core
  path (`torch._scaled_mm`) against the emulation. Exits non-zero on a failed check.
- `--device cuda`: the timing at full size (the GPU-measurement issue runs it). FP8Linear runs
  the exact emulation in FP32 unless the GPU path is available (see `deepseek_edu.fp8`).

Run (from the repository root)::

    python benchmarks/fp8_linear.py --check
    python benchmarks/fp8_linear.py --device cuda --out benchmarks/results/fp8_linear_h200.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import command_line, machine_info, now_utc, rate, summarize, time_repeats, write_json

from deepseek_edu import fp8
from deepseek_edu.fp8 import FP8Linear, fake_quant


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check(device: torch.device, tokens: int = 300, k: int = 384, m: int = 260) -> dict:
    """FP8Linear against FP32/BF16 nn.Linear and against its own reference; on CUDA also the
    tensor-core path (impl "auto") against the emulation at shapes of whole 128-tiles."""
    if device.type == "cuda":
        tokens, k, m = 512, 384, 256
    torch.manual_seed(0)
    ref = nn.Linear(k, m, bias=False, device=device)
    bf16 = nn.Linear(k, m, bias=False, dtype=torch.bfloat16, device=device)
    bf16.weight.data.copy_(ref.weight.data)
    f8 = FP8Linear(k, m, bias=False, device=device)
    f8.weight.data.copy_(ref.weight.data)
    f8e = FP8Linear(k, m, bias=False, device=device)
    f8e.weight.data.copy_(ref.weight.data)
    f8e.impl = "emulate"
    x = torch.randn(tokens, k, device=device)
    dy = torch.randn(tokens, m, device=device)
    out = {}
    for name, layer, dtype in (("fp32", ref, torch.float32), ("bf16", bf16, torch.bfloat16), ("fp8", f8, torch.float32),
                               ("fp8_emulated", f8e, torch.float32)):
        xi = x.detach().to(dtype).clone().requires_grad_()
        y = layer(xi)
        y.backward(dy.to(y.dtype))
        out[name] = (y.detach().float(), xi.grad.float(), layer.weight.grad.float())
    res = {f"{name}_vs_fp32_{part}": rel(out[name][i], out["fp32"][i])
           for name in ("bf16", "fp8") for i, part in enumerate(("y", "dx", "dw"))}
    res.update({f"fp8_vs_emulated_{part}": rel(out["fp8"][i], out["fp8_emulated"][i]) for i, part in enumerate(("y", "dx", "dw"))})
    xq, wq = fake_quant(x, "blockwise", "row"), fake_quant(ref.weight.detach(), "blockwise", "block")
    res["emulation_forward_bit_exact"] = bool(torch.equal(out["fp8_emulated"][0], xq @ wq.t()))
    res["scaled_mm_layouts"] = {str(key): v for key, v in fp8._SCALED_MM_LAYOUT.items()}
    res["ok"] = (res["emulation_forward_bit_exact"] and all(v < 0.1 for key, v in res.items() if key.startswith("fp8_vs_fp32"))
                 and all(v < 0.01 for key, v in res.items() if key.startswith("fp8_vs_emulated")))
    return res


def bench(device: torch.device, tokens: int, k: int, m: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device=device)
    dy = torch.randn(tokens, m, device=device)
    results = {}
    for name in ("bf16", "fp8"):
        if name == "bf16":
            layer = nn.Linear(k, m, bias=False, device=device, dtype=torch.bfloat16)
            xi, dyi = x.bfloat16().requires_grad_(), dy.bfloat16()
        else:
            layer = FP8Linear(k, m, bias=False, device=device)
            xi, dyi = x.clone().requires_grad_(), dy

        def step(layer: nn.Module = layer, xi: torch.Tensor = xi, dyi: torch.Tensor = dyi) -> None:
            xi.grad = None
            layer.weight.grad = None
            layer(xi).backward(dyi)

        t = time_repeats(step, device, repeats, warmup=2)
        results[name] = {"seconds": summarize(t.samples_s, "s"), "tokens_per_s": rate(tokens, t, "tokens/s"),
                         "tflops": rate(3 * 2 * tokens * k * m / 1e12, t, "TFLOP/s")}
    results["fp8_over_bf16_tokens_per_s"] = (results["fp8"]["tokens_per_s"]["median"]
                                             / results["bf16"]["tokens_per_s"]["median"])
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="correctness at small irregular shapes (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    payload = {"script": "benchmarks/fp8_linear.py", "command": command_line(__file__, argv), "date_utc": now_utc(),
               "machine": machine_info(device), "config": vars(args)}
    if args.check:
        payload["check"] = check(device)
        print("check:", payload["check"])
    else:
        payload["results"] = bench(device, args.tokens, args.k, args.m, args.repeats)
        payload["results"]["scaled_mm_layouts"] = {str(key): v for key, v in fp8._SCALED_MM_LAYOUT.items()}
        r = payload["results"]
        print(f"bf16 {r['bf16']['tokens_per_s']['median']:.0f} tokens/s, fp8 {r['fp8']['tokens_per_s']['median']:.0f} "
              f"tokens/s, ratio {r['fp8_over_bf16_tokens_per_s']:.2f}")
    payload["wall_s"] = time.perf_counter() - t0
    if args.out:
        write_json(args.out, payload)
    if args.check and not payload["check"]["ok"]:
        sys.exit(1)
    return payload


if __name__ == "__main__":
    main()
