"""Router statistics of a trained tiny DeepSeek for EPLB (notebook 11): tokens per expert per MoE layer.

Trains `PRESETS["tiny"]` on Shakespeare (defaults below: a short run, minutes on a CPU) or loads a
checkpoint that run wrote, routes the first `--batches` x `--seq-len` validation tokens through it and
records each MoE layer's load (tokens per routed expert, `deepseek_edu.parallel.eplb.expert_loads`),
with the train config of the model that produced them. Notebook 11 places redundant experts from it.

    python benchmarks/eplb_loads.py --out benchmarks/results/eplb_loads_cpu.json
    python benchmarks/eplb_loads.py --checkpoint runs/eplb/checkpoint.safetensors --out ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import command_line, machine_info, now_utc, write_json
from deepseek_edu.checkpoint import load_checkpoint, load_model
from deepseek_edu.config import TrainConfig, get_preset
from deepseek_edu.data import load_dataset
from deepseek_edu.parallel.eplb import expert_loads
from deepseek_edu.train import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint of this script's run (else train one)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batches", type=int, default=8, help="validation sequences routed")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--run-dir", default="runs/eplb_loads")
    p.add_argument("--out", default="benchmarks/results/eplb_loads_cpu.json")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        cfg = get_preset("tiny")
        tc = TrainConfig(corpus="shakespeare", vocab_size=cfg.vocab_size, max_steps=args.steps, batch_size=8,
                         seq_len=64, warmup_steps=4, eval_every=0, eval_batches=2, out_dir=args.run_dir)
        train(cfg, tc, progress=False)
        args.checkpoint = str(Path(args.run_dir) / "checkpoint.safetensors")
    ckpt = load_checkpoint(args.checkpoint)
    model, _ = load_model(args.checkpoint)
    tc = ckpt.train_config
    ds = load_dataset(tc.corpus, tc.vocab_size, progress=False)
    tokens = ds.val[: args.batches * args.seq_len].view(args.batches, args.seq_len)
    loads = expert_loads(model, tokens)
    train_dict = tc.to_dict()
    train_dict["out_dir"] = Path(train_dict["out_dir"]).name  # no path of the machine in a committed file
    write_json(args.out, {
        "benchmark": "eplb_loads", "created": now_utc(), "command": command_line("eplb_loads.py", argv),
        "machine": machine_info(torch.device("cpu")), "model_config": model.cfg.to_dict(),
        "train_config": train_dict, "step": ckpt.step, "tokens_routed": int(tokens.numel()),
        "n_routed_experts": model.cfg.n_routed_experts, "n_expert_groups": model.cfg.n_expert_groups,
        "loads": [[float(v) for v in layer] for layer in loads],
    })
    print(f"wrote {args.out}: {len(loads)} MoE layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
