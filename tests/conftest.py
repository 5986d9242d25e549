"""Shared fixtures: every test in its own directory, one cached MNIST-1D copy per test session (the shared helpers
live in ``tests/helpers``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each, so parallel ranks never oversubscribe

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary directory, so nothing a Trainer writes lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide data dir, so MNIST-1D is generated once per test run."""
    return tmp_path_factory.mktemp("data")
