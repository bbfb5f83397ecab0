"""Student releases and autograding of the course notebooks with nbgrader.

The committed notebooks are the instructor versions: every exercise is an nbgrader solution cell
(`### BEGIN SOLUTION` / `### END SOLUTION`) followed by an nbgrader test cell with points (visible
asserts, then `### BEGIN HIDDEN TESTS` / `### END HIDDEN TESTS`). nbgrader works in a course
directory (source/<assignment>/<notebook>.ipynb -> release/, submitted/<student>/<assignment>/ ->
autograded/); `Course` makes a temporary one, so nothing is written into the repository.

The graded-only extraction of a chapter keeps, in order, the Colab install cell, the cells tagged
`setup` and `exercise-setup`, and every nbgrader cell. Every exercise must run from those cells alone;
grading the extraction instead of the whole chapter takes seconds instead of a minute.

    python -m assignments release [--out DIR] [--graded-only] [NOTEBOOK ...]
    python -m assignments grade NOTEBOOK SUBMISSION [SUBMISSION ...] [--graded-only]
    python -m assignments lint
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
EXTRACT_TAGS = ("setup", "exercise-setup")
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")
HIDDEN_MARKERS = ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")


def chapters(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course notebooks `NN_topic.ipynb`, in order."""
    return sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_solution(cell) -> bool:
    return bool(nbgrader_meta(cell).get("solution"))


def is_graded(cell) -> bool:
    return bool(nbgrader_meta(cell).get("grade"))


def is_colab_cell(cell) -> bool:
    """The first-cell installer that runs only on Colab (it mentions `google.colab`)."""
    return cell.cell_type == "code" and "google.colab" in cell.source


def graded_cells(nb) -> list:
    """The cells that carry points (nbgrader `grade: true`)."""
    return [c for c in nb.cells if is_graded(c)]


def extract_graded(nb):
    """The graded-only extraction: Colab cell, `setup`/`exercise-setup` cells, nbgrader cells, in order."""
    out = copy.deepcopy(nb)
    out.cells = [c for c in out.cells
                 if is_colab_cell(c) or nbgrader_meta(c)
                 or set(c.get("metadata", {}).get("tags", ())) & set(EXTRACT_TAGS)]
    for c in out.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    out.metadata.pop("widgets", None)
    return out


def lint(paths: list[Path]) -> list[str]:
    """Problems in the nbgrader markup of `paths`, one line each (empty when all is well).

    Checks: grade_ids unique across all `paths`; every solution code cell holds both solution
    markers, and markers appear only in solution cells; every test cell has points > 0, is locked
    and holds hidden tests; hidden-test markers only in test cells; grade_ids start with the
    chapter's `chNN-`; each solution cell is followed (at once or after other cells) by a test cell.
    """
    problems: list[str] = []
    ids: Counter = Counter()
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        prefix = f"ch{path.name[:2]}-"
        pending_solution = None
        for i, cell in enumerate(nb.cells):
            meta, where = nbgrader_meta(cell), f"{path.name} cell {i}"
            src = cell.source
            has_sol = [m in src for m in SOLUTION_MARKERS]
            has_hidden = [m in src for m in HIDDEN_MARKERS]
            if any(has_sol) and not is_solution(cell):
                problems.append(f"{where}: solution markers in a cell without nbgrader solution metadata")
            if any(has_hidden) and not is_graded(cell):
                problems.append(f"{where}: hidden-test markers in a cell that is not a graded test cell")
            if not meta:
                continue
            gid = meta.get("grade_id", "")
            ids[gid] += 1
            if not gid.startswith(prefix) and path.name[:2].isdigit():
                problems.append(f"{where}: grade_id {gid!r} does not start with {prefix!r}")
            if meta.get("schema_version") != 3:
                problems.append(f"{where}: nbgrader schema_version is not 3")
            if is_solution(cell) and cell.cell_type == "code":
                if not all(has_sol):
                    problems.append(f"{where}: solution cell {gid!r} lacks ### BEGIN/END SOLUTION")
                pending_solution = gid
            if is_graded(cell):
                if not (isinstance(meta.get("points"), (int, float)) and meta["points"] > 0):
                    problems.append(f"{where}: test cell {gid!r} has no points")
                if cell.cell_type == "code" and not all(has_hidden):
                    problems.append(f"{where}: test cell {gid!r} has no ### BEGIN/END HIDDEN TESTS")
                if cell.cell_type == "code" and not meta.get("locked"):
                    problems.append(f"{where}: test cell {gid!r} is not locked")
                pending_solution = None
        if pending_solution is not None:
            problems.append(f"{path.name}: solution cell {pending_solution!r} has no test cell after it")
    problems += [f"grade_id {gid!r} used {n} times" for gid, n in ids.items() if n > 1]
    return problems


@dataclass
class Score:
    """One graded cell of one submission."""
    grade_id: str
    score: float
    max_score: float


@dataclass
class Course:
    """A temporary nbgrader course directory (deleted by `close`; usable as a context manager)."""
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deepseek-edu-nbgrader-")))
    timeout: int = 300  # seconds per cell when autograding

    def __post_init__(self) -> None:
        from nbgrader.apps import NbGraderAPI
        from nbgrader.coursedir import CourseDirectory
        from traitlets.config import Config

        self.root = Path(self.root)
        config = Config()
        config.CourseDirectory.root = str(self.root)
        config.CourseDirectory.db_url = f"sqlite:///{self.root / 'gradebook.db'}"
        config.ExecutePreprocessor.timeout = self.timeout
        config.Execute.timeout = self.timeout
        config.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
        self.db_url = config.CourseDirectory.db_url
        self.api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _check(self, result: dict, what: str) -> None:
        if not result.get("success"):
            raise RuntimeError(f"nbgrader {what} failed:\n{result.get('error', '')}\n{result.get('log', '')}")

    def add_source(self, nb, name: str) -> None:
        """Put `nb` into source/<name>/<name>.ipynb (one notebook per assignment)."""
        folder = self.root / "source" / name
        folder.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, folder / f"{name}.ipynb")

    def release(self, name: str):
        """`nbgrader generate_assignment`: the student version (solutions stubbed, hidden tests removed)."""
        self._check(self.api.generate_assignment(name, force=True, create=True), f"generate_assignment {name}")
        return nbformat.read(self.root / "release" / name / f"{name}.ipynb", as_version=4)

    def autograde(self, name: str, student: str, nb) -> list[Score]:
        """`nbgrader autograde` of `nb` submitted by `student`; the score of every graded cell."""
        from nbgrader.api import Gradebook

        folder = self.root / "submitted" / student / name
        folder.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, folder / f"{name}.ipynb")
        self._check(self.api.autograde(name, student, force=True, create=True), f"autograde {name} {student}")
        with Gradebook(self.db_url) as gb:
            sub = gb.find_submission_notebook(name, name, student)
            return sorted((Score(g.name, float(g.score), float(g.max_score)) for g in sub.grades),
                          key=lambda s: s.grade_id)


def release_all(paths: list[Path], out: Path, graded_only: bool = False) -> list[Path]:
    """Build the student release of each notebook in `paths` into `out` (same file names)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with Course() as course:
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            if graded_only:
                nb = extract_graded(nb)
            course.add_source(nb, path.stem)
            release = course.release(path.stem)
            target = out / path.name
            nbformat.write(release, target)
            written.append(target)
    return written


def grade(source: Path, submissions: list[Path], graded_only: bool = False) -> dict[str, list[Score]]:
    """Autograde `submissions` (students named by file stem) against the instructor notebook `source`."""
    name = source.stem
    instructor = nbformat.read(source, as_version=4)
    scores = {}
    with Course() as course:
        course.add_source(extract_graded(instructor) if graded_only else instructor, name)
        course.release(name)  # registers the assignment and its graded cells in the gradebook
        for sub in submissions:
            nb = nbformat.read(sub, as_version=4)
            student = Path(sub).stem.replace(".", "_") or "student"
            scores[student] = course.autograde(name, student, extract_graded(nb) if graded_only else nb)
    return scores


def round_trip(path: Path) -> tuple[list[Score], list[Score]]:
    """Grade the graded-only extraction of `path` as is (instructor) and as released (stubs untouched).

    Returns:
        (instructor scores, release scores); the first should be full marks, the second all zero.
    """
    name = path.stem
    with Course() as course:
        course.add_source(extract_graded(nbformat.read(path, as_version=4)), name)
        release = course.release(name)
        source = nbformat.read(course.root / "source" / name / f"{name}.ipynb", as_version=4)
        return course.autograde(name, "instructor", source), course.autograde(name, "release", release)


def format_table(scores: dict[str, list[Score]]) -> str:
    """A text table: one row per grade_id, one column per student, and the totals."""
    students = list(scores)
    ids = sorted({s.grade_id for rows in scores.values() for s in rows})
    by = {st: {s.grade_id: s for s in rows} for st, rows in scores.items()}
    width = max([len("grade_id"), *map(len, ids)])
    lines = [f"{'grade_id':<{width}}  " + "  ".join(f"{st:>12}" for st in students)]
    for gid in ids:
        cells = []
        for st in students:
            s = by[st].get(gid)
            cells.append(f"{s.score:g}/{s.max_score:g}".rjust(12) if s else "-".rjust(12))
        lines.append(f"{gid:<{width}}  " + "  ".join(cells))
    totals = [f"{sum(s.score for s in scores[st]):g}/{sum(s.max_score for s in scores[st]):g}".rjust(12)
              for st in students]
    lines.append(f"{'total':<{width}}  " + "  ".join(totals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m assignments", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="build the student release of every chapter (or those named)")
    rel.add_argument("paths", nargs="*", type=Path, help="instructor notebooks (default: notebooks/NN_*.ipynb)")
    rel.add_argument("--out", type=Path, default=ROOT / "release", help="folder for the student notebooks")
    rel.add_argument("--graded-only", action="store_true", help="release only the graded-only extraction")
    gr = sub.add_parser("grade", help="autograde submissions against an instructor notebook")
    gr.add_argument("source", type=Path, help="the instructor notebook, e.g. notebooks/04_deepseek_moe.ipynb")
    gr.add_argument("submissions", nargs="+", type=Path, help="submitted notebooks (student = file stem)")
    gr.add_argument("--graded-only", action="store_true",
                    help="grade only the graded-only extraction of each submission (fast)")
    sub.add_parser("lint", help="check the nbgrader markup of every chapter")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    if args.command == "release":
        paths = args.paths or [p for p in chapters() if graded_cells(nbformat.read(p, as_version=4))]
        for target in release_all(paths, args.out, args.graded_only):
            print(target)
        return 0
    if args.command == "grade":
        print(format_table(grade(args.source, args.submissions, args.graded_only)))
        return 0
    problems = lint(chapters())
    print("\n".join(problems) or "nbgrader markup: no problems")
    return 1 if problems else 0
