"""Lint of the committed notebooks: what breaks browsing on GitHub, nbval in CI, Binder and Colab.

Checks each `notebooks/NN_*.ipynb`: under the 1 MB budget; every code cell executed in order from a
fresh kernel (execution counts 1, 2, 3, ...); no error outputs (unless tagged raises-exception); no
stderr output (warnings are noise in the course); widget metadata, when present, carries its state;
python3 kernelspec; no absolute paths of the machine that ran it; the course skeleton: a title with
Colab and Binder badges and a first code cell that installs the package only on Colab.
The notebooks' *contents* are executed and checked by nbval (README test command).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BUDGET_BYTES = 1_000_000
MACHINE_PATH = re.compile(r"(/home/[\w.-]+/|/root/|/tmp/[\w.-]+|/work/|/Users/[\w.-]+/|[A-Z]:\\\\Users\\\\)")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    return "".join(cell.get("source", []))


def test_notebooks_exist() -> None:
    names = [p.name[:2] for p in NOTEBOOKS]
    assert names[:3] == ["00", "01", "02"], f"expected notebooks 00-02 first, found {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_size_budget(path: Path) -> None:
    size = path.stat().st_size
    assert size < BUDGET_BYTES, f"{path.name} is {size / 1e6:.2f} MB, over the 1 MB budget"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_in_order_without_errors(path: Path) -> None:
    nb = _load(path)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    expected = 1
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if not _source(cell).strip():
            continue
        assert cell["execution_count"] == expected, (
            f"{path.name} cell {index}: execution_count {cell['execution_count']}, expected {expected}; "
            "re-run with `python -m deepseek_edu.notebook_runner`"
        )
        expected += 1
        tags = cell.get("metadata", {}).get("tags", [])
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                assert "raises-exception" in tags, f"{path.name} cell {index}: {out['ename']}: {out['evalue']}"
            if out["output_type"] == "stream" and out["name"] == "stderr":
                text = "".join(out["text"]).strip()
                assert not text, f"{path.name} cell {index}: stderr output {text[:200]!r} (a warning to fix)"



@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_widget_state_and_machine_paths(path: Path) -> None:
    nb = _load(path)
    widgets = nb["metadata"].get("widgets")
    if widgets is not None:
        state = widgets.get("application/vnd.jupyter.widget-state+json", {})
        assert "state" in state, f"{path.name}: metadata.widgets has no 'state' (GitHub refuses to render)"
    text = path.read_text(encoding="utf-8")
    match = MACHINE_PATH.search(text)
    assert match is None, f"{path.name}: machine-specific path {match.group(0)!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_course_skeleton(path: Path) -> None:
    nb = _load(path)
    first_md = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    title = _source(first_md)
    assert title.lstrip().startswith("#"), f"{path.name}: first markdown cell must be the title"
    assert "colab.research.google.com" in title and "mybinder.org" in title, f"{path.name}: badges missing"
    first_code = _source(next(c for c in nb["cells"] if c["cell_type"] == "code"))
    assert "google.colab" in first_code and "pip" in first_code, (
        f"{path.name}: the first code cell must install the package on Colab (and do nothing elsewhere)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_kernelspec_is_what_ipykernel_installs(path: Path) -> None:
    """Opening a notebook in JupyterLab must not mark it modified (its kernelspec rewritten)."""
    from deepseek_edu.notebook_runner import installed_kernelspec

    assert _load(path)["metadata"].get("kernelspec") == installed_kernelspec("python3"), (
        f"{path.name}: re-run it with `python -m deepseek_edu.notebook_runner`, which writes the installed kernelspec")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_image_has_alt_text(path: Path) -> None:
    """Every PNG output carries alternative text in its metadata (`viz.show(fig, alt=...)`).

    nbconvert's HTML export writes it as the `<img alt>` read by screen readers (and warns about
    each image without it); see `test_viz.py::test_nbconvert_html_writes_the_alt_text_of_show`.
    """
    missing = []
    for index, cell in enumerate(_load(path)["cells"]):
        for out in cell.get("outputs", []):
            if "image/png" in out.get("data", {}):
                alt = out.get("metadata", {}).get("image/png", {}).get("alt", "")
                if not (isinstance(alt, str) and alt.strip()):
                    missing.append(index)
    assert not missing, (f"{path.name}: PNG outputs without alt text in cells {missing}; "
                         "show figures with `viz.show(fig, alt=...)`")
