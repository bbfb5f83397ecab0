"""The notebook runner executes a notebook in place from a fresh kernel and reports time and memory.

Checks, on a two-cell notebook written to a temporary folder: outputs and execution counts 1, 2 are
written back; the kernel runs in the notebook's own folder with the thread cap in its environment;
a failing cell raises and leaves the file on disk unchanged; the command line returns 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from deepseek_edu.notebook_runner import installed_kernelspec, main, run_notebook


def _write(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_runs_in_place_with_outputs_and_counts(tmp_path: Path) -> None:
    path = _write(tmp_path / "demo.ipynb",
                  "import os; print(os.environ['OMP_NUM_THREADS'])",
                  "import pathlib; print(pathlib.Path.cwd().name)")
    report = run_notebook(path, timeout=120, threads=2)
    nb = json.loads(path.read_text())
    counts = [c["execution_count"] for c in nb["cells"]]
    texts = ["".join(c["outputs"][0]["text"]).strip() for c in nb["cells"]]
    assert counts == [1, 2]
    assert texts == ["2", tmp_path.name]  # thread cap passed; kernel started in the notebook's folder
    assert report.seconds > 0 and report.size_kb > 0 and report.peak_rss_mb >= 0
    assert nb["metadata"]["kernelspec"] == installed_kernelspec()  # "Python 3" was written before the run


def test_failing_cell_raises_and_keeps_the_file(tmp_path: Path) -> None:
    from nbclient.exceptions import CellExecutionError

    path = _write(tmp_path / "broken.ipynb", "raise ValueError('boom')")
    before = path.read_bytes()
    with pytest.raises(CellExecutionError, match="boom"):
        run_notebook(path, timeout=120)
    assert path.read_bytes() == before


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "cli.ipynb", "1 + 1")
    assert main([str(path), "--timeout", "120"]) == 0
    assert "cli.ipynb" in capsys.readouterr().out
