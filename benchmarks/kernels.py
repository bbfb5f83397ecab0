"""Our Triton kernels against the ceilings measured in the same run (chapter 09, issue "GPU kernels").

One run measures, on a CUDA GPU:

- **ceilings**: device-to-device copy bandwidth ((bytes read + bytes written) / time); BF16 8192^3
  matmul (FLOP/s); `torch._scaled_mm` blockwise FP8 (1 x 128 activation scales, 128 x 128 weight
  scales) at 8192^3, guarded where this torch or GPU does not support it;
- **act_quant** and **weight_dequant** at 8192 x 8192 (bf16 <-> E4M3): bytes moved per second and
  the ratio to the copy bandwidth (each kernel's docstring gives its bytes);
- **fp8_gemm** at 8192^3 and DeepSeek-V3 shapes (decode M = 64, prefill M = 4096; N x K of wq_b
  24576 x 1536 and the dense FFN's w2 7168 x 18432): FLOP/s and the ratio to `_scaled_mm` blockwise
  and to the BF16 matmul;
- **mla_decode** at V3 shapes (C = 512, R = 64, one query token) for H = 128 and 16, batch 1, 64, 128,
  context 1K-32K, bf16 and FP8 (656-byte) caches, beside the plain-PyTorch absorbed einsums
  (`mla_decode_ref`) and `scaled_dot_product_attention` used as MQA: FLOP/s (4HC + 2HR per query per
  cached token), cache bytes per second, and the ratios to the BF16 matmul and copy ceilings.

`--check` runs every kernel once at tiny sizes against its `_ref` twin (on CPU: Triton's interpreter)
and writes no figure: it is what CI runs (tests/test_kernels.py). Run from the repository root::

    python benchmarks/kernels.py --check                          # CPU, seconds
    python benchmarks/kernels.py --out benchmarks/results/kernels_h200.json   # CUDA, a few minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deepseek_edu without installing it

from _common import (
    command_line,
    machine_info,
    matmul_peak,
    now_utc,
    rate,
    summarize,
    time_repeats,
    write_json,
)

from deepseek_edu.kernels import (
    act_quant,
    act_quant_ref,
    fp8_gemm,
    fp8_gemm_ref,
    mla_decode,
    mla_decode_ref,
    quantize_mla_cache,
    weight_dequant,
    weight_dequant_ref,
    weight_quant_ref,
)
from deepseek_edu.kernels.mla_decode import dequantize_mla_cache, fp8_cache_bytes_per_token

C, R = 512, 64  # DeepSeek-V3's kv_lora_rank and qk_rope_head_dim
SOFTMAX_SCALE = 192 ** -0.5  # 1/sqrt(N + R) (without YaRN's mscale: the speed does not depend on it)


def check(device: torch.device) -> dict[str, Any]:
    """Every kernel once at tiny sizes against its reference; raises AssertionError on a mismatch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g).to(device)
    y, s = act_quant(x)
    y_ref, s_ref = act_quant_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(y.float(), y_ref.float()), "act_quant"
    w, w_s = weight_quant_ref(torch.randn(130, 256, generator=g).to(device))
    assert torch.equal(weight_dequant(w, w_s, dtype=torch.float32), weight_dequant_ref(w, w_s, dtype=torch.float32))
    c = fp8_gemm(y, s, w, w_s)
    torch.testing.assert_close(c.float(), fp8_gemm_ref(y, s, w, w_s, out_dtype=torch.float32), rtol=2 ** -7, atol=1e-5)
    q, q_pe = torch.randn(2, 1, 4, 128, generator=g).to(device), torch.randn(2, 1, 4, 16, generator=g).to(device)
    kv, pe = torch.randn(2, 70, 128, generator=g).to(device), torch.randn(2, 70, 16, generator=g).to(device)
    torch.testing.assert_close(mla_decode(q, q_pe, kv, pe, 0.1, num_splits=2), mla_decode_ref(q, q_pe, kv, pe, 0.1))
    cache = quantize_mla_cache(kv, pe)
    kv8, pe8 = dequantize_mla_cache(cache, 128, torch.float32)
    torch.testing.assert_close(mla_decode(q, q_pe, None, None, 0.1, fp8_cache=cache), mla_decode_ref(q, q_pe, kv8, pe8, 0.1))
    return {"act_quant": "ok", "weight_dequant": "ok", "fp8_gemm": "ok", "mla_decode": "ok", "mla_decode_fp8": "ok"}


def _timed(fn, device: torch.device, inner: int, repeats: int) -> Any:
    def run():
        for _ in range(inner):
            fn()
    return time_repeats(run, device, repeats=repeats, warmup=2)


def _entry(timing, inner: int, flops: float | None, nbytes: float, ceilings: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": summarize([t / inner for t in timing.samples_s], "s"),
                           "bytes_per_s": rate(nbytes * inner, timing, "B/s")}
    out["ratio_to_copy"] = out["bytes_per_s"]["median"] / ceilings["copy_Bps"]
    if flops is not None:
        out["flops_per_s"] = rate(flops * inner, timing, "FLOP/s")
        out["ratio_to_bf16_matmul"] = out["flops_per_s"]["median"] / ceilings["bf16_matmul_flops"]
        if ceilings.get("scaled_mm_blockwise_flops"):
            out["ratio_to_scaled_mm_blockwise"] = out["flops_per_s"]["median"] / ceilings["scaled_mm_blockwise_flops"]
    return out


def scaled_mm_blockwise(device: torch.device, n: int = 8192, repeats: int = 10) -> dict[str, Any]:
    """`torch._scaled_mm` with 1 x 128 / 128 x 128 scales, trying the scale layouts torch versions want."""
    gen = torch.Generator().manual_seed(1)
    a, a_s = act_quant_ref(torch.randn(n, n, generator=gen).to(device, torch.bfloat16))
    b, b_s = weight_quant_ref(torch.randn(n, n, generator=gen).to(device, torch.bfloat16))
    layouts = {  # scale_a (M, K/128) and scale_b (K/128, N/128), in outer-dim-major or row-major storage
        "scales_outer_major": (a_s.t().contiguous().t(), b_s.t()),
        "scales_row_major": (a_s, b_s.t().contiguous()),
    }
    errors = {}
    for name, (sa, sb) in layouts.items():
        try:
            out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            ref = fp8_gemm_ref(a[:256], a_s[:256], b, b_s)
            err = ((out[:256].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            timing = _timed(lambda sa=sa, sb=sb: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb,
                                                                   out_dtype=torch.bfloat16), device, 5, repeats)
            return {"n": n, "layout": name, "max_rel_err_vs_ref": err, "flops_per_s": rate(2.0 * n**3 * 5, timing, "FLOP/s")}
        except (RuntimeError, TypeError, ValueError) as e:  # unsupported on this torch/GPU
            errors[name] = str(e).splitlines()[0][:300]
    return {"n": n, "unsupported": errors}


def bench_quant(device, ceilings, n: int = 8192) -> dict[str, Any]:
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    act = _timed(lambda: act_quant(x), device, 10, 10)
    w, w_s = weight_quant_ref(x)
    deq = _timed(lambda: weight_dequant(w, w_s, dtype=torch.bfloat16), device, 10, 10)
    nbytes = n * n * (2 + 1) + 4 * n * n / 128  # read bf16, write e4m3 + scales
    return {"act_quant": {"shape": [n, n], **_entry(act, 10, None, nbytes, ceilings)},
            "weight_dequant": {"shape": [n, n], **_entry(deq, 10, None, n * n * 3 + 4 * n * n / 16384, ceilings)}}


def _gemm_row(device, ceilings, M: int, N: int, K: int) -> dict[str, Any]:
    a, a_s = act_quant(torch.randn(M, K, device=device, dtype=torch.bfloat16))
    b, b_s = weight_quant_ref(torch.randn(N, K, device=device, dtype=torch.bfloat16))
    inner = 5 if M * N * K > 2**36 else 20
    timing = _timed(lambda: fp8_gemm(a, a_s, b, b_s), device, inner, 10)
    nbytes = M * K + N * K + 2 * M * N + 4 * M * K / 128 + 4 * N * K / 16384
    return {"M": M, "N": N, "K": K, **_entry(timing, inner, 2.0 * M * N * K, nbytes, ceilings)}


def bench_gemm(device, ceilings) -> list[dict[str, Any]]:
    shapes = [(8192, 8192, 8192), (64, 24576, 1536), (4096, 24576, 1536), (64, 7168, 18432), (4096, 7168, 18432)]
    return [_gemm_row(device, ceilings, *mnk) for mnk in shapes]


def _mla_row(device, ceilings, H: int, B: int, T: int, gen: torch.Generator) -> dict[str, Any]:
    q = torch.randn(B, 1, H, C, device=device, dtype=torch.bfloat16, generator=gen)
    q_pe = torch.randn(B, 1, H, R, device=device, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(B, T, C, device=device, dtype=torch.bfloat16, generator=gen)
    pe = torch.randn(B, T, R, device=device, dtype=torch.bfloat16, generator=gen)
    cache = quantize_mla_cache(kv, pe)
    flops = B * H * T * (4 * C + 2 * R)
    inner = 20 if B * T < 2**20 else 5
    qs = torch.cat([q, q_pe], -1).transpose(1, 2)  # (B, H, 1, C+R)
    ks = torch.cat([kv, pe], -1)[:, None]  # (B, 1, T, C+R): one key head (MQA)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, kv[:, None], scale=SOFTMAX_SCALE,
                                                                enable_gqa=True)

    paths = {
        "triton_bf16": (lambda: mla_decode(q, q_pe, kv, pe, SOFTMAX_SCALE), 2 * (C + R)),
        "triton_fp8": (lambda: mla_decode(q, q_pe, None, None, SOFTMAX_SCALE, fp8_cache=cache),
                       fp8_cache_bytes_per_token(C, R)),
        "torch_absorbed": (lambda: mla_decode_ref(q, q_pe, kv, pe, SOFTMAX_SCALE), 2 * (C + R)),
        "sdpa_mqa": (sdpa, 2 * (C + R)),
    }
    ref = mla_decode_ref(q, q_pe, kv, pe, SOFTMAX_SCALE).float()
    row: dict[str, Any] = {"H": H, "B": B, "T": T}
    for name, (fn, bytes_per_token) in paths.items():
        try:
            if name.startswith("triton"):
                row[name + "_max_abs_err_vs_torch"] = (fn().float() - ref).abs().max().item()
            timing = _timed(fn, device, inner, 5)
            row[name] = _entry(timing, inner, flops, B * T * bytes_per_token, ceilings)
        except (RuntimeError, TypeError) as e:  # e.g. SDPA without enable_gqa on an older torch
            row[name] = {"error": str(e).splitlines()[0][:300]}
    t, a = row.get("triton_bf16", {}), row.get("torch_absorbed", {})
    if "flops_per_s" in t and "flops_per_s" in a:
        row["triton_bf16_over_torch"] = t["flops_per_s"]["median"] / a["flops_per_s"]["median"]
    return row


def bench_mla(device, ceilings, quick: bool) -> list[dict[str, Any]]:
    out = []
    gen = torch.Generator(device=device).manual_seed(2)
    contexts = [1024, 4096] if quick else [1024, 4096, 16384, 32768]
    for H in (128, 16):
        for B in (1, 64, 128):
            for T in contexts:
                if B * T * (C + R) * 2 * 2 + B * H * T * 4 * 2 > 40e9:  # cache (two copies) + ref's scores
                    out.append({"H": H, "B": B, "T": T, "skipped": "memory estimate over 40 GB"})
                    continue
                out.append(_mla_row(device, ceilings, H, B, T, gen))
                torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="correctness only, tiny sizes (CPU: the interpreter)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer contexts (GPU smoke test)")
    p.add_argument("--out", default=None, help="JSON path (default: none for --check)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"benchmark": "kernels", "created_utc": now_utc(), "argv": command_line("kernels.py", argv),
                               "machine": machine_info(device)}
    payload["check"] = check(device)
    print("check: every kernel equals its reference")
    if not args.check:
        if device.type != "cuda":
            print("the measurements need a CUDA GPU: run with --check on CPU", file=sys.stderr)
            return 2
        copy = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(copy)
        copy_t = _timed(lambda: dst.copy_(copy), device, 10, 10)
        bf16 = matmul_peak(device, torch.bfloat16, 8192, inner=10)
        ceil = {"device_copy": {"bytes": 2**31, "Bps": rate(2.0**31 * 10, copy_t, "B/s")},
                "bf16_matmul": bf16, "scaled_mm_blockwise": scaled_mm_blockwise(device)}
        del copy, dst
        payload["ceilings"] = ceil
        ceilings = {"copy_Bps": ceil["device_copy"]["Bps"]["median"],
                    "bf16_matmul_flops": bf16["flops_per_s"]["median"],
                    "scaled_mm_blockwise_flops": ceil["scaled_mm_blockwise"].get("flops_per_s", {}).get("median")}
        payload.update(bench_quant(device, ceilings))
        payload["fp8_gemm"] = bench_gemm(device, ceilings)
        payload["mla_decode"] = bench_mla(device, ceilings, args.quick)
    payload["total_s"] = time.perf_counter() - t0
    if args.out:
        print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
