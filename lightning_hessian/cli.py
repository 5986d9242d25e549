"""Console scripts ``lh-train``, ``lh-analyze``, ``lh-quantize``: the recipes over the packaged config.

The config ships inside the wheel as ``lightning_hessian.conf``, so the commands work from any directory.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

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


def resume_argv(argv: list[str]) -> list[str]:
    """``hydra.run.dir=<dir> ckpt_path=last``: ``argv`` with the run's own overrides put before the new ones.

    The resumed run then composes the config it was trained with (``<dir>/.hydra/overrides.yaml``) and the
    overrides given now on top, instead of the default config, which need not fit its checkpoint.
    """
    given = [arg for arg in argv[1:] if "=" in arg and not arg.startswith("-")]
    parser = OverridesParser.create()
    try:
        values = {o.key_or_group: o.value() for o in parser.parse_overrides(given) if not o.is_delete()}
    except OverrideParseException:  # Hydra reports it, with the override's position
        return argv
    if values.get("ckpt_path") != "last" or "hydra.run.dir" not in values or {"-m", "--multirun"} & set(argv):
        return argv
    saved = Path(str(values["hydra.run.dir"])) / ".hydra" / "overrides.yaml"
    if not saved.exists():
        warnings.warn(f"ckpt_path=last: no {saved}, so the run's own overrides are not restored (the config is "
                      "composed from the command line alone)", stacklevel=2)
        return argv
    earlier = list(OmegaConf.load(saved))
    # a new override of the same key wins by coming later; only a second `+key=` (adding a key twice) clashes
    added = {(o.key_or_group, o.package) for o in parser.parse_overrides(given) if o.is_add()}
    kept = [arg for arg, o in zip(earlier, parser.parse_overrides(earlier)) if (o.key_or_group, o.package) not in added]
    # a sweep job's preset (experiment=absa_table) sets hydra.mode=MULTIRUN: resume this one job as a run
    return [argv[0], *kept, "hydra.mode=RUN", *argv[1:]]


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    return run_recipe(recipes.train, cfg)


def train() -> None:
    """``lh-train``; ``hydra.run.dir=<dir> ckpt_path=last`` resumes with the run's own config (``resume_argv``)."""
    sys.argv = resume_argv(sys.argv)
    _train()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="analyze")
def analyze(cfg: DictConfig) -> None:
    run_recipe(recipes.analyze, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="quantize")
def quantize(cfg: DictConfig) -> None:
    run_recipe(recipes.quantize, cfg)
