"""Helpers of the environment tests (test_binder.py, test_colab.py): fresh virtual environments.

These tests build their own virtual environments with pip (its wheel cache is reused, so a second
build takes a minute or two, not ten) and run the course there, as Binder or Colab would. They run
when DEEPSEEK_EDU_ENV_TESTS=1 (`.ci/run` sets it and runs them beside the README command); otherwise
they are skipped: they need the package index and several minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs a notebook copy with the package's runner inside the environment under test and prints JSON with
# its time and peak memory: the kernel's RSS as the runner samples it, and the largest child's
# maximum RSS from getrusage(RUSAGE_CHILDREN) (the kernel is a child of this process).
RUN_NOTEBOOK = """
import json, resource, sys
from deepseek_edu.notebook_runner import run_notebook
r = run_notebook(sys.argv[1], timeout=600, threads=int(sys.argv[2]))
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": r.seconds, "peak_mib": max(r.peak_rss_mb, child)}))
"""


def require_env_tests() -> None:
    if os.environ.get("DEEPSEEK_EDU_ENV_TESTS") != "1":
        pytest.skip("builds a fresh virtual environment (minutes, needs the package index); "
                    "set DEEPSEEK_EDU_ENV_TESTS=1 (.ci/run does)")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the outer virtualenv, PYTHONPATH or Jupyter paths leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "JUPYTER_PATH", "JUPYTER_CONFIG_DIR",
                        "JUPYTER_DATA_DIR", "PIP_REQUIRE_VIRTUALENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    env.update(PIP_PROGRESS_BAR="off", PIP_DISABLE_PIP_VERSION_CHECK="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    env.update(extra)
    return env


def make_venv(path: Path) -> Path:
    """A fresh virtual environment with the interpreter running the tests; returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True, env=clean_env())
    return path / "bin" / "python"


def run(cmd: list, log: Path, timeout: int = 1500, **kw) -> float:
    """Run `cmd`, append its output to `log`; seconds taken. Fails the test with the log's tail."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}:\n" + log.read_text()[-4000:])
    return time.time() - start


def run_notebook(python: Path, notebook: Path, log: Path, env: dict, threads: int = 1) -> dict:
    """Execute `notebook` (a copy) with `python`'s environment; {"seconds", "peak_mib"}."""
    out = subprocess.run([str(python), "-c", RUN_NOTEBOOK, str(notebook), str(threads)], capture_output=True,
                         text=True, env=env, cwd=notebook.parent, timeout=900)
    with open(log, "a") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        pytest.fail(f"{notebook.name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20
