"""A chapter run in JupyterLab in a real browser: Debian's Chromium driven by Playwright.

For each chapter in `CHAPTERS`: JupyterLab is started on 127.0.0.1 (with a token, fresh settings,
workspace and config folders) in a temporary copy of the chapter; Chromium opens it, clears the
outputs and runs all cells, then the test checks: every code cell ran and none gave an error; an
ipywidgets control responds when moved (the explorer's output fills with a new figure); every plotly
output is rendered as a plotly graph; the browser console shows no errors other than the badge images
that cannot load offline. Screenshots land in `test-artifacts/browser/` (git-ignored).

Browsers are never downloaded: the test uses the system's `/usr/bin/chromium` (`apt-get install
chromium`) and the `playwright` Python package. Without them the test is skipped, unless
DEEPSEEK_EDU_REQUIRE_BROWSER=1 (set by `.ci/run`) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("DEEPSEEK_EDU_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts" / "browser"
# Chapters opened in the browser; each must hold an ipywidgets explorer. Add chapters here.
CHAPTERS = ["04_deepseek_moe"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OFFLINE_OK = ("colab.research.google.com", "mybinder.org", "badge", "githubusercontent")
RUN_TIMEOUT_S = 300


def _need_browser():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright Python package is not installed (pip install playwright; no browser download)"
    if reason is None and not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("DEEPSEEK_EDU_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required (DEEPSEEK_EDU_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(reason)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(folder: Path, token: str, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(JUPYTER_CONFIG_DIR=str(folder / ".config"), JUPYTER_RUNTIME_DIR=str(folder / ".runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(folder / ".settings"), JUPYTERLAB_WORKSPACES_DIR=str(folder / ".ws"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), PYDEVD_DISABLE_FILE_VALIDATION="1")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(folder / "jupyterlab.log", "w")  # noqa: SIM115 -- closed with the process
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited:\n{(folder / 'jupyterlab.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"jupyter lab did not answer in 60 s:\n{(folder / 'jupyterlab.log').read_text()}")


# JavaScript run in the page (window.jupyterapp is exposed by --LabApp.expose_app_in_browser).
JS_STATE = """() => {
  if (!window.jupyterapp) return null;
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext.session) return null;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  const errors = [], plotly = [];
  cells.forEach((c, i) => {
    for (const o of c.model.outputs.toJSON()) {
      if (o.output_type === 'error') errors.push(i + ': ' + o.ename + ': ' + o.evalue);
      if (o.data && o.data['application/vnd.plotly.v1+json']) plotly.push(i);
    }
  });
  return {n: cells.length, done: cells.filter(c => c.model.executionCount !== null).length,
          kernel: panel.sessionContext.session.kernel ? panel.sessionContext.session.kernel.status : 'none',
          errors, plotly};
}"""


def _wait(page, predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    state = None
    while time.time() < deadline:
        state = page.evaluate(JS_STATE)
        if state is not None and predicate(state):
            return state
        page.wait_for_timeout(500)
    raise AssertionError(f"timed out waiting for {what}; last state {state}")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_in_jupyterlab_in_chromium(chapter: str, tmp_path: Path) -> None:
    sync_playwright = _need_browser()
    name = f"{chapter}.ipynb"
    shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    has_plotly = "application/vnd.plotly.v1+json" in (tmp_path / name).read_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    token, port = secrets.token_hex(16), _free_port()
    lab = _start_lab(tmp_path, token, port)
    console_errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def on_console(msg) -> None:
                if msg.type == "error":
                    where = f"{msg.text} @ {msg.location.get('url', '')}"
                    if not any(ok in where for ok in OFFLINE_OK):
                        console_errors.append(where)

            page.on("console", on_console)
            page.on("pageerror", lambda exc: console_errors.append(f"page error: {exc}"))
            start = time.time()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}?token={token}&reset")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            _wait(page, lambda s: s["kernel"] == "idle", 90, "the kernel to start")
            page.wait_for_timeout(2000)
            dirty_on_open = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.dirty")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
            _wait(page, lambda s: s["done"] == 0, 30, "outputs to clear")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            state = _wait(page, lambda s: (s["done"] == s["n"] and s["kernel"] == "idle") or s["errors"],
                          RUN_TIMEOUT_S, "Run All to finish")
            run_s = time.time() - start
            page.screenshot(path=str(ARTIFACTS / f"{chapter}-run-all.png"), full_page=False)
            assert not state["errors"], f"error outputs: {state['errors']}"

            # An ipywidgets control that responds: moving it redraws the explorer's figure in place
            # (`viz.explorer` replaces its static output by display id), so some image changes.
            assert page.locator(".jupyter-widgets").count() > 0, "no ipywidgets control rendered"
            images = "() => Array.from(document.querySelectorAll('.jp-OutputArea-output img')).map(i => i.src)"
            before = page.evaluate(images)
            dropdown = page.locator(".widget-dropdown select")
            if dropdown.count() > 0:
                dropdown.first.scroll_into_view_if_needed()
                options = dropdown.first.locator("option").all_inner_texts()
                current = dropdown.first.input_value()
                dropdown.first.select_option(index=next(i for i, _ in enumerate(options)
                                                        if dropdown.first.locator("option").nth(i).get_attribute(
                                                            "value") != current))
            else:
                handle = page.locator(".widget-slider .noUi-handle").first
                handle.scroll_into_view_if_needed()
                handle.focus()
                page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "before => JSON.stringify(Array.from(document.querySelectorAll('.jp-OutputArea-output img'))"
                ".map(i => i.src)) !== JSON.stringify(before)", arg=before, timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / f"{chapter}-widget-moved.png"))

            if has_plotly:
                assert state["plotly"], "the notebook holds plotly outputs but none was produced in the run"
                page.wait_for_selector(".js-plotly-plot", timeout=30_000)
                page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / f"{chapter}-plotly.png"))
            browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
    (ARTIFACTS / f"{chapter}.json").write_text(json.dumps({"run_all_s": round(run_s, 1), "cells": state["n"]}))
    assert not console_errors, f"browser console errors: {console_errors}"
    assert not dirty_on_open, ("JupyterLab marks the notebook modified as soon as it opens (kernelspec "
                               "metadata differs from ipykernel's): re-run it with deepseek_edu.notebook_runner")
