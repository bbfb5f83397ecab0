"""optim.py: the one optimizer step, and a training loop that never loses a good checkpoint.

Checks, in each of the three loops (pre-training `Trainer`, SFT, GRPO), that a gradient made NaN or
inf at a chosen step (a tensor hook on one parameter; the loss stays finite) never reaches an
optimizer step, a weight or a checkpoint: the step is skipped and counted, the routers' biases and
load counters are untouched, and too many skips in a row stop the run with `NonFiniteError`.
`save_checkpoint` refuses non-finite weights and leaves the previous file as it was.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepseek_edu.checkpoint import load_checkpoint, save_checkpoint
from deepseek_edu.config import GRPOConfig, ModelConfig, TrainConfig
from deepseek_edu.data import load_dataset
from deepseek_edu.grpo import grpo_train, supervised_finetune
from deepseek_edu.model import Transformer
from deepseek_edu.optim import NonFiniteError, SkipCounter, make_optimizer, optimizer_step
from deepseek_edu.tasks import ArithmeticTask, CharTokenizer
from deepseek_edu.train import Trainer

VOCAB = 300
BAD = {"nan": math.nan, "inf": math.inf}


def _poison(param: torch.nn.Parameter, at_calls: set[int], value: float) -> list[int]:
    """Make `param`'s gradient hold `value` in one entry on the backward passes numbered in `at_calls` (1-based)."""
    calls = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] in at_calls:
            grad = grad.clone()
            grad.view(-1)[0] = value
        return grad

    param.register_hook(hook)
    return calls


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def _moe_cfg(**kw) -> ModelConfig:
    base = {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 2, "inter_dim": 64, "max_seq_len": 32,
            "n_routed_experts": 4, "n_activated_experts": 2, "n_shared_experts": 1, "moe_inter_dim": 16,
            "n_dense_layers": 1, "score_func": "sigmoid", "bias_update_speed": 0.01}
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("python-docs", VOCAB, progress=False)


# --- the step itself -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_gradient_changes_nothing(kind):
    torch.manual_seed(0)
    model = Transformer(_moe_cfg()).train()
    opt = make_optimizer(model, TrainConfig(vocab_size=VOCAB))
    x = torch.randint(0, VOCAB, (2, 16))
    model(x).logits.float().logsumexp(-1).mean().backward()
    optimizer_step(model, opt, None, grad_clip=1.0)  # one good step: AdamW has moments now
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    opt.zero_grad()
    loss = model(x).logits.float().logsumexp(-1).mean()
    assert torch.isfinite(loss)
    loss.backward()
    next(model.parameters()).grad.view(-1)[0] = BAD[kind]  # a finite loss, a non-finite gradient
    assert any(int(m.load_since_update.sum()) > 0 for m in model.moe_layers())
    result = optimizer_step(model, opt, None, grad_clip=1.0)
    assert result.skipped and not math.isfinite(float(result.grad_norm)) and result.loads == []
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # weights and the routers' biases
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k  # moments and step counts
    assert all(int(m.load_since_update.sum()) == 0 for m in model.moe_layers())  # the load is dropped


def test_skip_counter_stops_after_the_limit_in_a_row():
    from deepseek_edu.optim import StepResult

    bad, good = StepResult(torch.tensor(math.nan), skipped=True), StepResult(torch.tensor(1.0))
    counter = SkipCounter(3)
    for r in (bad, bad, good, bad, bad):
        counter.update(r)
    assert counter.skipped == 4 and counter.in_a_row == 2
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        counter.update(bad)
    assert issubclass(NonFiniteError, FloatingPointError)
    with pytest.raises(ValueError, match="max_skipped_steps"):
        SkipCounter(0)


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    torch.manual_seed(0)
    model = Transformer(_moe_cfg())
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=1)
    good = path.read_bytes()
    with torch.no_grad():
        model.head.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="head.weight"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == good and load_checkpoint(path).step == 1


# --- the three loops -----------------------------------------------------------------------------------


def _train_cfg(tmp_path, **kw) -> TrainConfig:
    base = {"corpus": "python-docs", "vocab_size": VOCAB, "seq_len": 16, "batch_size": 2, "max_steps": 5,
            "warmup_steps": 1, "eval_every": 0, "eval_batches": 1, "save_every": 1, "out_dir": str(tmp_path)}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_pretraining_skips_a_non_finite_gradient(dataset, tmp_path, kind):
    trainer = Trainer(_moe_cfg(), _train_cfg(tmp_path), progress=False, dataset=dataset)
    biases = []
    trainer.callback = lambda record: biases.append(trainer.model.layers[1].ffn.gate.bias.clone())
    _poison(trainer.model.layers[1].ffn.experts[0].w1.weight, {3}, BAD[kind])
    result = trainer.fit()
    assert _all_finite(trainer.model)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1] and result.history[-1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows)  # the loss was finite: only the gradient was not
    assert torch.equal(biases[1], biases[2])  # no bias step on the skipped step
    assert not torch.equal(biases[2], biases[3])
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.step == 5 and ckpt.extra["skipped_steps"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in ckpt.model_state.values() if t.is_floating_point())
    assert all(bool(torch.isfinite(t).all()) for s in ckpt.optimizer_state["state"].values() for t in s.values())


def test_pretraining_stops_after_too_many_skips_and_keeps_the_good_checkpoint(dataset, tmp_path):
    trainer = Trainer(_moe_cfg(), _train_cfg(tmp_path, max_steps=8, max_skipped_steps=2), progress=False,
                      dataset=dataset)
    _poison(trainer.model.embed.weight, {3, 4, 5, 6, 7, 8}, math.nan)
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.step == 3 and ckpt.extra["skipped_steps"] == 1  # saved after step 3 (one skip), not after 4
    assert all(bool(torch.isfinite(t).all()) for t in ckpt.model_state.values() if t.is_floating_point())


def _task_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(_moe_cfg(vocab_size=CharTokenizer.vocab_size, max_seq_len=48))


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_sft_skips_a_non_finite_gradient(kind):
    model = _task_model()
    _poison(model.layers[1].ffn.experts[1].w2.weight, {2}, BAD[kind])
    losses = supervised_finetune(model, CharTokenizer(), ArithmeticTask(n_digits=1), steps=4, batch_size=4,
                                 progress=False)
    assert losses.skipped_steps == 1 and len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert _all_finite(model)


def test_sft_stops_after_too_many_skips():
    model = _task_model()
    _poison(model.embed.weight, set(range(1, 10)), math.nan)
    with pytest.raises(NonFiniteError):
        supervised_finetune(model, CharTokenizer(), ArithmeticTask(n_digits=1), steps=6, batch_size=4,
                            progress=False, max_skipped_steps=3)
    assert _all_finite(model)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_grpo_skips_a_non_finite_gradient(kind):
    model = _task_model()
    _poison(model.head.weight, {1}, BAD[kind])
    cfg = GRPOConfig.for_variant("grpo", steps=2, group_size=2, prompts_per_step=2, max_new_tokens=6,
                                 updates_per_batch=1, eval_every=0, n_eval=2)
    res = grpo_train(model, CharTokenizer(), ArithmeticTask(n_digits=1), cfg, progress=False)
    assert res.skipped_steps == 1 and [r["skipped_steps"] for r in res.history] == [1, 1]
    assert _all_finite(model)


def test_the_step_calls_the_models_bias_update_once_and_never_on_a_skip():
    torch.manual_seed(0)
    model = Transformer(_moe_cfg()).train()
    opt = make_optimizer(model, TrainConfig(vocab_size=VOCAB))
    calls = []
    real = model.update_router_biases
    model.update_router_biases = lambda: calls.append(1) or real()  # as benchmarks/moe_balance.py records loads
    x = torch.randint(0, VOCAB, (2, 16))
    for poison in (False, True, False):
        opt.zero_grad()
        model(x).logits.float().logsumexp(-1).mean().backward()
        if poison:
            next(model.parameters()).grad.view(-1)[0] = math.nan
        optimizer_step(model, opt, None, grad_clip=1.0)
    assert len(calls) == 2
