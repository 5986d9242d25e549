"""Shared fixtures: one cached MNIST-1D copy per test session, Hydra config composition."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each, so parallel ranks never oversubscribe

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

torch.set_num_threads(1)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary directory, so nothing a Trainer writes lands in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide data dir, so MNIST-1D is generated once per test run."""
    return tmp_path_factory.mktemp("data")


def compose_config(config_name: str, overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as Hydra would, with paths pinned to test folders."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    return cfg


def fit_full_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2):
    """``steps`` Adam steps of cross-entropy on one batch (a model near a minimum, where the Hessian blocks are
    positive semi-definite), gradients cleared after."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model
