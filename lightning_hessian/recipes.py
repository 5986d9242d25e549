"""What the Hydra recipes run: ``train(cfg)``, ``analyze(cfg)`` and ``quantize(cfg)``.

Each recipe instantiates its parts from the composed config group by group, so a bad value is reported as
one line naming the config key (``ConfigError``) instead of a deep traceback, and checks what it can (its run
directory, its checkpoint, where it will write) before any compute. A run directory belongs to one run: a
fresh run into one that holds an earlier run is refused (``run_dir``). Importing this module registers the
resolvers of ``conf/hydra/default.yaml`` and ``conf/paths/default.yaml``: ``lh_run_id`` names run
directories, ``lh_root`` is where data and logs live.
"""

from __future__ import annotations

import csv
import json
import math
import os
import traceback
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.multiprocessing import ProcessRaisedException

from lightning_hessian.checkpoint_io import CheckpointError, checksum_path, read_checkpoint
from lightning_hessian.run_dir import earlier_run, save_run_config, set_aside_earlier_run


class RecipeError(Exception):
    """A recipe stopped for a reason that one line says (the console scripts print it, without a traceback)."""


class ConfigError(RecipeError, ValueError):
    """A config value or input file that cannot work; the message names the key and the fix."""


class NonFiniteLossError(RecipeError, ArithmeticError):
    """The training loss became NaN or infinite; the message names the step."""


# what a fit raises for a value it was configured with (Lightning's own checks raise MisconfigurationException);
# not TypeError, which is more often a bug in a training step, whose traceback the user needs
_CONFIG_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)


def run_id() -> str:
    """The name of this run's directory, the same on every rank of a torchrun or srun launch.

    ``LH_RUN_ID`` if set; else ``slurm-<job id>`` (``_<array task>`` for arrays), so a preempted and
    requeued job finds its own ``last.ckpt``; else ``torchrun-<rdzv id>``; else the start time. A
    multi-node torchrun without ``--rdzv-id`` (id ``none``) is refused: each node would pick its own time.
    """
    env = os.environ
    if env.get("LH_RUN_ID"):
        return env["LH_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        if env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm-{env['SLURM_JOB_ID']}"
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    if rdzv == "none" and int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "torchrun over several nodes without --rdzv-id: every node would choose its own run directory; "
            "pass the same --rdzv-id=<name> to every node (or set LH_RUN_ID)"
        )
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


# cached per config, so Hydra's sweep jobs (which copy the launcher's cache) reuse the launcher's name
OmegaConf.register_new_resolver("lh_run_id", run_id, use_cache=True, replace=True)
def root_dir() -> str:
    """``LH_ROOT``, else the directory the app was started from (Hydra's ``runtime.cwd`` once it is set, so
    ``hydra.job.chdir=true`` does not move the data into the run; the process's cwd before, e.g. in a sweep)."""
    if os.environ.get("LH_ROOT"):
        return os.environ["LH_ROOT"]
    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


# unlike ${hydra:runtime.cwd}, it resolves before HydraConfig is set (the sweeper resolves hydra.sweep.dir then)
OmegaConf.register_new_resolver("lh_root", root_dir, replace=True)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        try:  # keep its rows; a new key rewrites the header only
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])
        except (csv.Error, UnicodeDecodeError) as err:
            kept = _unused_name(Path(self.metrics_file_path), "unreadable")
            os.replace(self.metrics_file_path, kept)
            rank_zero_warn(f"{self.metrics_file_path} is not a readable CSV file ({err}): kept as {kept.name}, and "
                           "this run starts a new one")


def _unused_name(path: Path, tag: str) -> Path:
    """``<stem>.<tag>-<time><suffix>`` beside ``path``, a name no file has yet."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    candidate, n = path.with_name(f"{path.stem}.{tag}-{stamp}{path.suffix}"), 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}.{tag}-{stamp}-{n}{path.suffix}"), n + 1
    return candidate


class CSVLogger(pl.loggers.CSVLogger):
    """Lightning's ``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it.

    A resumed run logs into its old directory, and ``trainer.test`` after a ``ddp_spawn`` fit starts a new
    writer in a new process: both keep the rows logged before (``conf/logger/csv.yaml``). A resumed run first
    drops the rows logged after its checkpoint's step (``drop_rows_after``), which it logs again.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def drop_rows_after(self, step: int) -> None:
        """Remove the rows of ``metrics.csv`` logged after ``step``: a run killed after its last checkpoint wrote
        them, and the resumed run replays those steps."""
        self._rewrite(lambda header, rows: [row for row in rows if _row_step(header, row) <= step])

    @rank_zero_only
    def drop_replayed_values(self) -> None:
        """Keep only the newest value of each (step, metric) in ``metrics.csv``: a run resumed from a checkpoint
        logs again what its killed predecessor logged at the checkpoint's own step."""
        self.save()

        def newest(header: list[str], rows: list[list[str]]) -> list[list[str]]:
            seen: set[tuple[int, str]] = set()
            kept = []
            for row in reversed(rows):
                step = _row_step(header, row)
                row = [value if key in ("step", "epoch") or (step, key) not in seen else ""
                       for key, value in zip(header, row)]
                seen.update((step, key) for key, value in zip(header, row) if value and key not in ("step", "epoch"))
                if any(value for key, value in zip(header, row) if key not in ("step", "epoch")):
                    kept.append(row)
            return kept[::-1]

        self._rewrite(newest)

    def _rewrite(self, keep: Any) -> None:
        path = Path(self.experiment.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as file:
            header, *rows = list(csv.reader(file)) or [[]]
        if "step" not in header:
            return
        kept = keep(header, rows)
        if kept == rows:
            return
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "w", newline="") as file:
            csv.writer(file).writerows([header, *kept])  # the dialect ExperimentWriter writes
        os.replace(tmp, path)


def _row_step(header: list[str], row: list[str]) -> int:
    """The row's ``step`` (-1 where it has none: kept by every rewrite)."""
    value = row[header.index("step")] if len(row) > header.index("step") else ""
    return int(value) if value.isdigit() else -1


def _instantiate(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {cause}") from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _instantiate_group(cfg: DictConfig, key: str) -> dict[str, Any]:
    """Instantiate every entry of a keyed group (``callbacks``, ``logger``) by its key; null entries are skipped."""
    group = OmegaConf.select(cfg, key) or {}
    objects = {}
    for name, node in group.items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"{key}.{name}: has no _target_ (only some of its values are set); choose a {key} "
                              f"preset that defines it or remove it with ~{key}.{name}")
        objects[f"{key}.{name}"] = _instantiate(cfg, f"{key}.{name}")
    return objects


def _config_error(err: BaseException, objects: dict[str, Any], default: str) -> ConfigError:
    """``err`` as a ``ConfigError`` naming the config key of the innermost object (by key) whose method raised it."""
    owners = {id(obj): key for key, obj in objects.items()}
    key = default
    for frame, _ in traceback.walk_tb(err.__traceback__):
        key = owners.get(id(frame.f_locals.get("self")), key)
    return ConfigError(f"{key}: {str(err).strip()}")


_TRAINER_INTS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "num_nodes", "accumulate_grad_batches",
                 "log_every_n_steps", "check_val_every_n_epoch", "num_sanity_val_steps")


def _trainer(cfg: DictConfig, *extra: Callback) -> tuple[pl.Trainer, dict[str, Any]]:
    """The configured Trainer with the configured callbacks (returned by config key) and loggers, plus ``extra``
    and the recipes' stop on a non-finite loss."""
    for key in _TRAINER_INTS:  # the Trainer takes any value here and fails deep inside fit (a bare assertion)
        value = OmegaConf.select(cfg, f"trainer.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer.{key}: must be an integer, got {value!r}")
    callbacks = _instantiate_group(cfg, "callbacks")
    loggers = list(_instantiate_group(cfg, "logger").values())
    guards = [*extra, _StopOnNonFiniteLoss()]
    trainer = _instantiate(cfg, "trainer", callbacks=[*callbacks.values(), *guards], logger=loggers or False)
    _check_checkpoint_dirs(trainer, callbacks)
    return trainer, callbacks


class _StopOnNonFiniteLoss(Callback):
    """Stop training with ``NonFiniteLossError`` at the first step whose loss is NaN or infinite.

    Checked after every training batch, before any checkpoint of that step is saved, and decided over all ranks
    (a NaN on one rank reaches every rank's weights through the gradient all-reduce). Modules whose
    ``training_step`` returns no loss (manual optimization) are not checked.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach().float().mean())
        if trainer.strategy.reduce_boolean_decision(math.isfinite(value), all=True):
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step metrics.csv gives this batch
        what = value if not math.isfinite(value) else "not finite on another rank"
        raise NonFiniteLossError(f"train loss is {what} at step {step} (epoch {trainer.current_epoch}, batch "
                                 f"{batch_idx}): training stopped, and no checkpoint holds these weights; lower the "
                                 "learning rate or clip gradients (trainer.gradient_clip_val)")


class _RunRecord(Callback):
    """What a train run changes in its directory's record of it, once training starts (a run that fails at setup
    changes nothing): the run's config is saved (``.hydra/``); a resumed run drops the ``metrics.csv`` rows
    after its checkpoint's step, which it logs again, and when it ends, the values its predecessor logged
    twice."""

    def __init__(self, output_dir: str, config_yaml: str):
        self.output_dir, self.config_yaml = output_dir, config_yaml
        self.resumed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.resumed = step > 0
        if not trainer.is_global_zero:
            return
        if self.resumed:
            for logger in self._csv_loggers(trainer):
                logger.drop_rows_after(step)
        save_run_config(self.output_dir, self.config_yaml)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.resumed:
            for logger in self._csv_loggers(trainer):
                logger.drop_replayed_values()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @staticmethod
    def _csv_loggers(trainer: pl.Trainer) -> list[CSVLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]


def _config_yaml(cfg: DictConfig) -> str:
    """The task config as Hydra saves it, taken before a recipe adds to it; refuses ``hydra.output_subdir``."""
    if HydraConfig.initialized() and HydraConfig.get().output_subdir is not None:
        raise ConfigError("hydra.output_subdir: the recipes save a run's config themselves, into .hydra/ when the run "
                          "starts (Hydra would write it before the run's checks); leave it null")
    return OmegaConf.to_yaml(cfg)


def _check_checkpoint_dirs(trainer: pl.Trainer, callbacks: dict[str, Any]) -> None:
    """Refuse a checkpoint directory that cannot be written (Lightning would find out at the first save)."""
    keys = {id(obj): key for key, obj in callbacks.items()}
    for checkpoint in trainer.checkpoint_callbacks:
        dirpath = getattr(checkpoint, "dirpath", None)
        if dirpath is None or "://" in str(dirpath):  # set at setup from the logger; a remote store
            continue
        folder = Path(dirpath).absolute()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problem = "is not a directory" if not existing.is_dir() else "is not writable"
            key = keys.get(id(checkpoint), "callbacks")
            raise ConfigError(f"{key}.dirpath: cannot save checkpoints to {folder}: {existing} {problem}")


def _existing_ckpt(path: str | Path) -> Path:
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
    return Path(path)


def _check_ckpt(path: str | Path, key: str = "ckpt_path") -> Path:
    """``path`` if it is an intact checkpoint, else a ``ConfigError`` naming the file (read memory-mapped)."""
    path = _existing_ckpt(path)
    try:
        read_checkpoint(path, mmap=True)
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}; give an intact checkpoint (a run keeps epoch_NNN.ckpt beside last.ckpt)") \
            from err
    return path


def _newest_intact_ckpt(folder: Path) -> tuple[Path | None, list[str]]:
    """``folder/last.ckpt`` if intact, else the newest intact ``*.ckpt`` there; and what was wrong with the others."""
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    problems = []
    for path in [folder / "last.ckpt", *others]:
        if not path.is_file():
            problems.append(f"no {path}")
            continue
        try:
            read_checkpoint(path, mmap=True)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return path, problems
    return None, problems


def _resolve_last(folder: Path) -> Path | None:
    """``ckpt_path=last`` in train: the run's newest intact checkpoint, warning when it is not ``last.ckpt``."""
    found, problems = _newest_intact_ckpt(folder)
    if found is None:
        rank_zero_warn(f"ckpt_path=last: {'; '.join(problems[:3])}, so this run starts from scratch")
    elif problems:
        kept = " (it is kept as last.ckpt.damaged)" if (folder / "last.ckpt").is_file() else ""
        rank_zero_warn(f"ckpt_path=last: {problems[0]}{kept}; resuming from {found}, the newest intact checkpoint "
                       "of the run")
    return found


def _resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return str(_check_ckpt(ckpt_path))
    found = _resolve_last(Path(output_dir) / "checkpoints")
    return None if found is None else str(found)


def _directory_key() -> str:
    """The setting that chose this run's directory."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "hydra.sweep.dir"
    return "hydra.run.dir"


def _refuse_earlier_run(output_dir: str, resume_hint: bool) -> None:
    """A run directory belongs to one run: raise if ``output_dir`` holds an earlier one."""
    marker = earlier_run(output_dir)
    if marker is None:
        return
    how = "resume it with ckpt_path=last, or start this run elsewhere" if resume_hint else "start this run elsewhere"
    raise ConfigError(f"{_directory_key()}: {output_dir} holds an earlier run ({marker.relative_to(output_dir)}); "
                      f"{how} (another LH_RUN_ID or {_directory_key()}=...)")


def _claim_for_training(cfg: DictConfig, resumed_from: str | None) -> bool:
    """Whether the earlier run in the directory must be moved aside first (``ckpt_path=last`` with nothing intact
    to resume); a fresh run into a used directory is refused; a resume from the directory's checkpoint continues
    its run."""
    out = Path(cfg.paths.output_dir).absolute()
    if resumed_from is not None and out in Path(resumed_from).absolute().parents:
        return False
    if cfg.ckpt_path == "last" and earlier_run(out) is not None:
        return True
    _refuse_earlier_run(str(out), resume_hint=True)
    return False


def _set_aside(output_dir: str) -> None:
    if rank_zero_only.rank == 0:  # the other ranks find the directory as rank 0 leaves it, or as it was: fresh
        aside = set_aside_earlier_run(output_dir)
        rank_zero_warn(f"ckpt_path=last: nothing to resume in {output_dir}; its earlier run was moved to {aside.name}")


def _keep_damaged_last(output_dir: str, resumed_from: str) -> None:
    """Rename a damaged ``last.ckpt`` (and its checksum file) to ``last.ckpt.damaged`` before the run replaces it."""
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if Path(resumed_from) == last or not last.is_file() or rank_zero_only.rank != 0:
        return
    try:
        read_checkpoint(last, mmap=True)
        return  # intact: replaced like any resumed run's
    except CheckpointError:
        pass
    for path in (last, Path(checksum_path(last))):
        if path.is_file():
            path.rename(path.with_name(path.name.replace("last.ckpt", "last.ckpt.damaged")))


def _warn_restored_scheduler(cfg: DictConfig, ckpt_path: str) -> None:
    """Lightning restores the LR scheduler's state from the checkpoint over the config's values: say so."""
    saved = read_checkpoint(ckpt_path, mmap=True).get("lr_schedulers") or [{}]
    configured = OmegaConf.to_container(cfg.model.scheduler, resolve=True) if cfg.model.get("scheduler") else {}
    for key, value in configured.items():
        if not isinstance(value, (list, dict)) and key in saved[0] and saved[0][key] != value:
            rank_zero_warn(f"model.scheduler.{key}: the resumed run keeps the checkpoint's {key}={saved[0][key]}, "
                           f"not the configured {value} (a longer trainer.max_epochs does not stretch the schedule); "
                           "to change the schedule, start a new run from the checkpoint's weights")


def _seed(cfg: DictConfig) -> None:
    try:
        pl.seed_everything(cfg.seed, workers=True)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"seed: {err}") from err


def _hpc_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint Lightning's SLURM support resumes a requeued job from when no ckpt_path is given (its own
    lookup in the trainer's ``default_root_dir``, made before any Trainer exists)."""
    if not SLURMEnvironment.detect():
        return None
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    path = _CheckpointConnector(SimpleNamespace(default_root_dir=os.path.normpath(root)))._hpc_resume_path
    return None if path is None else str(_check_ckpt(path, key="SLURM requeue"))


def _rank_error(err: ProcessRaisedException) -> RecipeError | None:
    """A ``RecipeError`` raised in a forked or spawned rank, which reaches the main process as a traceback text."""
    last = str(err).strip().splitlines()[-1]
    for cls in (ConfigError, NonFiniteLossError):
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if last.startswith(prefix):
            return cls(last[len(prefix):])
    return None


def _fit_or_test(run: Any, objects: dict[str, Any], default_key: str) -> Any:
    """``run()`` (a fit or test): a value it was configured with becomes a ``ConfigError`` naming its key."""
    try:
        return run()
    except RecipeError:
        raise
    except ProcessRaisedException as err:
        rank_error = _rank_error(err)
        if rank_error is None:
            raise
        raise rank_error from err
    except _CONFIG_ERRORS as err:
        raise _config_error(err, objects, default_key) from err


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured module on the configured data; return the logged metrics."""
    config_yaml = _config_yaml(cfg)
    out = cfg.paths.output_dir
    ckpt_path = _resolve_ckpt_path(cfg.ckpt_path, out)
    set_aside = False
    hpc = _hpc_checkpoint(cfg)  # a requeued SLURM job resumes from it, and Lightning would test it
    resumed_from = ckpt_path or hpc
    if cfg.train:
        set_aside = _claim_for_training(cfg, resumed_from)
    else:
        _refuse_earlier_run(out, resume_hint=False)
        if cfg.test and ckpt_path is None:
            raise ConfigError("ckpt_path: train=false tests a checkpoint, and none was given; give ckpt_path=<file> "
                              "(the module's initial weights would be tested)")
    _seed(cfg)
    datamodule = _instantiate(cfg, "data")
    module = _instantiate(cfg, "model")
    trainer, callbacks = _trainer(cfg, _RunRecord(out, config_yaml))
    metrics: dict[str, float] = {}
    objects = {"data": datamodule, "model": module, **callbacks}
    if cfg.train:
        if set_aside:
            _set_aside(out)
        if resumed_from:
            _warn_restored_scheduler(cfg, resumed_from)
            _keep_damaged_last(out, resumed_from)
        _fit_or_test(lambda: trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path), objects, "trainer")
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    elif cfg.test:
        save_run_config(out, config_yaml)
    if cfg.test:
        # the final weights (or with train=false, ckpt_path's): with MNIST-1D's default val_size=0 the validation
        # split is the test split, so testing a checkpoint selected on it would report a selected accuracy
        test_ckpt = None if cfg.train else ckpt_path
        if cfg.train and test_ckpt is None and hpc:  # test the weights just trained, not that checkpoint
            test_ckpt = str(Path(out) / "checkpoints" / "final.ckpt")
            trainer.save_checkpoint(test_ckpt)
        results = _fit_or_test(lambda: trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False),
                               objects, "trainer")
        metrics.update({k: float(v) for k, v in results[0].items()})
    if trainer.is_global_zero:
        print(f"outputs: {out}")
        for key in sorted(metrics):
            print(f"  {key}: {metrics[key]:.4f}")
    return metrics


# ---- analyze and quantize: a trained checkpoint and the data it was trained on ---------------------------


def _use_run_config(cfg: DictConfig) -> None:
    """Put the ``run_dir`` run's model and data configs into ``cfg``, as that run resolved them (its data
    location), with this command line's ``model.*`` / ``data.*`` overrides on top."""
    hydra_dir = Path(cfg.run_dir) / ".hydra"
    if not (hydra_dir / "config.yaml").exists():
        raise ConfigError(f"run_dir: {hydra_dir / 'config.yaml'} not found; point run_dir at a train run's output "
                          "directory")
    try:
        trained = OmegaConf.load(hydra_dir / "config.yaml")
        runtime = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime
        runtime.output_dir, runtime.cwd  # noqa: B018 - values every run saves: a check that these are a run's
    except Exception as err:  # noqa: BLE001 - YAML, missing file or key: the run's saved config is not usable
        raise ConfigError(f"run_dir: {hydra_dir} does not hold a readable run config ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); point run_dir at a "
                          "train run's output directory, or give ckpt_path= and the model and data config") from err
    with open_dict(trained):  # its paths as they resolved when it ran, not in this process
        trained.paths.output_dir = runtime.output_dir
        if OmegaConf.is_interpolation(trained.paths, "root_dir"):
            trained.paths.root_dir = os.environ.get("LH_ROOT") or runtime.cwd
    run = OmegaConf.create({key: OmegaConf.to_container(trained[key], resolve=True) for key in ("model", "data")})
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in OverridesParser.create().parse_overrides(list(given)):
        key = override.key_or_group
        if key in ("model", "data"):
            raise ConfigError(f"{key}: with run_dir the {key} config is the run's; change its values "
                              f"({key}.<name>=...) or give ckpt_path= without run_dir")
        if not key.startswith(("model.", "data.")):
            continue
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            OmegaConf.select(run, parent).pop(leaf, None)
        else:
            OmegaConf.update(run, key, OmegaConf.select(cfg, key), force_add=True)
    with open_dict(cfg):
        cfg.model, cfg.data = run.model, run.data


def _trained_model(cfg: DictConfig, stage: str | None = "fit"
                   ) -> tuple[pl.LightningModule, pl.LightningDataModule | None, Path]:
    """The configured module with the checkpoint's weights, and the datamodule set up for ``stage`` (``None``: no
    datamodule at all, for data-free quantization).

    With ``run_dir`` (a train run's output directory) the model and data configs are the run's own
    (``_use_run_config``) and ``ckpt_path`` defaults to its ``checkpoints/last.ckpt``.
    """
    if cfg.run_dir is not None:
        _use_run_config(cfg)
    if cfg.ckpt_path in (None, "last"):
        if cfg.run_dir is None:
            raise ConfigError("ckpt_path: give a checkpoint (ckpt_path=path/to.ckpt) or a train run (run_dir=...)")
        ckpt, problems = _newest_intact_ckpt(Path(cfg.run_dir) / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"run_dir: no intact checkpoint ({'; '.join(problems[:3])}); give ckpt_path=<file>")
        if problems:
            rank_zero_warn(f"ckpt_path=last: {problems[0]}; using {ckpt}, the newest intact checkpoint of the run")
    else:
        ckpt = _check_ckpt(cfg.ckpt_path)
    datamodule = _instantiate(cfg, "data") if stage is not None else None
    module = _instantiate(cfg, "model")
    state = read_checkpoint(ckpt)
    try:
        module.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise ConfigError(f"ckpt_path: {ckpt} does not hold weights for the configured model ({err})") from err
    if datamodule is None:
        return module, None, ckpt
    try:
        datamodule.prepare_data()
        datamodule.setup(stage)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data: {err}") from err
    return module, datamodule, ckpt


def _probe_set(cfg: DictConfig, datamodule: pl.LightningDataModule) -> list[Any]:
    """``probe.probe_size`` samples of ``probe.split`` drawn with ``probe.seed``, as the callbacks draw them."""
    from lightning_hessian.callbacks.probe import draw_probe_indices, probe_batches
    from lightning_hessian.checks import check_positive_int

    probe = cfg.probe
    if probe.split not in ("train", "test"):
        raise ConfigError(f"probe.split: must be 'train' or 'test', got {probe.split!r}")
    if probe.split == "test":
        datamodule.setup("test")
    loader = datamodule.train_dataloader() if probe.split == "train" else datamodule.test_dataloader()
    try:  # the settings only: an error while loading the samples is the data's, not the config's
        indices = draw_probe_indices(len(loader.dataset), probe.probe_size, probe.seed)
        check_positive_int(probe.probe_batch_size, "probe_batch_size")
    except ValueError as err:
        raise ConfigError(f"probe: {err}") from err
    return probe_batches(loader.dataset, indices, probe.probe_batch_size, loader.collate_fn, seed=probe.seed)


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """The Hessian report of a trained checkpoint (``lightning_hessian.analyze``); return the report."""
    from lightning_hessian.analyze import AnalysisOptions, analyze_model
    from lightning_hessian.callbacks.probe import resolve_loss_fn

    try:
        options = AnalysisOptions(**OmegaConf.to_container(cfg.analysis, resolve=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"analysis: {err}") from err
    config_yaml = _config_yaml(cfg)
    _refuse_earlier_run(cfg.paths.output_dir, resume_hint=False)
    device = _analysis_device(cfg)
    _seed(cfg)
    module, datamodule, ckpt = _trained_model(cfg)
    batches = _probe_set(cfg, datamodule)
    module.to(device)
    save_run_config(cfg.paths.output_dir, config_yaml)
    meta = {"checkpoint": str(ckpt), "probe": OmegaConf.to_container(cfg.probe, resolve=True)}
    report = analyze_model(module, resolve_loss_fn(module, None), batches, cfg.paths.output_dir, options, meta)
    print(f"outputs: {cfg.paths.output_dir}")
    print(f"  top eigenvalues: {', '.join(f'{v:.4g}' for v in report['eigenvalues'])}")
    if "trace" in report:
        print(f"  trace: {report['trace']['estimate']:.4g} ± {report['trace']['std_error']:.2g}")
    for name, path in report["figures"].items():
        print(f"  {name}: {path}")
    return report


def _analysis_device(cfg: DictConfig) -> str:
    """``device``, else the one the trainer preset's accelerator names (``trainer=gpu``: cuda)."""
    if cfg.device is not None:
        return cfg.device
    accelerator = cfg.trainer.get("accelerator", "cpu")
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if accelerator == "gpu" else accelerator
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {accelerator!r}, but torch sees no GPU; use trainer=cpu or device=cpu")
    return device


def quantize(cfg: DictConfig) -> dict[str, Any]:
    """HAWQ from a trained checkpoint: plan bits, fine-tune, test, export integer-only; return the report."""
    if cfg.export.format not in ("onnx", "program", "none"):
        raise ConfigError(f"export.format: must be 'onnx', 'program' or 'none', got {cfg.export.format!r}")
    config_yaml = _config_yaml(cfg)
    _refuse_earlier_run(cfg.paths.output_dir, resume_hint=False)
    _seed(cfg)
    trainer, callbacks = _trainer(cfg)
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError("trainer.strategy: quantize cannot fine-tune in spawned or forked ranks (the bit plan would "
                          "stay in them); use one process (trainer=cpu or gpu) or trainer=ddp")
    data_free = cfg.hawq.get("calibration", "data") == "distilled"
    evaluator = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    if data_free:
        module, datamodule, ckpt, hawq = _quantize_data_free(cfg, trainer)
        if cfg.export.format != "none":
            _export_network(cfg, module)
        save_run_config(cfg.paths.output_dir, config_yaml)
        float_metrics = evaluator.test(module, datamodule=datamodule, verbose=False)[0] if datamodule else {}
        quant_metrics = trainer.test(hawq, datamodule=datamodule, verbose=False)[0] if datamodule else {}
    else:
        module, datamodule, ckpt = _trained_model(cfg)
        if cfg.export.format != "none":
            _export_network(cfg, module)  # before the fine-tune, which may take hours
        hawq = _instantiate(cfg, "hawq", module=module)
        save_run_config(cfg.paths.output_dir, config_yaml)
        float_metrics = evaluator.test(module, datamodule=datamodule, verbose=False)[0]
        objects = {"data": datamodule, "hawq": hawq, **callbacks}
        _fit_or_test(lambda: trainer.fit(hawq, datamodule=datamodule), objects, "hawq")
        quant_metrics = _fit_or_test(lambda: trainer.test(hawq, datamodule=datamodule, verbose=False), objects,
                                     "hawq")[0]
    if not trainer.is_global_zero:
        return {}
    out = Path(cfg.paths.output_dir)
    bit_report = hawq.bit_report()
    report: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "weight_bits": hawq.weight_bits,
        "act_bits": hawq.act_bits,
        "budgets": OmegaConf.to_container(cfg.hawq.budgets) if cfg.hawq.budgets is not None else None,
        "calibration": hawq.calibration,
        "float": {k: float(v) for k, v in float_metrics.items()},
        "quantized": {k: float(v) for k, v in quant_metrics.items()},
        "size_kb": {"float": bit_report.float_size_bits / 8192, "quantized": bit_report.size_bits / 8192},
        "mbops": {"float": bit_report.float_bops / 1e6, "quantized": bit_report.bops / 1e6},
        "bit_report": [str(p) for p in bit_report.save(out / "hawq")],
    }
    if cfg.export.format != "none":
        report["integer"] = _export_integer(cfg, hawq, datamodule, out)
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2))
    (out / "quantize_report.md").write_text(_quantize_markdown(report, bit_report.to_markdown()))
    print(f"outputs: {out}")
    for name in ("float", "quantized"):
        print(f"  {name}: test/acc {report[name].get('test/acc', float('nan')):.4f}")
    if "integer" in report:
        print(f"  integer-only: test/acc {report['integer']['test/acc'] or float('nan'):.4f}, "
              f"{report['integer']['path']}")
    print(f"  size: {report['size_kb']['float']:.1f} KB -> {report['size_kb']['quantized']:.1f} KB")
    print(f"  bits: {hawq.weight_bits}")
    return report


def _export_network(cfg: DictConfig, module: torch.nn.Module) -> torch.nn.Module:
    """The submodule ``export.module`` names."""
    try:
        return module.get_submodule(cfg.export.module)
    except AttributeError as err:
        raise ConfigError(f"export.module: {err}; name the network inside the LightningModule ('' for itself)") from err


def _quantize_data_free(cfg: DictConfig, trainer: pl.Trainer
                        ) -> tuple[pl.LightningModule, pl.LightningDataModule | None, Path, Any]:
    """``hawq.calibration=distilled`` (ZeroQ): plan and calibrate on inputs distilled from the model's BatchNorm
    statistics, with no training data and no fine-tune (which would need it). The test split is read only with
    ``test=true`` (to report accuracy; it also gives ``hawq.input_shape`` when that is null); with ``test=false``
    no data config is instantiated at all."""
    test = cfg.get("test", True)
    module, datamodule, ckpt = _trained_model(cfg, "test" if test else None)
    shape = {}
    if cfg.hawq.get("input_shape") is None and datamodule is not None:
        shape["input_shape"] = tuple(next(iter(datamodule.test_dataloader()))[0].shape[1:])
    hawq = _instantiate(cfg, "hawq", module=module, **shape)
    try:
        hawq.prepare_data_free(trainer.strategy.root_device)
    except (ValueError, FloatingPointError) as err:
        raise ConfigError(f"hawq: {err}") from err
    return module, datamodule, ckpt, hawq


def _export_integer(cfg: DictConfig, hawq: Any, datamodule: pl.LightningDataModule | None, out: Path
                    ) -> dict[str, Any]:
    """Fold BatchNorm, convert to the integer-only model, measure its test accuracy (without a datamodule: none,
    the example input is a distilled one) and save it."""
    from lightning_hessian.quant.export import export_onnx, export_program
    from lightning_hessian.quant.integer import to_integer_model
    from lightning_hessian.quant.modules import fold_batchnorm

    net = _export_network(cfg, hawq.module).cpu().eval()
    loader = datamodule.test_dataloader() if datamodule is not None else None
    example = next(iter(loader))[0] if loader is not None else hawq.distilled_batches()[0][0].cpu()
    fold_batchnorm(net, example)
    try:
        integer = to_integer_model(net, example)
    except ValueError as err:
        raise ConfigError(f"export: {err} (or set export.format=none)") from err
    correct = total = 0
    with torch.no_grad():
        for x, y in loader or ():
            correct += int((integer(x).argmax(-1) == y).sum())
            total += len(y)
    suffix = "onnx" if cfg.export.format == "onnx" else "pt2"
    exporter = export_onnx if cfg.export.format == "onnx" else export_program
    path = exporter(integer, example, out / f"model_int.{suffix}")
    return {"test/acc": correct / total if total else None, "path": str(path),
            "packed_size_kb": integer.packed_size_bytes() / 1024}


def _quantize_markdown(report: dict[str, Any], bit_table: str) -> str:
    rows = [("float", report["float"]), ("quantized (simulated)", report["quantized"])]
    if "integer" in report:
        rows.append(("integer-only", report["integer"]))
    lines = ["# HAWQ quantization", "", f"Checkpoint: `{report['checkpoint']}`; budgets: {report['budgets']}; "
             f"calibration: {report['calibration']}", "",
             "| model | test acc | size KB |", "| --- | --- | --- |"]
    sizes = {"float": report["size_kb"]["float"], "quantized (simulated)": report["size_kb"]["quantized"],
             "integer-only": report.get("integer", {}).get("packed_size_kb")}
    for name, metrics in rows:
        size = "-" if sizes[name] is None else f"{sizes[name]:.2f}"
        acc = metrics.get("test/acc")
        lines.append(f"| {name} | {'-' if acc is None else f'{acc:.4f}'} | {size} |")
    lines += ["", bit_table, ""]
    if "integer" in report:
        lines.append(f"Integer-only export: `{report['integer']['path']}`")
    return "\n".join(lines) + "\n"
