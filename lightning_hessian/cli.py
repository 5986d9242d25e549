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
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from lightning_hessian import recipes

CONFIG_PATH = "pkg://lightning_hessian.conf"


def run_recipe(recipe: Callable[[DictConfig], Any], cfg: DictConfig) -> float | None:
    """Run ``recipe(cfg)``; a ``RecipeError`` ends the process with one line on stderr, exit code 2 for a
    ``ConfigError`` (a value or file to change), 1 for the others (a non-finite loss).

    Returns the metric named by ``optimized_metric`` (set by ``hparams_search`` presets) for sweepers
    that optimise the value the task returns, else None.
    """
    try:
        result = recipe(cfg)
    except recipes.RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, recipes.ConfigError) else 1)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    if metric not in result:
        print(f"error: optimized_metric: {metric!r} was not logged; logged: {sorted(result)}", file=sys.stderr)
        sys.exit(2)
    return float(result[metric])


def _run_dir(given: list[str], config_dir: str | None, config_name: str) -> Path | None:
    """The ``hydra.run.dir`` that Hydra will give a run with the overrides ``given`` (None if they do not compose:
    Hydra then reports why)."""
    if config_dir is None:
        context = initialize_config_module("lightning_hessian.conf", version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=str(Path(config_dir).absolute()), version_base="1.3")
    try:
        with context:
            cfg = compose(config_name=config_name, overrides=given, return_hydra_config=True)
            return Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    except Exception:  # noqa: BLE001 - any composition error is Hydra's to report, with its own message
        return None


def resume_argv(argv: list[str], config_dir: str | None = None, config_name: str = "train") -> list[str]:
    """``ckpt_path=last``: ``argv`` with the run's own overrides put before the new ones.

    The resumed run then composes the config it was trained with (``<run dir>/.hydra/overrides.yaml``) and the
    overrides given now on top, instead of the default config, which need not fit its checkpoint. The run
    directory is ``hydra.run.dir`` if given, else the one Hydra will choose (``LH_RUN_ID``, the SLURM job id,
    torchrun's ``--rdzv-id``), composed from ``config_dir`` (default: the packaged config). An unreadable
    ``overrides.yaml`` ends the process with one line on stderr (exit code 2).
    """
    given = [arg for arg in argv[1:] if "=" in arg and not arg.startswith("-")]
    parser = OverridesParser.create()
    try:
        values = {o.key_or_group: o.value() for o in parser.parse_overrides(given) if not o.is_delete()}
    except OverrideParseException:  # Hydra reports it, with the override's position
        return argv
    if values.get("ckpt_path") != "last" or {"-m", "--multirun"} & set(argv):
        return argv
    if "hydra.run.dir" in values:
        run_dir: Path | None = Path(str(values["hydra.run.dir"]))
    else:
        run_dir = _run_dir(given, config_dir, config_name)
    if run_dir is None or not run_dir.is_dir():  # a first start: nothing to restore
        return argv
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.exists():
        warnings.warn(f"ckpt_path=last: no {saved}, so the run's own overrides are not restored (the config is "
                      "composed from the command line alone)", stacklevel=2)
        return argv
    try:
        earlier = [str(arg) for arg in OmegaConf.load(saved)]
        parsed = parser.parse_overrides(earlier)
    except Exception as err:  # noqa: BLE001 - YAML, not a list, not overrides: the file is not usable
        print(f"error: ckpt_path=last: {saved} is not a readable list of overrides ({type(err).__name__}); repair it, "
              "or resume with the run's overrides given on the command line and the file moved away", file=sys.stderr)
        sys.exit(2)
    # a new override of the same key wins by coming later; only a second `+key=` (adding a key twice) clashes
    added = {(o.key_or_group, o.package) for o in parser.parse_overrides(given) if o.is_add()}
    kept = [arg for arg, o in zip(earlier, parsed) if (o.key_or_group, o.package) not in added]
    # a sweep job's preset (experiment=absa_table) sets hydra.mode=MULTIRUN: resume this one job as a run
    return [argv[0], *kept, "hydra.mode=RUN", *argv[1:]]


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    return run_recipe(recipes.train, cfg)


def train() -> None:
    """``lh-train``; ``ckpt_path=last`` resumes with the run's own config (``resume_argv``)."""
    sys.argv = resume_argv(sys.argv)
    _train()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="analyze")
def analyze(cfg: DictConfig) -> None:
    run_recipe(recipes.analyze, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="quantize")
def quantize(cfg: DictConfig) -> None:
    run_recipe(recipes.quantize, cfg)
