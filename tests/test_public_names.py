"""The package's public names stay where notebooks, tests and scripts import them from.

Checks that every ``from deepseek_edu... import name`` in a notebook's code resolves; that the names
moved to their own modules (block.py, loss.py, optim.py, dispatch.py, io.py, rewards.py, rl.py,
corpus.py, tokenizer.py, sampling.py, evaluation.py, grpo_config.py) are still re-exported under their
old homes; that `deepseek_edu.mtp` and
`deepseek_edu.model` each import first in a fresh interpreter, with no import inside a function in
the modules of the decoder; and that no test or benchmark imports a private (``_``) name from
another module.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (old module, name): names that moved out of these modules and are re-exported there.
MOVED = [
    ("deepseek_edu.model", "Block"),
    ("deepseek_edu.train", "lm_loss"), ("deepseek_edu.train", "extra_loss_terms"),
    ("deepseek_edu.train", "make_optimizer"), ("deepseek_edu.train", "make_scheduler"),
    ("deepseek_edu.train", "lr_at"), ("deepseek_edu.train", "lr_multiplier"),
    ("deepseek_edu.train", "save_checkpoint"), ("deepseek_edu.train", "load_checkpoint"),
    ("deepseek_edu.train", "CheckpointError"), ("deepseek_edu.train", "NonFiniteError"),
    ("deepseek_edu.moe", "expert_counts"), ("deepseek_edu.moe", "wgrad_splits"),
    ("deepseek_edu.moe", "grouped_mm_available"), ("deepseek_edu.moe", "DISPATCH_IMPLS"),
    ("deepseek_edu.grpo", "accuracy_reward"), ("deepseek_edu.grpo", "format_reward"),
    ("deepseek_edu.grpo", "parse_r1_layout"), ("deepseek_edu.grpo", "score_responses"),
    ("deepseek_edu.grpo", "check_answer"), ("deepseek_edu.grpo", "sample_responses"),
    ("deepseek_edu.grpo", "response_logprobs"), ("deepseek_edu.grpo", "supervised_finetune"),
    ("deepseek_edu.grpo", "evaluate"), ("deepseek_edu.grpo", "task_model_config"),
    ("deepseek_edu.grpo", "Rollout"),
    ("deepseek_edu.generate", "sample_next"), ("deepseek_edu.generate", "decode"),
    ("deepseek_edu.data", "load_corpus"), ("deepseek_edu.data", "train_tokenizer"),
    ("deepseek_edu.data", "Tokenizer"), ("deepseek_edu.data", "CorpusUnavailableError"),
    ("deepseek_edu.train", "evaluate"), ("deepseek_edu.train", "resolve_device"),
    ("deepseek_edu.config", "GRPOConfig"), ("deepseek_edu.config", "GRPO_VARIANTS"),
    ("deepseek_edu.config", "GRPO_TASKS"),
]


def _code_cells(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            yield "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))


def _notebook_imports() -> list[tuple[str, str, str]]:
    found = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for src in _code_cells(nb):
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepseek_edu"):
                    found += [(nb.name, node.module, alias.name) for alias in node.names]
    return found


NOTEBOOK_IMPORTS = _notebook_imports()


def test_notebooks_import_something():
    assert len(NOTEBOOK_IMPORTS) > 20


@pytest.mark.parametrize("notebook, module, name", NOTEBOOK_IMPORTS)
def test_every_name_a_notebook_imports_exists(notebook, module, name):
    mod = importlib.import_module(module)
    if not hasattr(mod, name):  # `from deepseek_edu import viz` imports a submodule
        importlib.import_module(f"{module}.{name}")


@pytest.mark.parametrize("module, name", MOVED)
def test_moved_names_are_re_exported(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


@pytest.mark.parametrize("module", ["deepseek_edu.mtp", "deepseek_edu.model", "deepseek_edu.rl"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["block.py", "model.py", "mtp.py", "moe.py", "dispatch.py", "loss.py",
                                  "optim.py"])
def test_no_import_inside_a_function(name):
    tree = ast.parse((ROOT / "deepseek_edu" / name).read_text(encoding="utf-8"))
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
            assert not inner, f"{name}: {fn.name} imports inside its body (line {inner[0].lineno})"


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            bad += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_test_or_benchmark_imports_a_private_name():
    files = sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = [hit for f in files for hit in _private_imports(f)]
    assert not bad, "\n".join(bad)
