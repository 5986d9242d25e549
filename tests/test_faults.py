"""Fault injection into the recipes: used run directories, damaged checkpoints and run files, replayed metrics,
DDP metrics, a NaN loss, and what can be checked before any compute. No case loses a file: each compares the
run directory's files (by SHA-256) before and after."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.strategies import DDPStrategy

from lightning_hessian import recipes
from lightning_hessian.checkpoint_io import CheckpointError, ChecksummedCheckpointIO, checksum_path
from lightning_hessian.cli import resume_argv, run_recipe
from lightning_hessian.data import MNIST1DDataModule
from lightning_hessian.models import ClassificationModule
from lightning_hessian.models.mnist1d import MNIST1DCNN
from tests.conftest import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]
# 8 steps an epoch, a row of metrics.csv per step
TINY = ["data.num_train=400", "data.num_test=100", "data.batch_size=50", "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def logged_values(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The (step, metric) of every value in the rows."""
    return [(row["step"], key) for row in rows for key, value in row.items() if value and key not in ("step", "epoch")]


def corrupt_tensor_bytes(path: Path) -> None:
    """Overwrite 8 bytes of the classifier weight inside the archive: the file still loads, as bit rot would."""
    weight = torch.load(path, weights_only=True)["state_dict"]["net.classifier.weight"]
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at:at + 8] = torch.tensor([1e30, -1e30]).numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A finished one-epoch train run (checkpoints at step 8), made once; tests work on copies (``run``)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    recipes.train(compose_config("train", [*TINY, "trainer.max_epochs=1"], out, data_dir))
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---- a run directory belongs to one run ------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["train", "test only", "analyze", "quantize"])
def test_a_run_into_a_used_directory_is_refused_and_changes_nothing(recipe, run, tmp_path, data_dir):
    given = shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "given.ckpt")
    config, overrides, hint = {
        "train": ("train", [], "resume it with ckpt_path=last, or start this run elsewhere"),
        "test only": ("train", ["train=false", f"ckpt_path={given}"], "start this run elsewhere"),
        "analyze": ("analyze", [f"ckpt_path={given}"], "start this run elsewhere"),
        "quantize": ("quantize", [f"ckpt_path={given}"], "start this run elsewhere"),
    }[recipe]
    before = snapshot(run)
    cfg = compose_config(config, [*TINY, *overrides], run, data_dir)
    match = rf"^hydra.run.dir: {run} holds an earlier run \(.hydra/config.yaml\); {hint} \(another LH_RUN_ID"
    with pytest.raises(recipes.ConfigError, match=match):
        getattr(recipes, config)(cfg)
    assert snapshot(run) == before


def test_ckpt_path_last_with_nothing_intact_to_resume_moves_the_whole_earlier_run_aside(run, data_dir):
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a copy cut short
    before = snapshot(run)
    with pytest.warns(UserWarning, match=f"ckpt_path=last: {run}/checkpoints/last.ckpt does not match its checksum"):
        recipes.train(compose_config("train", [*TINY, "trainer.max_epochs=1", "ckpt_path=last", "test=false"], run,
                                     data_dir))
    (aside,) = run.parent.glob("run.earlier-*")
    assert snapshot(aside) == before  # the earlier run, whole and unchanged, in one place
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8  # from scratch
    assert len(metrics_rows(run)) == len(metrics_rows(aside)) - 1  # the same epoch, without the earlier test row


def test_a_resume_that_fails_on_a_bad_override_changes_nothing(run, data_dir):
    cfg = compose_config("train", [*TINY, "ckpt_path=last", "data.batch_size=0"], run, data_dir)
    # Hydra saved .hydra/overrides.yaml before the recipe ran, so every later plain resume failed the same way
    assert HydraConfig.get().output_subdir is None
    before = snapshot(run)
    with pytest.raises(recipes.ConfigError, match="^data: batch_size must be a positive integer, got 0$"):
        recipes.train(cfg)
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_resume_that_fails_on_a_bad_override_changes_nothing_end_to_end(run, tmp_path, data_dir):
    before = snapshot(run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LH_RUN_ID": ""}
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), f"hydra.run.dir={run}",
                             "ckpt_path=last", f"paths.data_dir={data_dir}", "data.batch_size=0"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: data: batch_size must be a positive integer, got 0"
    after = snapshot(run)
    assert after.pop("train.log", "") in ("", hashlib.sha256(b"").hexdigest())  # Hydra's log of this attempt
    assert after == before


def test_a_resume_by_lh_run_id_restores_the_runs_overrides_as_hydra_run_dir_does(tmp_path, monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as before hydra.main: no earlier test's config
    monkeypatch.setenv("LH_RUN_ID", "demo")
    monkeypatch.delenv("LH_ROOT", raising=False)
    for root in (tmp_path, tmp_path / "elsewhere"):
        saved = root / "logs" / "train" / "runs" / "demo" / ".hydra"
        saved.mkdir(parents=True)
        (saved / "overrides.yaml").write_text(f"- model=mnist1d_mlp\n- seed={len(root.parts)}\n")
    earlier = ["model=mnist1d_mlp", f"seed={len(tmp_path.parts)}"]
    argv = ["train.py", "ckpt_path=last", "trainer.max_epochs=2"]
    assert resume_argv(argv, config_dir=CONF_DIR) == ["train.py", *earlier, "hydra.mode=RUN", *argv[1:]]
    by_dir = [*argv, f"hydra.run.dir={tmp_path}/logs/train/runs/demo"]
    assert resume_argv(by_dir, config_dir=CONF_DIR) == ["train.py", *earlier, "hydra.mode=RUN", *by_dir[1:]]
    # the directory as Hydra resolves it: paths.root_dir given on the command line moves it
    elsewhere = [*argv, f"paths.root_dir={tmp_path}/elsewhere"]
    assert resume_argv(elsewhere, config_dir=CONF_DIR)[2] == f"seed={len(tmp_path.parts) + 1}"


def test_an_unreadable_overrides_file_stops_a_resume_with_one_line(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_bytes(b"- trainer.max_epochs=1\n\x00\x01")
    with pytest.raises(SystemExit) as stop:
        resume_argv(["train.py", f"hydra.run.dir={tmp_path}", "ckpt_path=last"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: ckpt_path=last: {tmp_path}/.hydra/overrides.yaml is not a readable "
                                       "list of overrides (ReaderError); repair it, or resume with the run's "
                                       "overrides given on the command line and the file moved away\n")


def test_a_resumed_run_continues_metrics_csv_from_its_checkpoint_without_duplicates(run, data_dir):
    path = run / "csv" / "metrics.csv"
    before = metrics_rows(run)
    with open(path, newline="") as file:
        header = next(csv.reader(file))
    with open(path, "a", newline="") as file:  # what a run killed at step 12 had flushed past its checkpoint (8)
        csv.DictWriter(file, header).writerows({"epoch": 1, "step": s, "train/loss_step": 99.0} for s in range(8, 12))
    recipes.train(compose_config("train", [*TINY, "trainer.max_epochs=2", "ckpt_path=last", "test=false"], run,
                                 data_dir))
    rows = metrics_rows(run)
    values = logged_values(rows)
    assert len(values) == len(set(values))  # each (step, metric) once
    assert rows[:len(before)] == before and not any(row["train/loss_step"] == "99.0" for row in rows)
    assert sorted({int(step) for step, key in values if key == "train/loss_step"}) == list(range(16))


def test_an_unreadable_metrics_file_is_kept_aside_and_a_new_one_started(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_bytes(b"step,a\n\xff\xfe\x00")
    logger = recipes.CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    with pytest.warns(UserWarning, match="metrics.csv is not a readable CSV file"):
        logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    (kept,) = (tmp_path / "csv").glob("metrics.unreadable-*.csv")
    assert kept.read_bytes() == b"step,a\n\xff\xfe\x00"
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["a,step", "1.0,0"]


# ---- damaged checkpoints ---------------------------------------------------------------------------------

DAMAGE = {
    "truncated": (lambda data: data[:len(data) // 2], "a damaged or truncated archive"),
    "empty": (lambda data: b"", "an empty file"),
    "random bytes": (lambda data: random.Random(0).randbytes(len(data)), "not a file saved by torch.save"),
    "text": (lambda data: b"these are not weights\n", "not a file saved by torch.save"),
}


@pytest.mark.parametrize("recipe", ["train", "analyze", "quantize"])
@pytest.mark.parametrize("kind", DAMAGE)
def test_an_unreadable_checkpoint_ends_in_one_line_naming_it(kind, recipe, trained, tmp_path, data_dir):
    damage, what = DAMAGE[kind]
    bad = tmp_path / "given.ckpt"
    bad.write_bytes(damage((trained / "checkpoints" / "last.ckpt").read_bytes()))
    cfg = compose_config(recipe, [*TINY, f"ckpt_path={bad}"], tmp_path / "out", data_dir)
    match = rf"^ckpt_path: {bad} is not a readable checkpoint \({what}\); give an intact checkpoint \(a run keeps "
    with pytest.raises(recipes.ConfigError, match=match + r"epoch_NNN.ckpt beside last.ckpt\)$"):
        getattr(recipes, recipe)(cfg)
    assert not (tmp_path / "out").exists() or not snapshot(tmp_path / "out")


@pytest.mark.parametrize("recipe", ["train", "analyze", "quantize"])
def test_a_checkpoint_with_damaged_tensor_bytes_is_refused_by_its_checksum(recipe, run, tmp_path, data_dir):
    last = run / "checkpoints" / "last.ckpt"
    corrupt_tensor_bytes(last)  # torch.load reads it without a word: training went on at loss 8e34
    overrides = [f"ckpt_path={last}", "train=false"] if recipe == "train" else [f"ckpt_path={last}"]
    cfg = compose_config(recipe, [*TINY, *overrides], tmp_path / "out", data_dir)
    with pytest.raises(recipes.ConfigError, match=f"^ckpt_path: {last} does not match its checksum in {last}.checksum"):
        getattr(recipes, recipe)(cfg)


def test_checksummed_checkpoint_io_writes_verifies_and_removes_the_checksum(run, tmp_path):
    io = ChecksummedCheckpointIO()
    path = tmp_path / "a.ckpt"
    state = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 3}
    io.save_checkpoint(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(checksum_path(path)).read_text() == f"{digest}  a.ckpt\n"  # sha256sum -c reads it
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], state["state_dict"]["w"])
    # a save killed after the new checksum was written, before the file was replaced: the old file still loads
    old = path.read_bytes()
    io.save_checkpoint({**state, "global_step": 4}, path)
    new_digest = Path(checksum_path(path)).read_text().split()[0]
    Path(checksum_path(path)).write_text(f"{new_digest}  a.ckpt\n{digest}  a.ckpt\n")
    path.write_bytes(old)
    assert io.load_checkpoint(path)["global_step"] == 3
    corrupt = run / "checkpoints" / "last.ckpt"
    corrupt_tensor_bytes(corrupt)
    with pytest.raises(CheckpointError, match=f"^{corrupt} does not match its checksum"):
        io.load_checkpoint(corrupt)
    io.remove_checkpoint(path)
    assert not path.exists() and not Path(checksum_path(path)).exists()


def test_ckpt_path_last_falls_back_from_a_damaged_last_ckpt_to_the_newest_intact_one(run, data_dir):
    last = run / "checkpoints" / "last.ckpt"
    corrupt_tensor_bytes(last)
    before = snapshot(run)
    with pytest.warns(UserWarning, match=rf"^ckpt_path=last: {last} does not match its checksum .*; resuming from "
                                         rf"{run}/checkpoints/epoch_000.ckpt, the newest intact checkpoint of the run"):
        recipes.train(compose_config("train", [*TINY, "trainer.max_epochs=2", "ckpt_path=last", "test=false"], run,
                                     data_dir))
    assert torch.load(last, weights_only=True)["global_step"] == 16  # resumed at 8, not started over
    after = snapshot(run)
    assert after["checkpoints/last.ckpt.damaged"] == before["checkpoints/last.ckpt"]  # kept, not overwritten
    assert set(before) - {"checkpoints/last.ckpt", "checkpoints/last.ckpt.checksum"} <= set(after)


def test_a_run_config_that_is_not_readable_is_one_line(run, tmp_path, data_dir):
    (run / ".hydra" / "hydra.yaml").write_text("hydra: [\n")
    cfg = compose_config("analyze", [f"run_dir={run}"], tmp_path / "out", data_dir)
    with pytest.raises(recipes.ConfigError, match=f"^run_dir: {run}/.hydra does not hold a readable run config"):
        recipes.analyze(cfg)


# ---- DDP metrics -----------------------------------------------------------------------------------------


@pytest.mark.ddp
@pytest.mark.parametrize("num_train, num_test", [(400, 100), (395, 105)])
def test_a_two_process_test_loss_equals_one_process_on_the_same_samples(num_train, num_test, tmp_path, data_dir):
    """Was rank 0's half. With 105 test samples Lightning's DistributedSampler repeats sample 0 on rank 1, so both
    numbers are over the 106 samples the ranks saw (the duplicate counts twice, as in the accuracy)."""
    torch.manual_seed(0)
    module = ClassificationModule(MNIST1DCNN())
    dm = MNIST1DDataModule(data_dir=str(data_dir), num_train=num_train, num_test=num_test, eval_batch_size=20)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork",
                                                                            process_group_backend="gloo"),
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    dm.setup("test")
    x, y = dm.test_set.tensors
    seen = torch.cat([torch.arange(num_test), torch.arange(num_test % 2)])  # the sampler pads with the first samples
    with torch.no_grad():
        logits = module.eval()(x[seen])
    assert result["test/loss"] == pytest.approx(F.cross_entropy(logits, y[seen]).item(), rel=1e-6)
    assert result["test/acc"] == pytest.approx((logits.argmax(1) == y[seen]).float().mean().item(), rel=1e-6)


# ---- non-finite training ---------------------------------------------------------------------------------


def test_a_nan_loss_stops_training_with_one_line_naming_the_step(tmp_path, data_dir, capsys):
    cfg = compose_config("train", [*TINY, "trainer.max_epochs=2", "+callbacks.poison._target_=tests.recipe_callbacks"
                                   ".PoisonAtStep", "+callbacks.poison.step=11"], tmp_path, data_dir)
    with pytest.raises(SystemExit) as stop:
        run_recipe(recipes.train, cfg)
    assert stop.value.code == 1
    assert capsys.readouterr().err == ("error: train loss is nan at step 11 (epoch 1, batch 3): training stopped, and "
                                       "no checkpoint holds these weights; lower the learning rate or clip gradients "
                                       "(trainer.gradient_clip_val)\n")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and all(v.isfinite().all() for v in last["state_dict"].values())


# ---- fail early: what can be checked before any compute --------------------------------------------------


def test_quantize_checks_the_export_module_before_the_fine_tune(trained, tmp_path, data_dir):
    cfg = compose_config("quantize", [*TINY, f"ckpt_path={trained}/checkpoints/last.ckpt", "export.module=nope"],
                         tmp_path, data_dir)
    with pytest.raises(recipes.ConfigError, match="^export.module: .* has no attribute `nope`"):
        recipes.quantize(cfg)
    assert not snapshot(tmp_path)  # no bit plan, no fine-tune, no checkpoint


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, data_dir):
    (tmp_path / "file").write_text("")
    cfg = compose_config("train", [*TINY, f"callbacks.model_checkpoint.dirpath={tmp_path}/file/checkpoints"],
                         tmp_path / "out", data_dir)
    with pytest.raises(recipes.ConfigError, match=rf"^callbacks.model_checkpoint.dirpath: cannot save checkpoints to "
                                                  rf"{tmp_path}/file/checkpoints: {tmp_path}/file is not a directory$"):
        recipes.train(cfg)
    assert not (tmp_path / "out").exists() or not snapshot(tmp_path / "out")


def test_train_false_without_a_checkpoint_is_refused(tmp_path, data_dir):
    cfg = compose_config("train", [*TINY, "train=false"], tmp_path, data_dir)
    with pytest.raises(recipes.ConfigError, match="^ckpt_path: train=false tests a checkpoint, and none was given"):
        recipes.train(cfg)


def test_the_error_lines_of_a_rank_reach_the_main_process_as_errors():
    """A forked rank's exception reaches the main process as a traceback text (ProcessRaisedException)."""
    text = "Traceback (most recent call last):\n  ...\nlightning_hessian.recipes.NonFiniteLossError: train loss is nan"
    err = recipes._rank_error(torch.multiprocessing.ProcessRaisedException(text, 1, 123))
    assert isinstance(err, recipes.NonFiniteLossError) and str(err) == "train loss is nan"
    assert recipes._rank_error(torch.multiprocessing.ProcessRaisedException("ValueError: x", 1, 123)) is None
