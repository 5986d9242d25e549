"""Train with Hydra: ``python recipes/train.py trainer.max_epochs=5 callbacks=none``."""

import hydra
from omegaconf import DictConfig

from lightning_hessian import recipes
from lightning_hessian.cli import run_recipe


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_recipe(recipes.train, cfg)


if __name__ == "__main__":
    main()
