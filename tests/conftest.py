"""Shared pytest setup for the unit tests."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when triton.language is first imported (torch.compile in other test
# modules may import it before tests/test_kernels.py runs): without CUDA, kernels can only run in the
# CPU interpreter, so set it before any test module is collected. No effect when triton is absent.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two on a busy 2-core machine
    (no spin-waiting) and gives the same results; the thread count is restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
