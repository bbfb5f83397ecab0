"""Data-parallel training: `torchrun --nproc_per_node=2 -m deepseek_edu train --steps 20` runs on CPU
(gloo) and equals the one-process run at the same global batch (losses within 1e-5, weights within
1e-4 -- the gradient average rounds differently, AdamW's normalisation magnifies that in weights that
barely move -- and the router biases exactly, because the loads are all-reduced); rank 0 alone writes
files; resume continues exactly; a global batch not divisible by the ranks is a named error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepseek_edu.__main__ import main
from deepseek_edu.config import TrainConfig, get_preset
from deepseek_edu.parallel.launch import RankError, run_ranks

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "tiny", "--corpus", "python-docs", "--vocab-size", "512", "--dim", "32", "--n-layers", "2",
         "--n-heads", "2", "--inter-dim", "64", "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4",
         "--eval-batches", "2", "--threads", "1", "--no-progress", "--sample-tokens", "0", "--device", "cpu"]
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_equals_one_process(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # `python -m torch.distributed.run` is the `torchrun` command
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "deepseek_edu", "train", "--steps", "20",
                          *SMALL, "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("validation loss:") == 1  # rank 1 prints nothing
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.safetensors", "metrics.jsonl"]
    assert main(["train", "--steps", "20", *SMALL, "--out", str(tmp_path / "one")]) == 0
    one, ddp = _metrics(tmp_path / "one"), _metrics(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == list(range(1, 21)) and [r["tokens"] for r in ddp] == [r["tokens"] for r in one]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, ddp))
    assert diff <= LOSS_TOL, f"max loss difference {diff:.2e}"
    wa, wb = load_file(tmp_path / "one" / "checkpoint.safetensors"), load_file(tmp_path / "ddp" / "checkpoint.safetensors")
    biases = [k for k in wa if k.endswith("gate.bias")]
    assert biases and all(torch.equal(wa[k], wb[k]) for k in biases), "router biases differ from the 1-process run"
    assert any(wa[k].abs().max() > 0 for k in biases)  # they did move
    wdiff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if wa[k].is_floating_point())
    assert wdiff <= WEIGHT_TOL, f"max weight difference {wdiff:.2e}"


def _cfgs(out: str, steps: int = 4, batch: int = 4):
    model_cfg = get_preset("tiny").replace(vocab_size=512, dim=32, n_layers=2, n_heads=2, inter_dim=64,
                                          max_seq_len=64)
    train_cfg = TrainConfig(corpus="python-docs", vocab_size=512, seq_len=32, batch_size=batch, max_steps=steps,
                            warmup_steps=0, eval_batches=2, eval_every=0, threads=1, out_dir=out, device="cpu")
    return model_cfg, train_cfg


def _resume(rank: int, world_size: int, tmp: str) -> dict:
    from deepseek_edu.parallel.data_parallel import DataParallelTrainer

    straight = DataParallelTrainer(*_cfgs(f"{tmp}/straight"), progress=False)
    straight.fit()
    first = DataParallelTrainer(*_cfgs(f"{tmp}/split"), progress=False)
    first.fit(until=2)
    first.save()
    torch.distributed.barrier()  # rank 0's checkpoint is on disk before anyone reads it
    second = DataParallelTrainer(*_cfgs(f"{tmp}/split"), resume=True, progress=False)
    second.fit()
    return {"straight": [r["loss"] for r in straight.history], "resumed": [r["loss"] for r in second.history],
            "weights": {k: v.clone() for k, v in second.model.state_dict().items()},
            "bias": [m.gate.bias.clone() for m in second.model.moe_layers()]}


def test_resume_is_exact_and_ranks_stay_identical(tmp_path):
    res = run_ranks(_resume, 2, args=(str(tmp_path),), timeout_s=120, backend="gloo")
    for r in res:
        assert r["resumed"] == r["straight"]
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["checkpoint.safetensors", "metrics.jsonl"]
    for k, v in res[0]["weights"].items():
        assert torch.equal(v, res[1]["weights"][k]), k
    assert all(torch.equal(a, b) for a, b in zip(res[0]["bias"], res[1]["bias"]))


def _bad_batch(rank: int, world_size: int, tmp: str) -> None:
    from deepseek_edu.parallel.data_parallel import DataParallelTrainer

    DataParallelTrainer(*_cfgs(tmp, batch=3), progress=False)


def test_global_batch_not_divisible_raises_on_every_rank(tmp_path):
    with pytest.raises(RankError) as err:
        run_ranks(_bad_batch, 2, args=(str(tmp_path),), timeout_s=30, backend="gloo")
    assert all(t == "ValueError" and "not divisible" in m for t, m in err.value.errors.values())
    assert set(err.value.errors) == {0, 1}
