"""Hessian report of a trained run: ``python recipes/analyze.py run_dir=logs/train/runs/<run>``."""

import hydra
from omegaconf import DictConfig

from lightning_hessian import recipes
from lightning_hessian.cli import run_recipe


@hydra.main(version_base="1.3", config_path="../conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    run_recipe(recipes.analyze, cfg)


if __name__ == "__main__":
    main()
