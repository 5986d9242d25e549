import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_hessian import recipes
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_train=400", "data.num_test=100", "data.batch_size=50", "trainer.check_val_every_n_epoch=1"]


def test_train_recipe_fits_tests_and_checkpoints(tmp_path, data_dir):
    cfg = compose_config("train", SMALL + ["trainer.max_epochs=4"], tmp_path, data_dir)
    metrics = recipes.train(cfg)
    assert metrics["test/acc"] > 0.3  # 10 classes: chance is 0.1
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_last_checkpoint_is_the_final_epoch_even_when_validation_did_not_improve(tmp_path, data_dir):
    cfg = compose_config("train", SMALL + ["trainer.max_epochs=3", "model.optimizer.lr=0.0"], tmp_path, data_dir)
    recipes.train(cfg)  # lr 0: val/acc never improves after epoch 0, so only epoch 0 is the "best" checkpoint
    folder = tmp_path / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.ckpt", "epoch_000.ckpt.checksum", "last.ckpt",
                                                        "last.ckpt.checksum"]


def run_recipe(args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=0", "error: data: batch_size must be a positive integer, got 0"),
        ("data.batch_size=100000", "batch_size=100000 exceeds the 4000 training samples"),
        ("model=nosuchmodel", "Could not find 'model/nosuchmodel'"),
    ],
)
def test_bad_config_gives_one_clear_line(override, expected, tmp_path, data_dir):
    result = run_recipe([override, "trainer.max_epochs=1", f"paths.data_dir={data_dir}"], tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_cifar_folder_names_the_key(tmp_path):
    result = run_recipe(["data=cifar10", "model=resnet20", f"data.data_dir={tmp_path}/none"], tmp_path)
    assert result.returncode == 2
    assert "data.data_dir" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["callbacks=hessian", "callbacks.hessian_spectrum.probe_size=100000"],
         "^callbacks.hessian_spectrum: probe_size=100000 exceeds the 400 training samples"),
        (["data.batch_size=5000"], "^data: batch_size=5000 exceeds the 400 training samples"),
        (["callbacks=none", "+batch_schedule=abs"], "^callbacks.adaptive_batch_size: has no _target_"),
        (["seed=abc"], "^seed: invalid literal"),
        (["trainer.max_epochs=abc"], "^trainer.max_epochs: must be an integer, got 'abc'"),  # was a bare assert
        (["+trainer.val_check_interval=1000"], "^trainer: `val_check_interval` .* must be less than or equal"),
        (["callbacks.model_checkpoint.monitor=val/accc"],  # Lightning's MisconfigurationException
         r"^callbacks.model_checkpoint: `ModelCheckpoint\(monitor='val/accc'\)` could not find"),
    ],
)
def test_errors_during_fit_name_the_config_key(overrides, match, tmp_path, data_dir):
    cfg = compose_config("train", [*SMALL, "trainer.max_epochs=1", *overrides], tmp_path, data_dir)
    with pytest.raises(recipes.ConfigError, match=match):
        recipes.train(cfg)


def test_analyze_runs_on_the_device_its_trainer_preset_names(tmp_path, data_dir):
    def device(*overrides):
        return recipes._analysis_device(compose_config("analyze", list(overrides), tmp_path, data_dir))

    assert device() == "cpu" and device("device=cuda:1") == "cuda:1"
    if torch.cuda.is_available():
        assert device("trainer=gpu") == "cuda"
    else:  # the trainer group was composed and ignored: trainer=gpu analyzed on the CPU without a word
        with pytest.raises(recipes.ConfigError, match="trainer.accelerator: 'gpu', but torch sees no GPU"):
            device("trainer=gpu")
