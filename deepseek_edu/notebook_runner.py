"""Execute the course notebooks in place, each from a fresh kernel, and report time and memory.

    python -m deepseek_edu.notebook_runner                 # every notebook under notebooks/
    python -m deepseek_edu.notebook_runner notebooks/02_baseline_transformer.ipynb --threads 2

Uses `nbclient` (the library Jupyter itself uses). Each notebook runs in its own kernel started in
the notebook's folder, with the CPU thread count capped (the course's budget is stated for 2
cores), and is written back with its outputs so that GitHub shows them. Widget state is stored in
the notebook metadata so the static views render. The runner prints the wall time and the peak
resident memory of each kernel (Linux: read from /proc while it runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class RunReport:
    path: Path
    seconds: float
    peak_rss_mb: float  # peak resident set size of the kernel process, MiB (0 when unknown)
    size_kb: float  # size of the written notebook


def _rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its children in MiB (Linux /proc; 0 elsewhere)."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
        for p in pids:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0.0
    return total / 1024


def run_notebook(path: str | Path, timeout: int = 600, threads: int = 2) -> RunReport:
    """Execute `path` top to bottom in a fresh python3 kernel and save it with outputs.

    Args:
        path: the .ipynb file; it is overwritten with the executed version.
        timeout: seconds allowed per cell.
        threads: CPU threads for torch/BLAS in the kernel (OMP_NUM_THREADS etc.); 0 = leave as is.
    Returns:
        `RunReport` with wall seconds and peak kernel RSS.
    Raises:
        nbclient.exceptions.CellExecutionError: when a cell fails (the notebook is not written).
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "DEEPSEEK_EDU_THREADS"):
            env[var] = str(threads)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                            store_widget_state=True, record_timing=False)
    peak = [0.0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            km = client.km
            if km is not None and getattr(km, "provisioner", None) is not None:
                pid = getattr(km.provisioner, "pid", None) or getattr(getattr(km.provisioner, "process", None), "pid", None)
                if pid:
                    peak[0] = max(peak[0], _rss_mb(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.perf_counter()
    watcher.start()
    try:
        client.execute(env=env)
    finally:
        stop.set()
        watcher.join()
    seconds = time.perf_counter() - start
    nb.metadata["kernelspec"] = installed_kernelspec("python3")
    if "widgets" in nb.metadata and not _has_widget_state(nb):
        del nb.metadata["widgets"]  # metadata without its state makes GitHub refuse to render
    nbformat.write(nb, path)
    return RunReport(path, seconds, peak[0], path.stat().st_size / 1024)


def installed_kernelspec(name: str = "python3") -> dict[str, str]:
    """The notebook metadata of kernel `name` exactly as the installed kernel spec reports it.

    `python -m ipykernel install` (and the kernel ipykernel ships) name python3 "Python 3 (ipykernel)";
    a notebook whose metadata says otherwise is marked modified by JupyterLab as soon as it opens.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(name)
    return {"display_name": spec.display_name, "language": spec.language, "name": name}


def _has_widget_state(nb) -> bool:
    widgets = nb.metadata.get("widgets", {})
    state = widgets.get("application/vnd.jupyter.widget-state+json", {})
    return bool(state.get("state"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs="*", help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in the kernel (0 = unchanged)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths] or sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        print("no notebooks found")
        return 1
    for path in paths:
        report = run_notebook(path, timeout=args.timeout, threads=args.threads)
        print(f"{report.path.name}: {report.seconds:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB, "
              f"{report.size_kb:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
