"""The chapter 08 experiment helpers (`deepseek_edu.fp8_experiments`), on hand-made cases.

The committed runs of `benchmarks/fp8_training.py` rest on three facts checked here: every arm starts
from the same weights (the control arm from those weights perturbed by one part in a million), an FP32
run repeats itself exactly (so `--reuse` can add arms to an earlier run), and the relative loss error
is the trailing-mean formula the notebook states. The gradient-error probes, which compare the two FP8
recipes at the FP32 run's weights, must leave that run bitwise as it is and see outlier channels.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from deepseek_edu.config import get_preset
from deepseek_edu.evaluation import trailing_mean
from deepseek_edu.fp8 import FP8Linear
from deepseek_edu.fp8_experiments import (
    PERTURBATION,
    PRECISIONS,
    PROBE_FIELDS,
    gradient_error_summary,
    gradient_errors,
    granularity_errors,
    linear_input_outliers,
    make_model,
    relative_loss_error,
    train_run,
)


@pytest.fixture(scope="module")
def small_cfg():
    cfg = get_preset("tiny")
    cfg.n_layers, cfg.max_seq_len = 2, 32
    return cfg


def test_every_arm_starts_from_the_same_weights(small_cfg):
    ref = make_model(small_cfg, "fp32", seed=3).state_dict()
    for prec in ("fp8", "fp8-tensorwise"):
        sd = make_model(small_cfg, prec, seed=3).state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), prec
    fp8 = make_model(small_cfg, "fp8", seed=3)
    assert any(isinstance(m, FP8Linear) for m in fp8.modules())


def test_the_control_arm_is_perturbed_by_about_one_part_in_a_million(small_cfg):
    ref = make_model(small_cfg, "fp32", seed=3).state_dict()
    pert = make_model(small_cfg, "fp32-perturbed", seed=3).state_dict()
    rel = max(float(((pert[k] - ref[k]).abs() / ref[k].abs().clamp_min(1e-30)).max()) for k in ref)
    assert 0 < rel < 10 * PERTURBATION  # changed, and by a relative amount of order PERTURBATION (|N(0,1)| < 10)
    assert not any(isinstance(m, FP8Linear) for m in make_model(small_cfg, "fp32-perturbed", 3).modules())


def test_unknown_precision_is_a_value_error(small_cfg):
    with pytest.raises(ValueError, match="precision"):
        make_model(small_cfg, "fp16", seed=0)
    assert "fp32-perturbed" in PRECISIONS


def test_fp32_run_repeats_exactly_and_fp8_run_is_finite(small_cfg):
    tokens = torch.randint(0, small_cfg.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    a = train_run(small_cfg, tokens, tokens, "fp32", 0, 3, 2, 16, val_batches=1)
    b = train_run(small_cfg, tokens, tokens, "fp32", 0, 3, 2, 16, val_batches=1)
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    c = train_run(small_cfg, tokens, tokens, "fp8", 0, 3, 2, 16, val_batches=1, block_size=32)
    assert all(math.isfinite(v) for v in c["loss"]) and c["loss"] != a["loss"]
    assert c["loss"][0] == pytest.approx(a["loss"][0], rel=0.01)  # same weights, same batch: FP8 is close


def test_a_non_finite_gradient_never_reaches_adamw(small_cfg, monkeypatch):
    # train_run steps through optim.optimizer_step: a NaN gradient skips the step instead of poisoning the weights
    import deepseek_edu.fp8_experiments as fx

    def nan_grad_model(*args, **kwargs):
        model = make_model(*args, **kwargs)
        model.embed.weight.register_hook(lambda g: torch.full_like(g, math.nan))
        return model

    monkeypatch.setattr(fx, "make_model", nan_grad_model)
    tokens = torch.randint(0, small_cfg.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    run = train_run(small_cfg, tokens, tokens, "fp32", 0, 2, 2, 16, val_batches=1, return_model=True)
    start = make_model(small_cfg, "fp32", 0).state_dict()
    after = run["model"].state_dict()
    assert all(torch.equal(after[k], start[k]) for k in start) and math.isfinite(run["val_loss"])


def test_relative_loss_error_is_the_trailing_mean_formula():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    err = relative_loss_error([2.0, 2.2, 2.4], [2.0, 2.0, 2.0], window=2)
    assert err == pytest.approx([0.0, 0.05, 0.15])
    assert relative_loss_error([float("nan")], [1.0]) == [float("inf")]


def test_outlier_channels_hurt_tensorwise_more_than_fine_tiles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, 7] *= 1e5  # one outlier channel: under its scale, ordinary values fall below E4M3's smallest subnormal
    err = {g_: e["flushed_to_zero"] for g_, e in granularity_errors(x, 128).items()}
    # flushed: tensorwise, every value below ~0.7; per row, only where that row's outlier is large; 1 x 128,
    # only in the tile that holds channel 7 (half the row); 128 x 128 blocks, the weight-style first block column
    assert err["tensorwise"] > 0.3 and err["1x128"] < err["per-row"] < err["tensorwise"]
    assert err["1x128"] < err["128x128"] < err["tensorwise"]
    exact = torch.tensor([[448.0, 1.0, -0.5, 0.0] * 32])  # E4M3 values with max 448: every scale is 1
    assert all(err_["rel_error"] == 0.0 for err_ in granularity_errors(exact, 128).values())


def test_probes_leave_the_fp32_run_bitwise_unchanged(small_cfg):
    tokens = torch.randint(0, small_cfg.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    plain = train_run(small_cfg, tokens, tokens, "fp32", 0, 4, 2, 16, val_batches=1)
    probed = train_run(small_cfg, tokens, tokens, "fp32", 0, 4, 2, 16, val_batches=1, probe_every=3, probe_batches=2)
    assert probed["loss"] == plain["loss"] and probed["val_loss"] == plain["val_loss"]
    assert [p["step"] for p in probed["probes"]] == [0, 3, 4]  # every 3 steps, and the end
    for p in probed["probes"]:
        assert set(p) == set(PROBE_FIELDS) and p["outlier_ratio"]["max"] >= p["outlier_ratio"]["median"] >= 1
        for arm in ("fp8", "fp8-tensorwise"):
            assert len(p[arm]["grad_rel_error"]) == 2 and all(0 < e < 0.5 for e in p[arm]["grad_rel_error"])
    for bad in ({"precision": "fp8", "probe_every": 1}, {"probe_every": -2}, {"probe_every": 2, "probe_batches": 0},
                {"probe_every": True}, {"probe_every": 1.5}, {"steps": 0}, {"steps": -3}, {"val_batches": 0},
                {"lr": math.inf}, {"lr": math.nan}, {"lr": 0.0}, {"data_seed": 0.5}):
        kwargs = {"precision": "fp32", "steps": 2, **bad}
        name = "probe_every" if "probe_every" in bad else next(iter(bad))
        with pytest.raises(ValueError, match=name):
            train_run(small_cfg, tokens, tokens, kwargs.pop("precision"), 0, kwargs.pop("steps"), 2, 16, **kwargs)


def test_fp8_training_benchmark_names_bad_arguments_before_any_work(capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    # the script puts benchmarks/ first on sys.path (for its _common); undo that after this test, or the
    # name `kernels` would then find benchmarks/kernels.py instead of the package transformers imports
    monkeypatch.setattr(sys, "path", list(sys.path))
    if "_common" not in sys.modules:
        monkeypatch.setitem(sys.modules, "_common", None)
        monkeypatch.delitem(sys.modules, "_common")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_training.py"
    spec = importlib.util.spec_from_file_location("fp8_training_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for argv, said in ((["--steps", "0"], "--steps 0"), (["--steps", "-1"], "--steps -1"),
                       (["--seeds", "0,0"], "twice"), (["--seeds", "0,x"], "integers"),
                       (["--window", "0"], "--window 0"), (["--val-batches", "0"], "--val-batches 0"),
                       (["--probe-batches", "0"], "--probe-batches 0"), (["--lr", "inf"], "--lr inf")):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2 and said in capsys.readouterr().err


def test_gradient_errors_are_the_stated_formula_and_leave_the_model_alone(small_cfg):
    from deepseek_edu.fp8 import to_fp8
    from deepseek_edu.train import lm_loss

    model = make_model(small_cfg, "fp32", seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, small_cfg.vocab_size, (2, 16), generator=g),
                torch.randint(0, small_cfg.vocab_size, (2, 16), generator=g)) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = gradient_errors(model, batches, small_cfg.mtp_loss_weight, block_size=32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)

    def loss_grad(m, x, y):  # written out again: one training forward-backward, every parameter's gradient
        loss, _ = lm_loss(m(x), y, small_cfg.mtp_loss_weight)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    for i, (x, y) in enumerate(batches):
        ref_l, ref_g = loss_grad(copy.deepcopy(model), x, y)
        for arm, gran in (("fp8", "blockwise"), ("fp8-tensorwise", "tensorwise")):
            l_q, g_q = loss_grad(to_fp8(copy.deepcopy(model), gran, 32), x, y)
            assert out[arm]["grad_rel_error"][i] == pytest.approx(float((g_q - ref_g).norm() / ref_g.norm()), rel=1e-6)
            assert out[arm]["loss_rel_error"][i] == pytest.approx(abs(l_q - ref_l) / ref_l, rel=1e-6, abs=1e-9)
            assert 0.005 < out[arm]["grad_rel_error"][i] < 0.2  # E4M3 rounds each input by up to 6.25%
    assert out["fp8"]["grad_rel_error"] != out["fp8-tensorwise"]["grad_rel_error"]
    with pytest.raises(ValueError, match="at least one"):
        gradient_errors(model, [], small_cfg.mtp_loss_weight)
    with pytest.raises(ValueError, match="FP32 model"):  # else the "FP32" reference would run FP8 layers too
        gradient_errors(to_fp8(copy.deepcopy(model)), batches, small_cfg.mtp_loss_weight)


def test_gradient_errors_name_a_non_finite_loss_or_gradient_instead_of_a_nan(small_cfg, monkeypatch):
    import deepseek_edu.fp8_experiments as fx

    model = make_model(small_cfg, "fp32", seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, small_cfg.vocab_size, (2, 16), generator=g),
                torch.randint(0, small_cfg.vocab_size, (2, 16), generator=g))]
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layers[0].attn_norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match="FP32 loss"):
        gradient_errors(broken, batches, small_cfg.mtp_loss_weight, block_size=32)
    real = fx.to_fp8

    def tensorwise_overflows(m, granularity="blockwise", block_size=128):  # one recipe's pass goes non-finite
        m = real(m, granularity, block_size)
        if granularity == "tensorwise":
            with torch.no_grad():
                m.layers[0].attn_norm.weight[0] = float("nan")
        return m

    monkeypatch.setattr(fx, "to_fp8", tensorwise_overflows)
    with pytest.raises(ValueError, match="batch 0: the fp8-tensorwise"):
        gradient_errors(model, batches, small_cfg.mtp_loss_weight, block_size=32)


def test_linear_input_outliers_find_an_outlier_channel(small_cfg):
    model = make_model(small_cfg, "fp32", seed=0)
    tokens = torch.randint(0, small_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = linear_input_outliers(model, tokens)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # the final norm's gain feeds only the head, kept high precision; the layer norms feed FP8 layers
        model.layers[0].attn_norm.weight[5] *= 1000.0
    louder = linear_input_outliers(model, tokens)
    assert plain["max"] < 20 and louder["max"] > 100 * plain["max"] / 2  # channel 5 of the attention input
    with pytest.raises(ValueError, match="rows"):
        linear_input_outliers(model, tokens, min_rows=10_000)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="min_rows"):
            linear_input_outliers(model, tokens, min_rows=bad)
    import numpy as np

    assert linear_input_outliers(model, tokens, min_rows=np.int64(16)) == louder  # a NumPy integer is an int


def test_gradient_error_summary_pairs_probes_of_the_same_weights_and_batch():
    def probe(step, bw, tw):
        return {"step": step, "fp8": {"grad_rel_error": bw, "loss_rel_error": [0.0] * len(bw)},
                "fp8-tensorwise": {"grad_rel_error": tw, "loss_rel_error": [0.0] * len(tw)}}

    probes = {0: [probe(0, [0.1, 0.2], [0.1, 0.3]), probe(5, [0.2, 0.2], [0.4, 0.2])],
              1: [probe(0, [0.1, 0.1], [0.2, 0.2]), probe(5, [0.3, 0.1], [0.2, 0.2])]}
    s = gradient_error_summary(probes)
    diffs = [0.0, 0.1, 0.2, 0.0, 0.1, 0.1, -0.1, 0.1]
    assert s["paired"]["n_pairs"] == 8 and s["paired"]["n_probes"] == 4
    assert s["paired"]["mean"] == pytest.approx(sum(diffs) / 8)
    assert s["paired"]["fraction_positive"] == pytest.approx(5 / 8)
    assert s["paired"]["per_seed_mean"] == pytest.approx({0: 0.075, 1: 0.05})
    # the standard error is over the seeds' means (0.075, 0.05): std 0.025 / sqrt(2) / sqrt(2) = 0.0125
    assert s["paired"]["seed_se"] == pytest.approx(0.0125) and s["paired"]["t_seeds"] == pytest.approx(0.0625 / 0.0125)
    assert s["by_step"][5] == pytest.approx({"fp8": 0.2, "fp8-tensorwise": 0.25})
    assert s["mean"]["fp8"] == pytest.approx(1.3 / 8) and s["paired"]["ratio"] == pytest.approx(1.8 / 1.3)
    assert s["loss_mean"] == {"fp8": 0.0, "fp8-tensorwise": 0.0}
    one = gradient_error_summary({0: probes[0]})
    assert one["paired"]["seed_se"] is None and one["paired"]["t_seeds"] is None  # one seed: no spread (JSON null)
    for bad in ({}, {0: probes[0], 1: []}, {0: [probe(0, [0.1, 0.2], [0.1])]}, {0: [probe(0, [], [])]}):
        with pytest.raises(ValueError, match="probes|batches"):
            gradient_error_summary(bad)
    # malformed probes and errors that are not finite are named, not averaged into a NaN
    no_arm = {"step": 0, "fp8": probe(0, [0.1], [0.1])["fp8"]}
    for bad_probe in (no_arm, {"fp8": {}, "fp8-tensorwise": {}}, [0.1], probe(0, [0.1], [float("nan")]),
                      probe(0, [float("inf")], [0.1]), probe(0, [-0.1], [0.1]), probe(0, [True], [0.1])):
        with pytest.raises(ValueError, match="probe|finite"):
            gradient_error_summary({0: [bad_probe]})
    for outliers in ({"median": math.nan, "max": math.inf}, 3.0, {"median": 2.0}):
        with pytest.raises(ValueError, match="outlier_ratio"):
            gradient_error_summary({0: [{**probe(0, [0.1], [0.2]), "outlier_ratio": outliers}]})
    with pytest.raises(ValueError, match="list"):
        gradient_error_summary({0: [{"step": 0, **{arm: {"grad_rel_error": 0.1, "loss_rel_error": 0.0}
                                                   for arm in ("fp8", "fp8-tensorwise")}}]})
    with pytest.raises(ValueError, match="mapping"):
        gradient_error_summary(list(probes.values()))
    # a seed's probes as a generator are read once, not used up by the checks; an exact fine-grained arm has no ratio
    assert gradient_error_summary({0: (p for p in probes[0])}) == gradient_error_summary({0: probes[0]})
    assert gradient_error_summary({0: [probe(0, [0.0], [0.1])]})["paired"]["ratio"] is None
