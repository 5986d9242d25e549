"""Every option of every config group composes, and instantiates where this machine can run it."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf

from tests.helpers.config import CONF_DIR, compose_config

GROUPS = ["data", "model", "callbacks", "logger", "trainer"]
NEEDS_OTHER_HARDWARE = {("trainer", "gpu"), ("trainer", "ddp"), ("trainer", "multinode")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_instantiates(group, option, tmp_path, data_dir):
    cfg = compose_config("train", [f"{group}={option}"], tmp_path, data_dir)
    node = cfg[group]
    OmegaConf.resolve(cfg)
    if (group, option) in NEEDS_OTHER_HARDWARE:
        assert issubclass(get_class(node._target_), pl.Trainer)
        return
    if group in ("callbacks", "logger"):
        objects = [instantiate(entry) for entry in (node or {}).values() if entry is not None]
        assert (option == "none") == (objects == []), f"{group}={option} gives {objects}"  # none: nothing, else some
        kind = pl.Callback if group == "callbacks" else Logger
        assert all(isinstance(obj, kind) for obj in objects), objects
    else:
        expected = {"data": pl.LightningDataModule, "model": pl.LightningModule, "trainer": pl.Trainer}
        assert isinstance(instantiate(node), expected[group]), group


def test_train_config_defaults(tmp_path, data_dir):
    cfg = compose_config("train", [], tmp_path, data_dir)
    assert cfg.data._target_.endswith("MNIST1DDataModule")
    assert cfg.model.net._target_.endswith("MNIST1DCNN")
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_instantiates(experiment, tmp_path, data_dir):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path, data_dir)
    OmegaConf.resolve(cfg)
    assert isinstance(instantiate(cfg.data), pl.LightningDataModule)
    assert isinstance(instantiate(cfg.model), pl.LightningModule)
    assert all(isinstance(instantiate(entry), pl.Callback) for entry in (cfg.callbacks or {}).values() if entry)


@pytest.mark.parametrize("schedule", options("batch_schedule"))
def test_every_batch_schedule_composes(schedule, tmp_path, data_dir):
    cfg = compose_config("train", [f"+batch_schedule={schedule}", "callbacks=abs"], tmp_path, data_dir)
    OmegaConf.resolve(cfg)
    callbacks = {name: instantiate(entry) for name, entry in cfg.callbacks.items() if entry is not None}
    assert callbacks["adaptive_batch_size"].schedule.alias == {"absa": "abs", "bl_max": "bl"}.get(schedule, schedule)
    assert callbacks["adaptive_batch_size"].adversarial == (schedule == "absa")
    if schedule == "bl_max":  # BL trains at the largest batch from the start
        assert cfg.data.batch_size == callbacks["adaptive_batch_size"].max_batch_size


def test_absa_without_the_adaptive_callback_composes(tmp_path, data_dir):
    cfg = compose_config("train", ["experiment=mnist1d_absa", "~callbacks.adaptive_batch_size"], tmp_path, data_dir)
    OmegaConf.resolve(cfg)
    assert set(cfg.callbacks) == {"model_checkpoint", "last_checkpoint", "hessian_spectrum", "adversarial_augment"}
    assert instantiate(cfg.callbacks.adversarial_augment).fraction == 0.2


def test_transformer_hawq_trains_40_epochs_and_fine_tunes_3(tmp_path, data_dir):
    train = compose_config("train", ["experiment=transformer_hawq"], tmp_path, data_dir)
    OmegaConf.resolve(train)
    quantize = compose_config("quantize", ["experiment=transformer_hawq"], tmp_path, data_dir)
    OmegaConf.resolve(quantize)
    assert (train.trainer.max_epochs, quantize.trainer.max_epochs) == (40, 3)
    assert quantize.hawq.metric == "qbert" and quantize.hawq.groups == {"rows": 2} and quantize.export.float_ops
    assert train.model.net._target_.endswith("MNIST1DTransformer")


DATA_FREE = ["hawq.calibration=distilled", "hawq.metric=kl", "hawq.input_shape=[40]", "model.net.batch_norm=true"]


@pytest.mark.parametrize("overrides", [[], DATA_FREE, *([f"experiment={name}"] for name in options("experiment")
                                                         if name.endswith("_hawq"))], ids=str)
def test_every_quantize_config_builds_its_hawq_module(overrides, tmp_path, data_dir):
    """The flat ``hawq`` keys of ``quantize.yaml`` (and of each HAWQ experiment, and its data-free line) reach the
    option groups unchanged."""
    from lightning_hessian.quant import HAWQModule

    cfg = compose_config("quantize", overrides, tmp_path, data_dir)
    OmegaConf.resolve(cfg)
    hawq = instantiate(cfg.hawq, module=instantiate(cfg.model))
    assert isinstance(hawq, HAWQModule) and hawq.fixed_bits is None
    node = OmegaConf.to_container(cfg.hawq)
    assert hawq.budgets == node["budgets"] and hawq.bit_choices == node["bit_choices"]
    assert (hawq.metric, hawq.act_bits, hawq.probe_size, hawq.probe_batch_size) == (
        node["metric"], node["act_bits"], node["probe_size"], node["probe_batch_size"])
    assert [list(group) for group in hawq.ties] == node["ties"] and hawq.distill_options == node["distill"]
    assert bool(hawq.weight_groups) == (node["groups"] is not None)
    assert (hawq.calibration, hawq.input_shape) == ((node["calibration"], tuple(node["input_shape"]))
                                                    if overrides == DATA_FREE else ("data", None))
    assert hawq.optimizer_factory.func is get_class(node["optimizer"]["_target_"])
