"""course_model.py: the cached course model is built once, deterministically, and loaded from the cache.

A few steps on the offline python-docs corpus into a temporary cache stand in for the real build (the
code path is the same; only steps and corpus differ).
"""

from __future__ import annotations

import pytest
import torch

from deepseek_edu.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from deepseek_edu.course_model import (
    build_course_model,
    course_model_configs,
    course_model_dir,
    course_model_history,
    load_course_model,
)

FAST = {"steps": 2, "corpus": "python-docs"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_build_caches_once_and_load_reads_the_cache(tmp_path, monkeypatch):
    path = build_course_model(cache_dir=tmp_path, progress=False, **FAST)
    assert path == course_model_dir(cache_dir=tmp_path, **FAST) / CHECKPOINT_NAME and path.is_file()
    assert [p.name for p in path.parent.parent.iterdir()] == [path.parent.name]  # no build folder left
    ckpt = load_checkpoint(path)
    model_cfg, train_cfg = course_model_configs(FAST["steps"], corpus="python-docs")
    assert ckpt.model_config == model_cfg and ckpt.train_config == train_cfg and ckpt.step == 2
    assert ckpt.optimizer_state is None and ckpt.tokenizer is not None  # weights and tokenizer only
    assert [r["step"] for r in course_model_history(cache_dir=tmp_path, **FAST)] == [1, 2]

    # cached: loading must not train again
    import deepseek_edu.train as train_mod

    def no_training(*args, **kwargs):
        raise AssertionError("the cached course model was trained again")

    monkeypatch.setattr(train_mod.Trainer, "fit", no_training)
    model, tokenizer = load_course_model(progress=False, cache_dir=tmp_path, **FAST)
    assert not model.training and tokenizer.vocab_size == model.cfg.vocab_size
    assert build_course_model(cache_dir=tmp_path, progress=False, **FAST) == path


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    a, _ = load_course_model(progress=False, cache_dir=tmp_path / "a", **FAST)
    b, _ = load_course_model(progress=False, cache_dir=tmp_path / "b", **FAST)
    c, _ = load_course_model(progress=False, cache_dir=tmp_path / "c", seed=7, **FAST)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_damaged_cache_is_refused_by_name(tmp_path):
    path = build_course_model(cache_dir=tmp_path, progress=False, **FAST)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError):
        load_course_model(progress=False, cache_dir=tmp_path, **FAST)


def test_invalid_steps():
    with pytest.raises(ValueError, match="max_steps"):
        course_model_configs(0)


def test_prepare_course_model_flag_builds_it(monkeypatch, capsys, tmp_path):
    import deepseek_edu.course_model as cm
    from deepseek_edu.__main__ import main

    calls = []
    monkeypatch.setattr(cm, "build_course_model", lambda **kw: calls.append(kw) or tmp_path / CHECKPOINT_NAME)
    assert main(["prepare", "--corpus", "python-docs", "--vocab-size", "512", "--no-progress"]) == 0
    assert calls == []
    assert main(["prepare", "--corpus", "python-docs", "--vocab-size", "512", "--no-progress",
                 "--course-model"]) == 0
    assert calls == [{"progress": False}] and "course model:" in capsys.readouterr().out
