"""Colab kept true: a regular (non-editable) install, used from another directory, as Colab's first cell does.

Colab's first cell runs `pip install git+<repository>`: a wheel built from a clone. Here the tracked
files are copied (a clone without history), installed non-editable into a fresh virtual environment
together with what Colab provides already (Jupyter's kernel, matplotlib, widgets, plotly; torch pinned
as in requirements.txt), then, from an unrelated directory with a temporary HOME (so the corpus cache
lands in ~/.cache/deepseek-edu, as on Colab): `python -m deepseek_edu train --steps 2`, and chapter 00.
Runs when DEEPSEEK_EDU_ENV_TESTS=1 (see envtools.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from envtools import ROOT, clean_env, make_venv, require_env_tests, run, run_notebook

pytestmark = pytest.mark.slow

COLAB_PROVIDES = ["ipykernel", "nbclient", "nbformat", "matplotlib", "ipywidgets", "plotly", "torch==2.13.0"]


def test_regular_install_trains_and_runs_a_chapter_from_elsewhere(tmp_path: Path) -> None:
    require_env_tests()
    log = tmp_path / "colab.log"
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    python = make_venv(tmp_path / "venv")
    home, work = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    work.mkdir()
    env = clean_env(PATH=f"{python.parent}:{clean_env()['PATH']}", VIRTUAL_ENV=str(python.parent.parent))
    for var in ("DEEPSEEK_EDU_CACHE", "XDG_CACHE_HOME"):
        env.pop(var, None)
    run([python, "-m", "pip", "install", "-q", str(clone), *COLAB_PROVIDES], log, env=env, cwd=work)
    shown = subprocess.run([python, "-m", "pip", "show", "-f", "deepseek-edu"], capture_output=True, text=True, env=env)
    assert "Editable project location" not in shown.stdout, "the install must be a regular one"
    run_env = dict(env, HOME=str(home), OMP_NUM_THREADS="2")
    run([python, "-m", "deepseek_edu", "train", "--steps", "2", "--out", work / "runs"], log, env=run_env, cwd=work)
    assert any((home / ".cache" / "deepseek-edu").iterdir()), "the corpus cache did not land in ~/.cache/deepseek-edu"
    imported = subprocess.run([python, "-c", "import deepseek_edu; print(deepseek_edu.__file__)"],
                              capture_output=True, text=True, env=run_env, cwd=work, check=True).stdout
    assert str(ROOT) not in imported and "site-packages" in imported
    copy = work / "00_welcome.ipynb"
    shutil.copy(ROOT / "notebooks" / copy.name, copy)
    run_notebook(python, copy, log, run_env, threads=2)
