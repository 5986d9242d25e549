"""What the Hydra recipes run: ``train(cfg)``, ``analyze(cfg)`` and ``quantize(cfg)``.

Each recipe instantiates its parts from the composed config group by group, so a bad value is reported as
one line naming the config key (``ConfigError``) instead of a deep traceback. Importing this module
registers the resolvers of ``conf/hydra/default.yaml`` and ``conf/paths/default.yaml``: ``lh_run_id`` names run
directories, ``lh_root`` is where data and logs live.
"""

from __future__ import annotations

import csv
import json
import os
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


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
        if self._fs.isfile(self.metrics_file_path):  # keep its rows; a new key rewrites the header only
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class CSVLogger(pl.loggers.CSVLogger):
    """Lightning's ``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it.

    A resumed run logs into its old directory, and ``trainer.test`` after a ``ddp_spawn`` fit starts a new
    writer in a new process: both keep the rows logged before (``conf/logger/csv.yaml``).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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


def _trainer(cfg: DictConfig) -> tuple[pl.Trainer, dict[str, Any]]:
    """The configured Trainer with the configured callbacks (returned by config key) and loggers."""
    for key in _TRAINER_INTS:  # the Trainer takes any value here and fails deep inside fit (a bare assertion)
        value = OmegaConf.select(cfg, f"trainer.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer.{key}: must be an integer, got {value!r}")
    callbacks = _instantiate_group(cfg, "callbacks")
    loggers = list(_instantiate_group(cfg, "logger").values())
    trainer = _instantiate(cfg, "trainer", callbacks=list(callbacks.values()), logger=loggers or False)
    return trainer, callbacks


def _existing_ckpt(path: str | Path) -> Path:
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
    return Path(path)


def _resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    if ckpt_path != "last":
        return None if ckpt_path is None else str(_existing_ckpt(ckpt_path))
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.exists():
        return str(last)
    rank_zero_warn(f"ckpt_path=last: no {last}, so this run starts from scratch")
    return None


@rank_zero_only
def _set_aside_old_metrics(output_dir: str) -> None:
    """A fresh run into a used directory: move the earlier run's metrics.csv aside instead of appending to it."""
    old = Path(output_dir) / "csv" / "metrics.csv"
    if old.is_file():
        kept = old.with_name(f"metrics.{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.csv")
        old.rename(kept)
        rank_zero_warn(f"{old} held an earlier run's rows (this run does not resume it): moved to {kept.name}")


def _warn_restored_scheduler(cfg: DictConfig, ckpt_path: str) -> None:
    """Lightning restores the LR scheduler's state from the checkpoint over the config's values: say so."""
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("lr_schedulers") or [{}]
    except Exception:  # noqa: BLE001 - only a warning rests on it: Lightning's own load reports a bad file
        return
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


def _hpc_checkpoint(trainer: pl.Trainer) -> str | None:
    """The checkpoint Lightning's SLURM support resumes a requeued job from when no ckpt_path is given."""
    return trainer._checkpoint_connector._hpc_resume_path if SLURMEnvironment.detect() else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured module on the configured data; return the logged metrics."""
    _seed(cfg)
    datamodule = _instantiate(cfg, "data")
    module = _instantiate(cfg, "model")
    trainer, callbacks = _trainer(cfg)
    metrics: dict[str, float] = {}
    ckpt_path = _resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    hpc = _hpc_checkpoint(trainer)  # a requeued SLURM job resumes from it, and Lightning would test it
    resumed_from = ckpt_path or hpc
    if cfg.train and resumed_from is None:
        _set_aside_old_metrics(cfg.paths.output_dir)
    if cfg.train and resumed_from:
        _warn_restored_scheduler(cfg, resumed_from)
    if cfg.train:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except _CONFIG_ERRORS as err:
            raise _config_error(err, {"data": datamodule, "model": module, **callbacks}, "trainer") from err
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.test:
        # the final weights (or with train=false, ckpt_path's): with MNIST-1D's default val_size=0 the validation
        # split is the test split, so testing a checkpoint selected on it would report a selected accuracy
        test_ckpt = None if cfg.train else ckpt_path
        if cfg.train and test_ckpt is None and hpc:  # test the weights just trained, not that checkpoint
            test_ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "final.ckpt")
            trainer.save_checkpoint(test_ckpt)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
    if trainer.is_global_zero:
        print(f"outputs: {cfg.paths.output_dir}")
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
    trained = OmegaConf.load(hydra_dir / "config.yaml")
    runtime = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime
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
        ckpt = _existing_ckpt(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    else:
        ckpt = _existing_ckpt(cfg.ckpt_path)
    datamodule = _instantiate(cfg, "data") if stage is not None else None
    module = _instantiate(cfg, "model")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
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
    _seed(cfg)
    module, datamodule, ckpt = _trained_model(cfg)
    batches = _probe_set(cfg, datamodule)
    module.to(_analysis_device(cfg))
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
        float_metrics = evaluator.test(module, datamodule=datamodule, verbose=False)[0] if datamodule else {}
        quant_metrics = trainer.test(hawq, datamodule=datamodule, verbose=False)[0] if datamodule else {}
    else:
        module, datamodule, ckpt = _trained_model(cfg)
        hawq = _instantiate(cfg, "hawq", module=module)
        float_metrics = evaluator.test(module, datamodule=datamodule, verbose=False)[0]
        try:
            trainer.fit(hawq, datamodule=datamodule)
        except _CONFIG_ERRORS as err:
            raise _config_error(err, {"data": datamodule, "hawq": hawq, **callbacks}, "hawq") from err
        quant_metrics = trainer.test(hawq, datamodule=datamodule, verbose=False)[0]
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

    try:
        net = hawq.module.get_submodule(cfg.export.module).cpu().eval()
    except AttributeError as err:
        raise ConfigError(f"export.module: {err}; name the network inside the LightningModule ('' for itself)") from err
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
