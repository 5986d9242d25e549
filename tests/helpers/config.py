"""Hydra config composition as the recipes see it, with paths pinned to test folders."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
