"""Pipeline schedules: the bubble, parameters and activations measured on the simulated timeline equal
DeepSeek-V3 Table 2's formulas exactly (fractions) for PP in {4, 8, 16} and several F/B/W ratios
inside the formulas' region; outside it the timeline (not the formula) is the truth; bad inputs
give named errors; 1F1B executed over 2 and 4 gloo ranks gives the unpipelined gradients."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from deepseek_edu.parallel.launch import run_ranks
from deepseek_edu.parallel.pipeline import (
    SCHEDULES,
    reference_grads,
    run_1f1b,
    simulate,
    table2,
    table2_exact,
)

# (F, B, W, F&B): B is the full backward, W its weight part
RATIOS = [(1, 2, 1, None), (1, 2, 1, 2), (2, 3, 1, 4), (3, 5, 2, 6), (1, 1, 0, 2), (2, 4, 2, 5),
          (Fraction(3, 2), Fraction(5, 2), 1, Fraction(7, 2))]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [4, 8, 16])
def test_simulated_timeline_equals_table2(schedule, pp):
    checked = 0
    for F, B, W, FB in RATIOS:
        if not table2_exact(schedule, F, B, W, FB):
            continue
        for m in (pp, 2 * pp) if schedule != "dualpipe" else (2 * pp, 4 * pp):
            t = simulate(schedule, pp, m, F, B, W, FB)
            want = table2(schedule, pp, F, B, W, FB)
            got = {"bubble": t.bubble, "parameters": t.parameters, "activations": t.activations,
                   "devices": t.devices}
            assert got == want, f"{schedule} pp={pp} m={m} F,B,W,F&B={F, B, W, FB}: {got} != {want}"
            checked += 1
    assert checked >= 4


def test_timeline_is_consistent():
    """Every rank runs one op at a time; each micro-batch's F goes rank 0 -> PP-1 in time order."""
    t = simulate("1f1b", 4, 8)
    for r in range(4):
        ev = [e for e in t.events if e.rank == r]
        assert all(a.end <= b.start for a, b in itertools.pairwise(ev))
        assert sum(e.kind == "F" for e in ev) == 8 and sum(e.kind == "B" for e in ev) == 8
    first_f = {r: min(e.start for e in t.events if e.rank == r and e.kind == "F" and e.microbatch == 0)
               for r in range(4)}
    assert [first_f[r] for r in range(4)] == [0, 1, 2, 3]
    assert t.as_tuples()[0] == (0, 0.0, 1.0, "F", 0)


def test_outside_the_region_the_formula_is_not_the_timeline():
    # ZB1P with W > F: the formula (PP-1)(F+B-2W) would be 0, the timeline still idles
    assert not table2_exact("zb1p", 1, 3, 2)
    assert table2("zb1p", 4, 1, 3, 2)["bubble"] == 0 < simulate("zb1p", 4, 8, 1, 3, 2).bubble


def test_dualpipe_beats_1f1b_and_zb1p():
    bubbles = {s: simulate(s, 8, 32, 1, 2, 1, 2).bubble for s in ("1f1b", "zb1p", "dualpipe")}
    assert bubbles["dualpipe"] < bubbles["zb1p"] < bubbles["1f1b"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="schedule"):
        simulate("gpipe", 4, 8)
    with pytest.raises(ValueError, match="DualPipe"):
        simulate("dualpipe", 5, 20)
    with pytest.raises(ValueError, match="DualPipe"):
        simulate("dualpipe", 4, 6)
    with pytest.raises(ValueError, match="durations"):
        simulate("zb1p", 4, 8, F=1, B=1, W=2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_1f1b_executed_equals_unpipelined(world_size):
    results = run_ranks(run_1f1b, world_size, timeout_s=60, backend="gloo")  # CPU tensors
    ref, ref_loss = reference_grads()
    grads = {k: v for r in results for k, v in r["grads"].items()}
    assert sorted(grads) == sorted(ref)
    diff = max((grads[k] - ref[k]).abs().max().item() for k in ref)
    assert diff <= 1e-6, f"max |pipelined - unpipelined| gradient = {diff:.2e}"
    assert abs(results[-1]["loss"] - ref_loss) <= 1e-6
