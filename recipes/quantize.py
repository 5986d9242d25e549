"""HAWQ mixed-precision quantization of a trained run: ``python recipes/quantize.py run_dir=logs/train/runs/<run>``."""

import hydra
from omegaconf import DictConfig

from lightning_hessian import recipes
from lightning_hessian.cli import run_recipe


@hydra.main(version_base="1.3", config_path="../conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    run_recipe(recipes.quantize, cfg)


if __name__ == "__main__":
    main()
