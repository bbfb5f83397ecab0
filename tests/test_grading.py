"""The grading round trip with nbgrader (`assignments/nbgrade.py`), on every chapter that has exercises.

For each chapter, the graded-only extraction (Colab cell, cells tagged `setup`/`exercise-setup`,
nbgrader cells) is released with `nbgrader generate_assignment` and autograded twice with
`nbgrader autograde`: the instructor version must score full marks on every graded cell, the release
with its stubs untouched must score zero on every graded cell (each hidden test can fail). Chapters
01-11 must each have at least three graded exercises; the nbgrader markup of the whole course is linted.
`tests/data/99_grading_fixture.ipynb` (three exercises) checks the machinery itself.
Chapters are discovered from notebooks/, so chapters added later are covered without editing this file.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat
import pytest

from assignments import nbgrade

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::Warning")]  # SQLAlchemy inside nbgrader

FIXTURE = Path(__file__).parent / "data" / "99_grading_fixture.ipynb"
CHAPTERS = nbgrade.chapters()
REQUIRED = {f"{n:02d}" for n in range(1, 12)}  # chapters that must hold >= 3 graded exercises
MIN_EXERCISES = 3


def _graded(path: Path) -> list:
    return nbgrade.graded_cells(nbformat.read(path, as_version=4))


def _worker_init() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DEEPSEEK_EDU_THREADS"):
        os.environ[var] = "1"  # the kernels inherit it: two chapters at a time on two cores
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")


def _round_trip(path: Path):
    try:
        return nbgrade.round_trip(path)
    except Exception as exc:  # noqa: BLE001 -- reported by the chapter's own test
        return exc


@pytest.fixture(scope="module")
def round_trips() -> dict[Path, object]:
    """Round trip of every notebook with graded cells (and the fixture), two chapters at a time."""
    paths = [FIXTURE] + [p for p in CHAPTERS if _graded(p)]
    with ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)), initializer=_worker_init) as pool:
        return dict(zip(paths, pool.map(_round_trip, paths)))


def _check_round_trip(path: Path, result) -> None:
    if isinstance(result, Exception):
        raise result
    instructor, release = result
    graded = {c.metadata.nbgrader["grade_id"] for c in _graded(path)}
    assert {s.grade_id for s in instructor} == graded == {s.grade_id for s in release}
    short = [f"{s.grade_id}: {s.score:g}/{s.max_score:g}" for s in instructor if s.score != s.max_score]
    assert not short, f"instructor version of {path.name} loses points: {short}"
    passing = [f"{s.grade_id}: {s.score:g}/{s.max_score:g}" for s in release if s.score != 0]
    assert not passing, f"untouched release of {path.name} scores on: {passing} (hidden tests cannot fail)"


def test_fixture_round_trip(round_trips) -> None:
    _check_round_trip(FIXTURE, round_trips[FIXTURE])
    assert len(_graded(FIXTURE)) == 3


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_round_trip(path: Path, round_trips) -> None:
    if path not in round_trips:
        pytest.skip(f"{path.name} has no graded cells")
    _check_round_trip(path, round_trips[path])


@pytest.mark.parametrize("path", [p for p in CHAPTERS if p.name[:2] in REQUIRED], ids=lambda p: p.stem)
def test_chapter_has_three_graded_exercises(path: Path) -> None:
    graded = _graded(path)
    assert len(graded) >= MIN_EXERCISES, (
        f"{path.name} has {len(graded)} graded exercises (nbgrader test cells with points); "
        f"every chapter 01-11 needs at least {MIN_EXERCISES}")


def test_nbgrader_markup_of_the_course() -> None:
    assert nbgrade.lint(CHAPTERS) == []


def test_nbgrader_markup_of_the_fixture() -> None:
    assert nbgrade.lint([FIXTURE]) == []


def test_lint_finds_the_usual_mistakes() -> None:
    nb = nbformat.read(FIXTURE, as_version=4)
    sol = next(c for c in nb.cells if nbgrade.is_solution(c) and "def softmax" in c.source)
    sol.source = sol.source.replace("### END SOLUTION", "")
    tests = [c for c in nb.cells if nbgrade.is_graded(c)]
    tests[0].metadata.nbgrader["points"] = 0
    tests[1].source = tests[1].source.replace("### BEGIN HIDDEN TESTS", "")
    tests[2].metadata.nbgrader["grade_id"] = tests[1].metadata.nbgrader["grade_id"]
    nb.cells.append(nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION"))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FIXTURE.name
        nbformat.write(nb, path)
        problems = "\n".join(nbgrade.lint([path]))
    for expected in ("lacks ### BEGIN/END SOLUTION", "has no points", "has no ### BEGIN/END HIDDEN TESTS",
                     "used 2 times", "solution markers in a cell without nbgrader solution metadata"):
        assert expected in problems


def test_full_release_strips_solutions_and_hidden_tests(tmp_path) -> None:
    """`python -m assignments release` on every chapter with graded cells (no execution: quick)."""
    paths = [FIXTURE] + [p for p in CHAPTERS if _graded(p)]
    for released in nbgrade.release_all(paths, tmp_path):
        nb = nbformat.read(released, as_version=4)
        text = "\n".join(c.source for c in nb.cells)
        for marker in (*nbgrade.SOLUTION_MARKERS, *nbgrade.HIDDEN_MARKERS):
            assert marker not in text, f"{released.name} still holds {marker}"
        stubs = [c for c in nb.cells if nbgrade.is_solution(c) and c.cell_type == "code"]
        assert stubs and all("raise NotImplementedError()" in c.source for c in stubs)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
