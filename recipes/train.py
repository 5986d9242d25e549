"""Train with Hydra: ``python recipes/train.py trainer.max_epochs=5 callbacks=none``.

``python recipes/train.py hydra.run.dir=<dir> ckpt_path=last`` (or ``LH_RUN_ID=<id> ... ckpt_path=last``) resumes
the run with its own overrides.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lightning_hessian import recipes
from lightning_hessian.cli import resume_argv, run_recipe


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_recipe(recipes.train, cfg)


if __name__ == "__main__":
    sys.argv = resume_argv(sys.argv, config_dir=str(Path(__file__).resolve().parents[1] / "conf"))
    main()
