"""Console scripts (``lh-train``, ...): the recipes over the config packaged as ``lightning_hessian.conf``."""

from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from lightning_hessian import recipes

CONFIG_PATH = "pkg://lightning_hessian.conf"


def run_recipe(recipe: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Run ``recipe(cfg)``; a ``ConfigError`` ends the process with one line on stderr, exit code 2."""
    try:
        recipe(cfg)
    except recipes.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> None:
    run_recipe(recipes.train, cfg)
