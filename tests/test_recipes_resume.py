"""Resuming a train run: its own config, its earlier metrics, one last.ckpt; testing a given checkpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_hessian import recipes
from lightning_hessian.cli import resume_argv
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_train=400", "data.num_test=100", "data.batch_size=50", "trainer.check_val_every_n_epoch=1"]


def test_resume_argv_puts_the_runs_own_overrides_first(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- model=mnist1d_mlp\n- trainer.max_epochs=1\n- +x.y=1\n")
    argv = ["train.py", f"hydra.run.dir={tmp_path}", "ckpt_path=last", "trainer.max_epochs=2", "x.y=2"]
    earlier = ["model=mnist1d_mlp", "trainer.max_epochs=1", "+x.y=1"]
    assert resume_argv(argv) == ["train.py", *earlier, "hydra.mode=RUN", *argv[1:]]  # later overrides win
    readded = [*argv[:-1], "+x.y=2"]  # adding a key the run added too would clash: the run's is dropped
    assert resume_argv(readded) == ["train.py", *earlier[:2], "hydra.mode=RUN", *readded[1:]]
    assert resume_argv(["train.py", "-m", *argv[1:]]) == ["train.py", "-m", *argv[1:]]  # not for sweeps
    assert resume_argv(argv[:2]) == argv[:2]  # not without ckpt_path=last
    quoted = ["train.py", f"hydra.run.dir='{tmp_path}'", "ckpt_path='last'"]  # Hydra reads the same values
    assert resume_argv(quoted) == ["train.py", *earlier, "hydra.mode=RUN", *quoted[1:]]


def test_the_resumed_overrides_compose_with_the_new_ones_winning(tmp_path, data_dir):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- model=mnist1d_mlp\n- trainer.max_epochs=1\n- +x.y=1\n")
    argv = resume_argv(["train.py", f"hydra.run.dir={tmp_path}", "ckpt_path=last", "trainer.max_epochs=2", "x.y=2"])
    overrides = [arg for arg in argv[1:] if not arg.startswith("hydra.") and arg != "ckpt_path=last"]
    cfg = compose_config("train", overrides, tmp_path, data_dir)
    assert (cfg.trainer.max_epochs, cfg.x.y) == (2, 2) and "MLP" in cfg.model.net._target_


def test_ckpt_path_last_without_a_checkpoint_warns_naming_the_directory(tmp_path, data_dir):
    cfg = compose_config("train", [*SMALL, "ckpt_path=last", "train=false", "test=false"], tmp_path, data_dir)
    with pytest.warns(UserWarning, match=f"ckpt_path=last: no {tmp_path}/checkpoints/last.ckpt"):
        recipes.train(cfg)


def test_train_false_tests_the_given_checkpoint(tmp_path, data_dir):
    trained = recipes.train(compose_config("train", [*SMALL, "trainer.max_epochs=2"], tmp_path / "a", data_dir))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    tested = recipes.train(compose_config("train", [*SMALL, "train=false", f"ckpt_path={ckpt}", "logger=none"],
                                          tmp_path / "b", data_dir))
    assert tested["test/acc"] == trained["test/acc"] and tested["test/loss"] == pytest.approx(trained["test/loss"])


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LH_RUN_ID": ""}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_resume_uses_the_runs_config_keeps_its_metrics_and_one_last_ckpt(tmp_path, data_dir):
    run = tmp_path / "run"
    common = [*SMALL, f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"]
    first = _train(["model=mnist1d_mlp", "model.optimizer.lr=0.003", "trainer.max_epochs=1", *common], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(["ckpt_path=last", "trainer.max_epochs=2", *common], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "model.scheduler.T_max: the resumed run keeps the checkpoint's T_max=1, not the configured 2" in (
        resumed.stderr)
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.model.net._target_.endswith("MNIST1DMLP") and saved.model.optimizer.lr == 0.003
    assert saved.trainer.max_epochs == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt", "last.ckpt.checksum"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["epoch"] for row in rows if row["train/loss_epoch"]} == {"0", "1"}
    assert sum(1 for row in rows if row["test/acc"]) == 2  # one test per run
    values = [(row["step"], k) for row in rows for k, v in row.items() if v and k not in ("step", "epoch")]
    assert len(values) == len(set(values))


def test_a_missing_checkpoint_file_is_a_config_error(tmp_path, data_dir):
    cfg = compose_config("train", [*SMALL, f"ckpt_path={tmp_path}/none.ckpt"], tmp_path, data_dir)
    with pytest.raises(recipes.ConfigError, match="ckpt_path: no checkpoint file at"):
        recipes.train(cfg)


def test_a_requeued_slurm_job_resumes_its_metrics_and_tests_its_final_weights(tmp_path, data_dir, monkeypatch):
    # Lightning resumes a requeued SLURM job from hpc_ckpt_<n>.ckpt with ckpt_path=None, and would test that
    # (stale) checkpoint too: the run must not set its metrics aside, and must test the weights it trained
    for key, value in {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    schedule = "model.scheduler.T_max=10"  # the LR is not yet 0 after epoch 0, so epoch 1 moves the weights
    recipes.train(compose_config("train", [*SMALL, schedule, "trainer.max_epochs=1"], tmp_path, data_dir))
    (tmp_path / "checkpoints" / "last.ckpt").rename(tmp_path / "hpc_ckpt_1.ckpt")  # as at a preemption
    resumed = recipes.train(compose_config("train", [*SMALL, schedule, "trainer.max_epochs=2"], tmp_path, data_dir))
    assert not list((tmp_path / "csv").glob("metrics.*.csv"))
    monkeypatch.delenv("SLURM_NTASKS")  # not SLURM now: test given checkpoints
    final, stale = (recipes.train(compose_config("train", [*SMALL, "train=false", f"ckpt_path={ckpt}", "logger=none"],
                                                 tmp_path / name, data_dir))
                    for name, ckpt in (("f", tmp_path / "checkpoints" / "last.ckpt"),
                                       ("s", tmp_path / "hpc_ckpt_1.ckpt")))
    assert resumed["test/loss"] == pytest.approx(final["test/loss"]) != pytest.approx(stale["test/loss"])
