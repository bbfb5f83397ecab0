"""Binder kept true: an environment made from `binder/` alone runs the chapters Binder users open first.

A fresh virtual environment gets `pip install -r binder/requirements.txt` (run from the repository
root, as repo2docker does), then `binder/postBuild` runs in it; chapters 00-02 are then executed
(copies, one thread: Binder gives one CPU) and each must stay under Binder's 2 GB of memory. The
install size and the run times are written to test-artifacts/binder.json.
Runs when DEEPSEEK_EDU_ENV_TESTS=1 (see envtools.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from envtools import ROOT, clean_env, dir_mib, make_venv, require_env_tests, run, run_notebook

pytestmark = pytest.mark.slow

CHAPTERS = ["00_welcome", "01_data_and_tokenizer", "02_baseline_transformer"]
LIMIT_MIB = 2000  # Binder: under 2 GB


def test_binder_environment_runs_the_first_chapters(tmp_path: Path) -> None:
    require_env_tests()
    log = tmp_path / "binder.log"
    python = make_venv(tmp_path / "venv")
    env = clean_env(PATH=f"{python.parent}:{clean_env()['PATH']}", VIRTUAL_ENV=str(python.parent.parent))
    install_s = run([python, "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"], log, cwd=ROOT, env=env)
    post_s = run(["bash", ROOT / "binder" / "postBuild"], log, cwd=ROOT, env=env)
    results = {"install_s": round(install_s, 1), "postBuild_s": round(post_s, 1),
               "venv_mib": round(dir_mib(tmp_path / "venv")), "chapters": {}}
    for chapter in CHAPTERS:
        copy = tmp_path / "notebooks" / f"{chapter}.ipynb"
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / "notebooks" / copy.name, copy)
        r = run_notebook(python, copy, log, env, threads=1)
        results["chapters"][chapter] = {"seconds": round(r["seconds"], 1), "peak_mib": round(r["peak_mib"])}
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "binder.json").write_text(json.dumps(results, indent=1))
    over = {c: r["peak_mib"] for c, r in results["chapters"].items() if r["peak_mib"] >= LIMIT_MIB}
    assert not over, f"over Binder's 2 GB: {over}"
