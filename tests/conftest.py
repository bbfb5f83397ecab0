"""Shared pytest setup for the unit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two on a busy 2-core machine
    (no spin-waiting) and gives the same results; the thread count is restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
