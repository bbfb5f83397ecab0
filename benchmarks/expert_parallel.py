"""Expert-parallel dispatch and combine: time and bandwidth per rank, beside an all-to-all ceiling.

V3-like shapes: hidden D = 7168, top-K = 8 of E = 256 routed experts, 128-4096 tokens per rank, routed
uniformly at random (a balanced router). Per rank and per tokens-per-rank it times, with the exchange
code of `deepseek_edu.parallel.expert_parallel` (counts first, then `all_to_all_single` with uneven splits):

- **dispatch BF16**: K rows of D bf16 values per token (2 D bytes a row);
- **dispatch FP8**: K rows of D bytes + one fp32 scale per 128 values (sent as raw bytes; the
  quantisation itself is not timed, DeepEP fuses it into the kernel);
- **combine BF16**: the rows back;
- **ceiling**: one `all_to_all_single` with equal splits of the same bytes, measured in the same run.

Bandwidth = bytes this rank sends to *other* ranks / seconds (the row to itself does not travel), the
median over repeats, reported per rank; DeepEP's published intranode figures (H800, EP8 normal
kernels: ~153 GB/s dispatch, ~158 GB/s combine over NVLink) are the reference for a GPU run.

    python benchmarks/expert_parallel.py --check                       # CPU, gloo, 2 ranks, small: seconds
    python benchmarks/expert_parallel.py --world-size 2 --out benchmarks/results/expert_parallel_h200x2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import command_line, machine_info, now_utc, summarize, time_repeats, write_json
from deepseek_edu.parallel.expert_parallel import FP8_SCALE_BLOCK, all_to_all_rows, exchange_counts
from deepseek_edu.parallel.launch import default_backend, run_ranks

DEEPEP_H800_EP8_GBPS = {"dispatch": 153.0, "combine": 158.0}  # DeepEP README, intranode normal kernels


def _row_bytes(dim: int, fmt: str) -> int:
    return 2 * dim if fmt == "bf16" else dim + 4 * -(-dim // FP8_SCALE_BLOCK)


def _bench_rank(rank: int, world_size: int, dim: int, topk: int, n_experts: int, tokens: list[int],
                repeats: int) -> list[dict]:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    g = torch.Generator().manual_seed(rank)
    local = n_experts // world_size
    out = []
    for n in tokens:
        idx = torch.randint(0, n_experts, (n * topk,), generator=g).to(device)  # balanced on average
        counts = torch.zeros(n_experts, dtype=torch.int64, device=device).scatter_add_(
            0, idx, torch.ones_like(idx)).view(world_size, local)
        in_splits = counts.sum(1).tolist()
        out_splits = exchange_counts(counts).sum(1).tolist()
        record = {"tokens_per_rank": n}
        for fmt in ("bf16", "fp8"):
            rb = _row_bytes(dim, fmt)
            rows = torch.zeros(n * topk, rb, dtype=torch.uint8, device=device)  # the payload as raw bytes

            def dispatch(rows=rows, counts=counts, in_splits=in_splits):
                recv = exchange_counts(counts)  # the counts go first, every time
                return all_to_all_rows(rows, recv.sum(1).tolist(), in_splits)

            t = time_repeats(dispatch, device, repeats, warmup=2)
            sent = (sum(in_splits) - in_splits[rank]) * rb
            record[f"dispatch_{fmt}"] = {"bytes_sent_to_others": sent, "seconds": summarize(t.samples_s, "s"),
                                        "GB_per_s": sent / summarize(t.samples_s, "s")["median"] / 1e9}
        back = torch.zeros(sum(out_splits), 2 * dim, dtype=torch.uint8, device=device)
        t = time_repeats(lambda back=back, a=in_splits, b=out_splits: all_to_all_rows(back, a, b), device, repeats,
                         warmup=2)
        sent = (sum(out_splits) - out_splits[rank]) * 2 * dim
        record["combine_bf16"] = {"bytes_sent_to_others": sent, "seconds": summarize(t.samples_s, "s"),
                                  "GB_per_s": sent / summarize(t.samples_s, "s")["median"] / 1e9}
        total = n * topk * 2 * dim // world_size * world_size  # equal splits, the same bytes as BF16 dispatch
        flat = torch.zeros(total, dtype=torch.uint8, device=device)
        sink = torch.empty_like(flat)
        t = time_repeats(lambda flat=flat, sink=sink: dist.all_to_all_single(sink, flat), device, repeats, warmup=2)
        sent = total // world_size * (world_size - 1)
        record["ceiling_all_to_all"] = {"bytes_sent_to_others": sent, "seconds": summarize(t.samples_s, "s"),
                                        "GB_per_s": sent / summarize(t.samples_s, "s")["median"] / 1e9}
        out.append(record)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="small CPU run with gloo (seconds)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: NCCL when CUDA is present")
    p.add_argument("--tokens", default="128,512,1024,4096", help="tokens per rank")
    p.add_argument("--dim", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    if args.check:
        args.backend, args.tokens, args.dim, args.repeats = "gloo", "16,64", 256, 3
    backend = args.backend or default_backend(args.world_size)
    tokens = [int(t) for t in args.tokens.split(",")]
    per_rank = run_ranks(_bench_rank, args.world_size, backend=backend, timeout_s=300,
                         args=(args.dim, args.topk, args.experts, tokens, args.repeats))
    for i, n in enumerate(tokens):
        line = [f"{n:5d} tokens/rank"]
        for key in ("dispatch_bf16", "dispatch_fp8", "combine_bf16", "ceiling_all_to_all"):
            worst = min(r[i][key]["GB_per_s"] for r in per_rank)
            line.append(f"{key} {worst:7.2f} GB/s")
        print(" | ".join(line))
    if args.out:
        device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        write_json(args.out, {
            "benchmark": "expert_parallel", "created": now_utc(), "command": command_line("expert_parallel.py", argv),
            "machine": machine_info(device), "backend": backend, "world_size": args.world_size,
            "dim": args.dim, "topk": args.topk, "n_routed_experts": args.experts,
            "deepep_h800_ep8_GBps": DEEPEP_H800_EP8_GBPS, "per_rank": per_rank})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
