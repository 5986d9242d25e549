"""Console scripts ``lh-train``, ``lh-analyze``, ``lh-quantize``: the recipes over the packaged config.

The config ships inside the wheel as ``lightning_hessian.conf``, so the commands work from any directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_hessian import recipes

CONFIG_PATH = "pkg://lightning_hessian.conf"


def run_recipe(recipe: Callable[[DictConfig], Any], cfg: DictConfig) -> float | None:
    """Run ``recipe(cfg)``; a ``ConfigError`` ends the process with one line on stderr, exit code 2.

    Returns the metric named by ``optimized_metric`` (set by ``hparams_search`` presets) for sweepers
    that optimise the value the task returns, else None.
    """
    try:
        result = recipe(cfg)
    except recipes.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    if metric not in result:
        print(f"error: optimized_metric: {metric!r} was not logged; logged: {sorted(result)}", file=sys.stderr)
        sys.exit(2)
    return float(result[metric])


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train(cfg: DictConfig) -> float | None:
    return run_recipe(recipes.train, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="analyze")
def analyze(cfg: DictConfig) -> None:
    run_recipe(recipes.analyze, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="quantize")
def quantize(cfg: DictConfig) -> None:
    run_recipe(recipes.quantize, cfg)
