"""Expert parallelism over gloo processes equals the single-process MoE (forward and gradients, fp32
1e-6), with uneven token counts, a rank with an empty batch and a rank whose experts get no token;
bad inputs (world size not dividing the experts, configs differing across ranks) raise a named
ValueError on every rank instead of hanging; bytes per token as DeepEP counts them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deepseek_edu.moe import MoE
from deepseek_edu.parallel.expert_parallel import (
    ExpertParallelMoE,
    bytes_per_token,
    compare_with_single_process,
    selftest_config,
)
from deepseek_edu.parallel.launch import RankError, run_ranks

TOL = 1e-6  # fp32


def _worst(results: list[dict[str, float]]) -> tuple[str, float]:
    return max(((k, v) for d in results for k, v in d.items()), key=lambda kv: kv[1])


@pytest.mark.parametrize("world_size, lengths", [(2, [5, 9]), (2, [7, 0]), (4, [3, 0, 11, 6])])
def test_ep_equals_single_process(world_size, lengths):
    results = run_ranks(compare_with_single_process, world_size, args=(selftest_config(), lengths), timeout_s=60)
    name, diff = _worst(results)
    assert diff <= TOL, f"max |EP - MoE| = {diff:.2e} at {name}"


def test_ep_equals_grouped_reference_and_starved_rank():
    """All tokens biased onto rank 0's experts: rank 1 receives no rows; the reference on its "auto" path
    (the grouped GEMM on CPU)."""
    bias = torch.tensor([5.0] * 4 + [-5.0] * 4)
    results = run_ranks(compare_with_single_process, 2, args=(selftest_config(), [6, 4], 0, "auto", bias))
    name, diff = _worst(results)
    assert diff <= TOL, f"max |EP - MoE| = {diff:.2e} at {name}"


def _build(rank: int, world_size: int, dims: list[int]) -> int:
    cfg = selftest_config()
    cfg.dim = dims[rank]
    ExpertParallelMoE(MoE(cfg))
    dist.barrier()
    return rank


def test_world_size_not_dividing_experts_raises_on_every_rank():
    with pytest.raises(RankError) as err:
        run_ranks(_build, 3, args=([32, 32, 32],), timeout_s=20, backend="gloo")
    assert set(err.value.errors) == {0, 1, 2}
    assert all(t == "ValueError" and "not divisible" in m for t, m in err.value.errors.values())


def test_mismatched_configs_raise_on_every_rank():
    with pytest.raises(RankError) as err:
        run_ranks(_build, 2, args=([32, 16],), timeout_s=20, backend="gloo")
    assert set(err.value.errors) == {0, 1}
    assert all(t == "ValueError" and "different MoE configs" in m for t, m in err.value.errors.values())


def _hang(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()  # rank 1 never joins: the collective's timeout must fire


def test_missing_partner_times_out_instead_of_hanging():
    with pytest.raises(RankError):
        run_ranks(_hang, 2, timeout_s=3, backend="gloo")


def test_bytes_per_token_v3():
    # V3: D = 7168, K = 8. BF16 dispatch 8 x 2 x 7168; FP8 8 x (7168 + 4 x 56); combine BF16.
    assert bytes_per_token(7168, 8, "bf16") == {"dispatch": 114688.0, "combine": 114688.0, "total": 229376.0}
    assert bytes_per_token(7168, 8, "fp8")["dispatch"] == 8 * (7168 + 224)
    with pytest.raises(ValueError, match="dispatch"):
        bytes_per_token(7168, 8, "fp16")


def _dispatch_vs_simulated(rank: int, world_size: int) -> bool:
    from deepseek_edu.parallel.expert_parallel import all_to_all_rows, exchange_counts, simulate_dispatch

    g = torch.Generator().manual_seed(3)
    lengths = [4, 0, 7, 5][:world_size]
    xs = [torch.randn(n, 6, generator=g) for n in lengths]
    idx = [torch.randint(0, 8, (n, 2), generator=g) for n in lengths]
    want_rows, want_counts = simulate_dispatch(xs, idx, 8)
    flat = idx[rank].flatten()
    counts = torch.zeros(8, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat)).view(world_size, -1)
    recv = exchange_counts(counts)
    rows = all_to_all_rows(xs[rank].index_select(0, flat.argsort(stable=True) // 2),
                           recv.sum(1).tolist(), counts.sum(1).tolist())
    return torch.equal(rows, want_rows[rank]) and torch.equal(recv, want_counts[rank])


def test_simulated_dispatch_is_the_distributed_one():
    assert all(run_ranks(_dispatch_vs_simulated, 4, backend="gloo"))  # CPU tensors


def test_benchmark_check_mode_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "expert_parallel.py"
    spec = importlib.util.spec_from_file_location("bench_expert_parallel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--check"]) == 0
    assert "ceiling_all_to_all" in capsys.readouterr().out
