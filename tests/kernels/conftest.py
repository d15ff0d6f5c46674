"""Fixtures of the kernel tests (helpers that modules import: tests/aot_run.py)."""

import os

import pytest


@pytest.fixture
def seed():
    """A fresh torch seed per test (fresh random inputs each run); tests put it in failure messages."""
    import torch

    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
