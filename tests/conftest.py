"""Shared pytest fixtures: the CPU default, the ``gpu`` marker's clean skip, and the shared real datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.testing import fresh_seed, use_interpreter

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests cleanly when CUDA is absent, with the reason in the report."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that use it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (or ``SAMTUNE_TEST_SEED``), printed so that ``-rA`` and failures show it."""
    return fresh_seed()


@pytest.fixture
def interpret(monkeypatch) -> None:
    """Run Triton kernels on CPU through Triton's interpreter for this test only (see kernels/_lazy.py)."""
    use_interpreter(monkeypatch)
