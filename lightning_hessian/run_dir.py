"""A run directory belongs to one run: find an earlier run in it, move that run aside, save this run's config.

Hydra would save a run's config (``.hydra/``) before the recipe starts, over an earlier run's and even for a
resume that then fails on a bad override. ``conf/hydra/default.yaml`` turns that off (``output_subdir: null``)
and the recipes call ``save_run_config`` once the run has passed its checks and starts.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

HYDRA_SUBDIR = ".hydra"


def earlier_run(output_dir: str | os.PathLike) -> Path | None:
    """The file that shows that a run already used ``output_dir``: its saved config, metrics or a checkpoint."""
    out = Path(output_dir)
    markers = [out / HYDRA_SUBDIR / "config.yaml", out / "csv" / "metrics.csv", *sorted(out.glob("checkpoints/*.ckpt"))]
    return next((marker for marker in markers if marker.is_file()), None)


def _open_log_files() -> set[Path]:
    """Files this process's ``logging`` handlers hold open (Hydra's ``<job name>.log`` in the run directory)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return {Path(handler.baseFilename).resolve() for logger in loggers for handler in getattr(logger, "handlers", [])
            if isinstance(handler, logging.FileHandler)}


def set_aside_earlier_run(output_dir: str | os.PathLike) -> Path:
    """Move everything in ``output_dir`` to a new sibling ``<name>.earlier-<time>``; return it.

    A log file this process already writes to (Hydra opens ``<job name>.log`` before the recipe runs) is copied
    there and emptied in place, so its handler goes on writing this run's lines into the run directory.
    """
    out = Path(output_dir)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    aside = out.with_name(f"{out.name}.earlier-{stamp}")
    suffix = 1
    while aside.exists():
        aside, suffix = out.with_name(f"{out.name}.earlier-{stamp}-{suffix}"), suffix + 1
    aside.mkdir()
    open_logs = _open_log_files()
    for entry in sorted(out.iterdir()):
        if entry.resolve() in open_logs:
            (aside / entry.name).write_bytes(entry.read_bytes())
            os.truncate(entry, 0)
        else:
            entry.rename(aside / entry.name)
    return aside


def save_run_config(output_dir: str | os.PathLike, config_yaml: str) -> None:
    """Write ``.hydra/config.yaml`` (``config_yaml``, the task config as the recipe received it), ``hydra.yaml``
    and ``overrides.yaml``, as Hydra writes them (without Hydra, ``config.yaml`` alone)."""
    folder = Path(output_dir) / HYDRA_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": config_yaml}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.instance().cfg
        files["hydra.yaml"] = OmegaConf.to_yaml(hydra_cfg)
        files["overrides.yaml"] = OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)
    for name, text in files.items():
        (folder / name).write_text(text)
