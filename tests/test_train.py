"""Tests of deepseek_edu.train: schedules, loss, evaluation, checkpoints, exact resume, Ctrl-C.

Checks, with hand-computed values where there is a number to compute:

* `lr_at` at the start and end of warmup, in the middle and at the end of every schedule (cosine,
  warmup-stable-decay, constant), and that the `LambdaLR` the trainer steps reproduces it exactly;
* `lm_loss` equals a hand-computed cross-entropy (and `F.cross_entropy`), adds the aux loss, gives
  ln V for a uniform model, and adds the MTP terms (λ/D)·CE_k while logging the main CE as "ce"
  (more in tests/test_mtp.py); MTP logits without a weight are refused (pitfalls kind B);
* AdamW decays matrices only and lists a tied head once; `evaluate` is deterministic, leaves the
  RNG streams alone and restores train mode;
* persistence (pitfalls kind K): 6 straight steps equal 3 steps + checkpoint + fresh objects + 3
  steps -- parameters, AdamW state, scheduler, losses, sampler and RNG streams bitwise, for tied and
  untied heads, through an explicit save, Ctrl-C (a real SIGINT) and a callback's KeyboardInterrupt;
  an MoE model's router biases move by +-gamma every step and resume exactly too (kind B); so does
  a model with MTP modules (their weights and their MoE block's bias included), whose per-depth MTP
  losses are logged and whose checkpoint loads back into a fresh model with the same logits;
* checkpoints: a tied head is stored once and re-tied on load; a crash during the write leaves the
  previous checkpoint intact and no partial file; truncated or bit-flipped files, foreign files,
  unknown versions, other model configs, changed training setups and a changed tokenizer raise
  `CheckpointError` with a message that says what is wrong;
* a short run on the offline python-docs corpus lowers the validation loss below ln V.

Everything runs on tiny models (D=32, one block) on CPU, deterministic (pitfalls kind L).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import signal
import struct

import numpy as np
import pytest
import safetensors
import torch
import torch.nn.functional as F

import deepseek_edu.checkpoint as checkpoint_mod
import deepseek_edu.io as io_mod
from deepseek_edu.config import ModelConfig, TrainConfig
from deepseek_edu.data import load_dataset, train_tokenizer
from deepseek_edu.model import ModelOutput, Transformer
from deepseek_edu.train import (
    CheckpointError,
    Trainer,
    evaluate,
    extra_loss_terms,
    lm_loss,
    load_checkpoint,
    load_model,
    lr_at,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    train,
)

VOCAB = 512


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("python-docs", VOCAB, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model_cfg(tie: bool = False, **kw) -> ModelConfig:
    base = {"vocab_size": VOCAB, "dim": 32, "n_layers": 1, "n_heads": 2, "inter_dim": 64, "max_seq_len": 32,
            "tie_embeddings": tie}
    return ModelConfig(**{**base, **kw})


def tiny_train_cfg(out_dir, **kw) -> TrainConfig:
    base = {"corpus": "python-docs", "vocab_size": VOCAB, "seq_len": 32, "batch_size": 4, "max_steps": 6,
            "warmup_steps": 2, "eval_every": 2, "eval_batches": 2, "save_every": 0, "out_dir": str(out_dir)}
    return TrainConfig(**{**base, **kw})


# --- learning-rate schedules ---------------------------------------------------------------------------

# (schedule, extra cfg, [(step, expected lr)]) with lr=1e-3, warmup 10, min_lr_ratio 0.1.
# warmup: lr*(s+1)/11.  cosine over s=10..110 (N=111): r=(s-10)/100, lr*(0.1+0.9*(1+cos(pi r))/2).
# wsd with N=100, decay_frac=0.2: stable up to s=79, then lr*(1-0.9*(s-79)/20), 1e-4 at s=99.
SCHEDULES = [
    ("cosine", {"max_steps": 111}, [(0, 1e-3 / 11), (4, 5e-3 / 11), (9, 1e-2 / 11), (10, 1e-3), (35, None),
                                     (60, 5.5e-4), (110, 1e-4), (500, 1e-4)]),
    ("wsd", {"max_steps": 100, "decay_frac": 0.2}, [(0, 1e-3 / 11), (9, 1e-2 / 11), (10, 1e-3), (50, 1e-3),
                                                  (79, 1e-3), (80, 9.55e-4), (89, 5.5e-4), (99, 1e-4),
                                                  (150, 1e-4)]),
    ("constant", {"max_steps": 100}, [(0, 1e-3 / 11), (9, 1e-2 / 11), (10, 1e-3), (50, 1e-3), (99, 1e-3)]),
]


@pytest.mark.parametrize("schedule,extra,points", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_lr_schedule_hand_values(schedule, extra, points):
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, **extra)
    for step, expected in points:
        if expected is None:  # cosine a quarter of the way: r = 0.25
            expected = 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * 0.25)) / 2)
        got = lr_at(step, cfg)
        assert got == pytest.approx(expected, rel=1e-12, abs=0), \
            f"{schedule} step {step}: {got} != {expected}"


def test_lr_schedule_without_warmup_starts_at_peak_and_is_monotone_after():
    cfg = TrainConfig(lr=2e-3, warmup_steps=0, max_steps=50, min_lr_ratio=0.0)
    lrs = [lr_at(s, cfg) for s in range(50)]
    assert lrs[0] == 2e-3 and lrs[-1] == pytest.approx(0.0, abs=1e-18)
    assert all(a >= b for a, b in itertools.pairwise(lrs)), "cosine decay must not increase"


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lambda_lr_reproduces_lr_at_exactly(schedule):
    cfg = TrainConfig(lr=3e-3, warmup_steps=4, max_steps=20, schedule=schedule)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = make_optimizer(torch.nn.ParameterList([p]), cfg)
    sched = make_scheduler(opt, cfg)
    for step in range(cfg.max_steps):
        assert opt.param_groups[0]["lr"] == lr_at(step, cfg), f"step {step}"
        opt.step()
        sched.step()
    json.dumps(sched.state_dict())  # must be storable as checkpoint metadata


# --- loss ----------------------------------------------------------------------------------------------


def test_lm_loss_hand_example():
    # V = 2, logits [0, ln 3] -> p = [1/4, 3/4]; targets 1 then 0 -> losses ln(4/3) and ln 4.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # (1, 2, 2)
    targets = torch.tensor([[1, 0]])
    out = ModelOutput(logits=logits, hidden=torch.zeros(1, 2, 4), aux_loss=torch.tensor(0.25))
    loss, metrics = lm_loss(out, targets)
    expected_ce = (math.log(4 / 3) + math.log(4)) / 2
    assert metrics["ce"] == pytest.approx(expected_ce, rel=1e-6)
    reference = F.cross_entropy(logits.view(-1, 2), targets.view(-1)).item()
    assert metrics["ce"] == pytest.approx(reference, rel=1e-7)
    assert metrics["aux_loss"] == 0.25
    assert loss.item() == pytest.approx(expected_ce + 0.25, rel=1e-6) and metrics["loss"] == loss.item()
    assert loss.dtype == torch.float32


def test_lm_loss_is_fp32_for_bf16_logits():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(1))
    out = ModelOutput(logits=logits.bfloat16(), hidden=torch.zeros(2, 3, 4), aux_loss=torch.zeros(()))
    loss, _ = lm_loss(out, targets)
    ref = F.cross_entropy(logits.bfloat16().float().view(-1, 11), targets.view(-1))
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)


@pytest.mark.parametrize("V", [2, 7, VOCAB])
def test_uniform_model_loss_is_ln_v(V):
    out = ModelOutput(logits=torch.zeros(3, 5, V), hidden=torch.zeros(3, 5, 4), aux_loss=torch.zeros(()))
    _, metrics = lm_loss(out, torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0)))
    assert metrics["ce"] == pytest.approx(math.log(V), rel=1e-6)


def test_mtp_logits_hand_example():
    # V = 3, S = 3, one depth: logits at positions 0, 1 predict targets y[:, 1:] = [2, 0]
    y = torch.tensor([[1, 2, 0]])
    mtp = torch.tensor([[[0.0, 0.0, math.log(2.0)], [math.log(3.0), 0.0, 0.0]]])  # p(2) = 1/2, p(0) = 3/5
    out = ModelOutput(logits=torch.zeros(1, 3, 3), hidden=torch.zeros(1, 3, 4), aux_loss=torch.zeros(()),
                      mtp_logits=[mtp])
    ce_1 = -(math.log(1 / 2) + math.log(3 / 5)) / 2
    loss, metrics = lm_loss(out, y, mtp_loss_weight=0.3)
    assert metrics["ce"] == pytest.approx(math.log(3), rel=1e-6), "the logged main loss excludes MTP"
    assert metrics["mtp_ce_1"] == pytest.approx(ce_1, rel=1e-6)
    assert metrics["mtp_loss_1"] == pytest.approx(0.3 * ce_1, rel=1e-6)
    assert loss.item() == pytest.approx(math.log(3) + 0.3 * ce_1, rel=1e-6)
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        lm_loss(out, y)
    assert extra_loss_terms(ModelOutput(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(())),
                            torch.zeros(1, 2, dtype=torch.long)) == {}


def test_lm_loss_shape_mismatch():
    out = ModelOutput(logits=torch.zeros(1, 3, 5), hidden=torch.zeros(1, 3, 4), aux_loss=torch.zeros(()))
    with pytest.raises(ValueError, match="targets"):
        lm_loss(out, torch.zeros(1, 2, dtype=torch.long))


# --- optimizer and evaluation --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_on_matrices_only_and_tied_head_once(tie):
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg(tie))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    norm_ids = {id(m.weight) for name, m in model.named_modules() if name.endswith("norm")}
    assert norm_ids and norm_ids <= {id(p) for p in no_decay["params"]}


def test_evaluate_is_deterministic_rng_free_and_restores_train_mode(dataset):
    cfg = tiny_train_cfg("unused", eval_batches=3)
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg())
    model.train()
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a = evaluate(model, dataset.val, cfg)
    b = evaluate(model, dataset.val, cfg)
    assert a == b and model.training
    assert torch.equal(torch_state, torch.get_rng_state()) and py_state == random.getstate()
    assert all(np.array_equal(x, y) for x, y in zip(np_state, np.random.get_state()))
    # the same number by hand: 3 batches of 4 non-overlapping windows spread evenly over val
    T = cfg.seq_len
    n_windows = (dataset.val.numel() - 1) // T
    picks = [round(j * (n_windows - 1) / 11) for j in range(12)]
    x = torch.stack([dataset.val[i * T:(i + 1) * T] for i in picks])
    y = torch.stack([dataset.val[i * T + 1:(i + 1) * T + 1] for i in picks])
    with torch.no_grad():
        ref = F.cross_entropy(model(x).logits.reshape(-1, VOCAB), y.reshape(-1)).item()
    assert a == pytest.approx(ref, rel=1e-5), f"evaluate {a} vs by hand {ref}"


# --- exact resume (pitfalls kind K) ----------------------------------------------------------------------


def _rng_drawing_callback(draws: list):
    """A callback that reads every RNG stream, so a resume that loses one shows up in `draws`."""

    def callback(record):
        draws.append((record["step"], torch.rand(1).item(), random.random(), float(np.random.rand())))

    return callback


def _stop_save_resume(mcfg, tcfg, dataset, at: int) -> Trainer:
    """Train to step `at`, save, then finish in a new Trainer resumed from that checkpoint."""
    first = Trainer(mcfg, tcfg, progress=False, dataset=dataset)
    first.fit(until=at)
    first.save()
    second = Trainer(mcfg, tcfg, resume=True, progress=False, dataset=dataset)
    second.fit()
    return second


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs: max |diff| = {(p - q).abs().max().item():.3e}"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for idx in sa["state"]:
        for key, value in sa["state"][idx].items():
            assert torch.equal(value, sb["state"][idx][key]), f"optimizer state {idx}.{key} differs"
    assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert a.sampler.state_dict() == b.sampler.state_dict()
    keys = ("step", "lr", "loss", "ce", "grad_norm", "tokens", "val_loss")
    assert [{k: r[k] for k in keys} for r in a.history] == [{k: r[k] for k in keys} for r in b.history]


def _scramble_global_rng():
    """What a new process would have: RNG streams that have nothing to do with the run."""
    torch.manual_seed(987654)
    random.seed(987654)
    np.random.seed(987654)


@pytest.mark.parametrize("how", ["save", "ctrl-c", "callback-interrupt"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_resume_is_bitwise_equal_to_a_straight_run(dataset, tmp_path, tie, how):
    mcfg = tiny_model_cfg(tie)
    straight_draws, resumed_draws = [], []
    tcfg = tiny_train_cfg(tmp_path / "straight")
    _scramble_global_rng()
    straight = Trainer(mcfg, tcfg, progress=False, dataset=dataset,
                       callback=_rng_drawing_callback(straight_draws))
    straight.fit()
    assert straight.step == 6

    tcfg = tcfg.replace(out_dir=str(tmp_path / "resumed"))
    draws_cb = _rng_drawing_callback(resumed_draws)
    if how == "save":
        _scramble_global_rng()
        first = Trainer(mcfg, tcfg, progress=False, dataset=dataset, callback=draws_cb)
        first.fit(until=3)
        first.save()
    else:
        def interrupting(record):
            draws_cb(record)
            if record["step"] == 3:
                if how == "ctrl-c":
                    os.kill(os.getpid(), signal.SIGINT)  # handled between steps: stops after this one
                else:
                    raise KeyboardInterrupt

        _scramble_global_rng()
        first = Trainer(mcfg, tcfg, progress=False, dataset=dataset, callback=interrupting)
        with pytest.raises(KeyboardInterrupt):
            first.fit()
    assert first.step == 3 and load_checkpoint(first.checkpoint_path).step == 3
    del first

    _scramble_global_rng()
    second = Trainer(mcfg, tcfg, resume=True, progress=False, dataset=dataset, callback=draws_cb)
    assert second.resumed_from == 3 and second.step == 3
    second.fit()
    _assert_same_state(straight, second)
    assert straight_draws == resumed_draws, "an RNG stream was not restored"
    if tie:
        assert second.model.head.weight is second.model.embed.weight
    # metrics.jsonl holds exactly the history
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [r["loss"] for r in straight.history]


def test_moe_router_bias_moves_every_step_and_resumes_exactly(dataset, tmp_path):
    """Aux-loss-free balancing is applied once per step (pitfalls kind B) and survives a resume (kind K)."""
    mcfg = tiny_model_cfg(n_layers=2, n_dense_layers=1, n_routed_experts=4, n_activated_experts=2,
                          moe_inter_dim=16, bias_update_speed=1e-3)
    tcfg = tiny_train_cfg(tmp_path / "straight", max_steps=4, eval_every=0)
    straight = Trainer(mcfg, tcfg, progress=False, dataset=dataset)
    straight.fit()
    bias = straight.model.layers[1].ffn.gate.bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0, "the selection bias never moved"
    steps = bias / 1e-3  # each step adds -1, 0 or +1 times gamma per expert
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 4
    assert all(r["max_violation"] >= 0 for r in straight.history)
    assert "layers.1.ffn.gate.bias" in load_checkpoint(straight.checkpoint_path).model_state

    second = _stop_save_resume(mcfg, tcfg.replace(out_dir=str(tmp_path / "resumed")), dataset, at=2)
    _assert_same_state(straight, second)
    assert torch.equal(bias, second.model.layers[1].ffn.gate.bias)


def test_evaluate_reads_the_main_head_only(dataset):
    """Validation loss of a model with MTP = that of the same main weights without MTP (MTP never enters it)."""
    mcfg = tiny_model_cfg(n_mtp_depth=2)
    torch.manual_seed(0)
    with_mtp = Transformer(mcfg)
    without = Transformer(mcfg.replace(n_mtp_depth=0))
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    tcfg = tiny_train_cfg("unused")
    assert evaluate(with_mtp, dataset.val, tcfg) == evaluate(without, dataset.val, tcfg)


def test_mtp_model_trains_logs_each_depth_and_resumes_exactly(dataset, tmp_path):
    """MTP modules (D = 2, MoE block) are trained, logged per depth, checkpointed and resumed bitwise (kind K)."""
    mcfg = tiny_model_cfg(n_layers=2, n_dense_layers=1, n_routed_experts=4, n_activated_experts=2,
                          moe_inter_dim=16, bias_update_speed=1e-3, n_mtp_depth=2, mtp_loss_weight=0.3)
    tcfg = tiny_train_cfg(tmp_path / "straight", max_steps=4, eval_every=2)
    straight = Trainer(mcfg, tcfg, progress=False, dataset=dataset)
    straight.fit()
    rec = straight.history[-1]
    for k in (1, 2):
        assert rec[f"mtp_loss_{k}"] == pytest.approx(0.3 / 2 * rec[f"mtp_ce_{k}"], rel=1e-5)
    assert rec["loss"] == pytest.approx(rec["ce"] + rec["aux_loss"] + rec["mtp_loss_1"] + rec["mtp_loss_2"], rel=1e-5)
    assert straight.model.mtp[1].block.ffn.gate.bias.abs().sum() > 0, "the MTP block's router bias never moved"
    state = load_checkpoint(straight.checkpoint_path).model_state
    assert "mtp.1.eh_proj.weight" in state and "mtp.0.block.ffn.gate.bias" in state
    assert not any(k.startswith("mtp.") and ("embed" in k or "head" in k) for k in state)
    model, _ = load_model(straight.checkpoint_path)
    x = dataset.val[:16][None]
    with torch.no_grad():
        a, b = model(x), straight.model.eval()(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[1], b.mtp_logits[1])

    second = _stop_save_resume(mcfg, tcfg.replace(out_dir=str(tmp_path / "resumed")), dataset, at=2)
    straight.model.train()
    _assert_same_state(straight, second)
    assert [r["mtp_ce_2"] for r in straight.history] == [r["mtp_ce_2"] for r in second.history]
    assert torch.equal(straight.model.mtp[1].block.ffn.gate.bias, second.model.mtp[1].block.ffn.gate.bias)


def test_ctrl_c_saves_the_last_completed_step(dataset, tmp_path, capsys):
    def stop_at_4(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    tcfg = tiny_train_cfg(tmp_path, max_steps=10, eval_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_cfg(), tcfg, progress=False, callback=stop_at_4, dataset=dataset)
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.step == 4 and ckpt.sampler_state["batches_drawn"] == 4
    assert ckpt.history == []  # per-step history is metrics.jsonl's, so the checkpoint does not grow
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert "step 4" in capsys.readouterr().err


def test_resume_refuses_another_training_setup_or_model(dataset, tmp_path):
    tcfg = tiny_train_cfg(tmp_path, max_steps=2, eval_every=0)
    train(tiny_model_cfg(), tcfg, progress=False, dataset=dataset)
    with pytest.raises(CheckpointError, match=r"checkpoint has lr=0\.003, this run asks lr=0\.001"):
        Trainer(tiny_model_cfg(), tcfg.replace(lr=1e-3), resume=True, progress=False, dataset=dataset)
    with pytest.raises(CheckpointError, match="checkpoint has inter_dim=64, this run asks inter_dim=96"):
        Trainer(tiny_model_cfg(inter_dim=96), tcfg, resume=True, progress=False, dataset=dataset)
    # a data cache whose tokenizer changed (other corpus text, other Python for python-docs)
    other = train_tokenizer([dataset.tokenizer.decode(dataset.val[:20000])], VOCAB)
    assert other.vocab_size == VOCAB
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        Trainer(tiny_model_cfg(), tcfg, resume=True, progress=False,
                dataset=dataclasses.replace(dataset, tokenizer=other))
    # max_steps may not change: the learning-rate schedule is laid out over it
    with pytest.raises(CheckpointError, match=r"checkpoint has max_steps=2, this run asks max_steps=3"):
        Trainer(tiny_model_cfg(), tcfg.replace(max_steps=3), resume=True, progress=False, dataset=dataset)
    # what may change (evaluation, saving, threads) does: training continues from step 2
    more = Trainer(tiny_model_cfg(), tcfg.replace(eval_every=1, threads=1), resume=True, progress=False,
                   dataset=dataset)
    assert more.step == 2


# --- checkpoint files ----------------------------------------------------------------------------------


def _saved(tmp_path, tie=False, step=3, name="checkpoint.safetensors", **cfg_kw):
    torch.manual_seed(step)
    model = Transformer(tiny_model_cfg(tie, **cfg_kw))
    path = save_checkpoint(tmp_path / name, model, step=step)
    return model, path


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tied_head_is_stored_once_and_retied_on_load(tmp_path, tie):
    model, path = _saved(tmp_path, tie)
    with safetensors.safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "model.embed.weight" in keys
    assert ("model.head.weight" in keys) is not tie
    loaded, tokenizer = load_model(path)
    assert tokenizer is None  # saved without one, and no train config to find it by
    assert (loaded.head.weight is loaded.embed.weight) is tie
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    if tie:
        with torch.no_grad():
            loaded.embed.weight[0, 0] += 1.0
        assert loaded.head.weight[0, 0] == loaded.embed.weight[0, 0]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    model, path = _saved(tmp_path, step=2)
    before = path.read_bytes()

    def half_then_crash(f, data):
        f.write(memoryview(data)[: len(data) // 2])
        raise OSError("simulated crash during write")

    def crash(*args, **kwargs):
        raise OSError(f"simulated crash at {fail_at}")

    if fail_at == "write":
        monkeypatch.setattr(io_mod, "write_chunks", half_then_crash)
    else:
        monkeypatch.setattr(io_mod.os, fail_at, crash)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, model, step=3)
    monkeypatch.undo()
    assert path.read_bytes() == before, "the previous checkpoint was touched"
    assert load_checkpoint(path).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"], "a partial file was left"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="it is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1])
def test_truncated_checkpoint(tmp_path, keep):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="corrupted or incomplete") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _data_start(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_tensor_section(tmp_path, where):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    start = _data_start(data)
    i = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or incomplete"):
        load_checkpoint(path)


def test_edited_metadata_is_detected(tmp_path):
    _, path = _saved(tmp_path, step=3)
    data = path.read_bytes()
    assert data.count(b'"step":"3"') == 1
    path.write_bytes(data.replace(b'"step":"3"', b'"step":"7"'))  # same length: safetensors still parses it
    with pytest.raises(CheckpointError, match="corrupted or incomplete"):
        load_checkpoint(path)


def test_foreign_safetensors_file_and_unknown_version(tmp_path, monkeypatch):
    foreign = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a deepseek-edu checkpoint"):
        load_checkpoint(foreign)
    monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_VERSION", 99)
    _, path = _saved(tmp_path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_config_names_the_fields(tmp_path):
    _, path = _saved(tmp_path, dim=32)
    with pytest.raises(CheckpointError, match="checkpoint has dim=32, this run asks dim=64") as info:
        load_checkpoint(path, model=Transformer(tiny_model_cfg(dim=64, n_heads=4)))
    assert "n_heads=2" in str(info.value) and "n_heads=4" in str(info.value)
    with pytest.raises(CheckpointError,
                       match="checkpoint has tie_embeddings=False, this run asks tie_embeddings=True"):
        load_checkpoint(path, model_config=tiny_model_cfg(True))


# --- learning ------------------------------------------------------------------------------------------


def test_short_run_on_python_docs_lowers_the_loss(dataset, tmp_path):
    mcfg = tiny_model_cfg()
    tcfg = tiny_train_cfg(tmp_path, max_steps=30, warmup_steps=3, batch_size=8, eval_every=0, eval_batches=4)
    torch.manual_seed(tcfg.seed)
    initial = evaluate(Transformer(mcfg), dataset.val, tcfg)  # the trainer's initial weights (same seed)
    result = train(mcfg, tcfg, progress=False, dataset=dataset)
    assert initial == pytest.approx(math.log(VOCAB), abs=0.05)
    assert result.val_loss < initial - 0.5, f"val loss {initial:.3f} -> {result.val_loss:.3f}"
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.5
    assert result.checkpoint_path.is_file() and load_checkpoint(result.checkpoint_path).step == 30
    assert result.unigram_entropy == pytest.approx(dataset.stats["unigram_entropy_train"])
    bpc = result.val_loss / math.log(2) / result.val_chars_per_token
    assert result.val_bits_per_char == pytest.approx(bpc)


def test_checkpoint_does_not_grow_with_the_run(dataset, tmp_path):
    sizes = []
    for steps in (2, 12):
        out = tmp_path / f"run{steps}"
        train(tiny_model_cfg(), tiny_train_cfg(out, max_steps=steps, eval_every=0), progress=False, dataset=dataset)
        sizes.append((out / "checkpoint.safetensors").stat().st_size)
        assert load_checkpoint(out / "checkpoint.safetensors").history == []
        assert len((out / "metrics.jsonl").read_text().splitlines()) == steps  # the history lives here
    assert abs(sizes[1] - sizes[0]) < 256, sizes  # a few digits of step counts and seconds, nothing per step
