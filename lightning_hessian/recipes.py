"""What the Hydra recipes run: ``train(cfg)`` (``analyze`` and ``quantize`` join it as they land).

Each recipe instantiates its parts from the composed config group by group, so a bad value is reported as
one line naming the config key (``ConfigError``) instead of a deep traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _instantiate(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _instantiate_group(cfg: DictConfig, key: str) -> list[Any]:
    """Instantiate every entry of a keyed group (``callbacks``, ``logger``); null entries are skipped."""
    group = OmegaConf.select(cfg, key) or {}
    return [_instantiate(cfg, f"{key}.{name}") for name, node in group.items() if node is not None]


def _resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    if ckpt_path != "last":
        return ckpt_path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured module on the configured data; return the logged metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg, "data")
    module = _instantiate(cfg, "model")
    callbacks = _instantiate_group(cfg, "callbacks")
    loggers = _instantiate_group(cfg, "logger")
    trainer: pl.Trainer = _instantiate(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    metrics: dict[str, float] = {}
    if cfg.train:
        try:
            ckpt_path = _resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"fit: {err}") from err
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
    if trainer.is_global_zero:
        print(f"outputs: {cfg.paths.output_dir}")
        for key in sorted(metrics):
            print(f"  {key}: {metrics[key]:.4f}")
    return metrics
