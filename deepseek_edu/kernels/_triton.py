"""Optional Triton: import it if it is there, say clearly what to use instead if it is not.

`import deepseek_edu.kernels` must work on a machine without Triton (a laptop, CI on macOS): the
kernel modules import `triton` and `tl` from here; without Triton `jit` leaves the function as plain
Python (never called) and `tl.constexpr` is a placeholder, so the modules still import, and every
launcher calls `require_triton(fallback)` first, which raises one `TritonUnavailableError` naming
the plain-PyTorch function that computes the same thing.

**CPU machines.** Triton's interpreter (`TRITON_INTERPRET=1`) runs kernels on CPU tensors, one
program at a time in NumPy. The variable is read when `triton.language` is imported (its own
`tl.max`, `tl.sum`... are `@triton.jit` functions), so it must be set before *anything* imports
Triton. On a machine without CUDA we set it here, before our first import of Triton; if Triton was
already imported without it, `check_device` says so.
"""

import os
import sys

import torch


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was called but Triton cannot run here (not installed, or no interpreter)."""


if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU only: the interpreter is the one way to run

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # the package still imports; launchers raise TritonUnavailableError
    triton = None
    HAS_TRITON = False

    class tl:
        constexpr = "constexpr"

    def jit(fn):
        return fn


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def require_triton(fallback: str) -> None:
    """Raise TritonUnavailableError naming `fallback` if Triton is not installed."""
    if not HAS_TRITON:
        raise TritonUnavailableError(
            f"Triton is not installed, so this kernel cannot run; use {fallback} (plain PyTorch, "
            "same result) or `pip install triton`.")


def check_device(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and a device Triton can run on here.

    Raises:
        ValueError: if the tensors are on different devices.
        TritonUnavailableError: CPU tensors without the interpreter (CUDA tensors under the
            interpreter run, copied to the host: correct but slow).
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise TritonUnavailableError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first imported "
            "(deepseek_edu.kernels does so itself on a machine without CUDA if it imports Triton first)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on cuda (or cpu under the interpreter), got {device}")


def check_contiguous(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first non-contiguous tensor (kernels index with row-major strides)."""
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()} "
                             f"for shape {tuple(t.shape)}; call .contiguous() first")
