"""Recipes at scale: sweeps on simulated DDP, the submitit launchers, run directories, exact resume."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_hessian import recipes
from lightning_hessian.cli import run_recipe
from tests.helpers.config import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_train=400", "data.num_test=100", "data.batch_size=50", "trainer.max_epochs=1"]
# the probe sets and batch limits of the Hessian callbacks, scaled to 400 training samples
SMALL_CALLBACKS = [
    "callbacks.hessian_spectrum.probe_size=100", "callbacks.hessian_spectrum.probe_batch_size=100",
    "callbacks.hessian_spectrum.top_k=2", "callbacks.hessian_spectrum.max_overhead=null",  # every epoch: a short fit
    "callbacks.adaptive_batch_size.probe_size=100",
    "callbacks.adaptive_batch_size.probe_batch_size=100", "callbacks.adaptive_batch_size.max_batch_size=200",
    "callbacks.adaptive_batch_size.duration=1",
]
# until conf/train.yaml lists `launcher: null` in its defaults, the group is appended
TRAIN_DEFAULTS = (ROOT / "conf" / "train.yaml").read_text()
LAUNCHER = "launcher" if re.search(r"^\s*- launcher:", TRAIN_DEFAULTS, re.M) else "+launcher"
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                                    reason="hydra-submitit-launcher is not installed (pip install '.[test]')")


def run_script(script: str, args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python recipes/<script> args`` with the repository importable (for tests.recipe_callbacks)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LH_RUN_ID": ""}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def where(tmp_path: Path, data_dir: Path) -> list[str]:
    return [f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}"]


def compose_with_hydra(config_name: str, overrides: list[str]) -> DictConfig:
    """The full config with its ``hydra`` node, as the launcher sees it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


# ---- run directories: one per run, the same on every rank ---------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LH_RUN_ID": "demo", "SLURM_JOB_ID": "7"}, "demo"),
        ({"SLURM_JOB_ID": "7", "TORCHELASTIC_RUN_ID": "x"}, "slurm-7"),
        ({"SLURM_JOB_ID": "8", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-7_3"),
        ({"TORCHELASTIC_RUN_ID": "job42", "GROUP_WORLD_SIZE": "2"}, "torchrun-job42"),
        ({"TORCHELASTIC_RUN_ID": "none", "GROUP_WORLD_SIZE": "1"}, r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"),
        ({}, r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"),
    ],
)
def test_run_id_is_shared_by_every_rank_of_a_launch(env, expected, monkeypatch):
    for name in ("LH_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID",
                 "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert re.fullmatch(expected, recipes.run_id())


def test_multinode_torchrun_without_rdzv_id_is_refused(monkeypatch):
    for name in ("LH_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.raises(recipes.ConfigError, match="--rdzv-id"):
        recipes.run_id()


def test_multinode_trainer_and_run_dir_follow_the_slurm_task_environment(monkeypatch):
    for name in ("LH_RUN_ID", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    cfg = compose_with_hydra("train", ["trainer=multinode"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (4, 2, "ddp")
    assert cfg.hydra.run.dir.endswith("/train/runs/slurm-1234")


# ---- launchers and sweepers: composition ----------------------------------------------------------------


@needs_submitit
def test_slurm_launcher_sizes_the_allocation_from_the_trainer(tmp_path, monkeypatch):
    """The real launcher code down to the sbatch script (submission itself is stubbed: no cluster here)."""
    import submitit

    cfg = compose_with_hydra("train", [f"{LAUNCHER}=slurm", "trainer=multinode", "trainer.devices=4",
                                       "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                                       f"hydra.sweep.dir={tmp_path}"])
    assert cfg.ckpt_path == "last"  # a requeued job resumes from its own directory
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    captured = {}

    class Submitted(Exception):
        pass

    def submit(executor, *args):
        captured["sbatch"] = executor._executor._make_submission_file_text("CMD", "uid")
        captured["requeues"] = executor._executor.max_num_timeout
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    with pytest.raises(Submitted):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in captured["sbatch"], line
    assert captured["requeues"] == 3


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="hydra-optuna-sweeper is not installed (pip install '.[optuna]')")
def test_optuna_search_composes_and_the_recipe_returns_its_metric():
    cfg = compose_with_hydra("train", ["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"model.optimizer.lr", "data.batch_size", "model.net.channels"}
    assert cfg.data.val_size > 0  # selects on a validation split, not on the test split
    metrics = {"val/acc": 0.75, "val/loss": 1.0}
    assert run_recipe(lambda c: metrics, OmegaConf.create({"optimized_metric": "val/acc"})) == 0.75


def test_run_recipe_reports_a_missing_optimized_metric(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(lambda c: {"val/loss": 1.0}, OmegaConf.create({"optimized_metric": "val/acc"}))
    assert exit_info.value.code == 2
    assert "optimized_metric: 'val/acc' was not logged" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("train", ["experiment=mnist1d_absa"]),
        ("train", ["experiment=absa_table", "batch_schedule=fb"]),
        ("train", ["experiment=cifar10_resnet18_absa"]),
        ("quantize", ["experiment=mnist1d_hawq"]),
        ("quantize", ["experiment=cifar10_resnet18_hawq"]),
    ],
)
def test_experiment_presets_compose(config, overrides, tmp_path, data_dir):
    cfg = compose_with_hydra(config, overrides)
    OmegaConf.resolve(cfg.model)
    if config == "train":
        schedule = cfg.callbacks.adaptive_batch_size.schedule
        assert schedule == ("fb" if "batch_schedule=fb" in overrides else "abs")
        # ABSA runs adversarial training; the other schedules must not
        assert (cfg.callbacks.adversarial_augment is not None) == cfg.callbacks.adaptive_batch_size.adversarial
    else:
        assert cfg.hawq.budgets.size == 0.5 and list(cfg.hawq.bit_choices) == [4, 8]


def test_absa_table_sweeps_every_schedule_batch_and_seed():
    cfg = compose_with_hydra("train", ["experiment=absa_table"])
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert params.batch_schedule.split(",") == ["bl_max", "fb", "gg", "abs", "absa"]
    assert params["callbacks.adaptive_batch_size.max_batch_size"].split(",") == ["512", "4096", "16384"]
    assert cfg.trainer.max_epochs == 45 and list(cfg.model.scheduler.milestones) == [15, 30, 40]
    abs_cfg = cfg.callbacks.adaptive_batch_size  # the benchmark's schedule: duration and warmup scaled by 45 / 90
    assert (abs_cfg.duration, abs_cfg.fb_warmup_epochs) == (5, 2.5) and abs_cfg.probe_size is None
    assert cfg.callbacks.hessian_spectrum is None  # the table times the ABS probe alone


# ---- subprocess runs: sweeps, simulated DDP, submitit ---------------------------------------------------


def test_multirun_sweep_runs_with_no_paths_override(tmp_path, monkeypatch):
    """The sweep directory resolves before Hydra's runtime config exists: logs/ and data/ under the cwd."""
    monkeypatch.delenv("LH_ROOT", raising=False)
    result = run_script("train.py", ["-m", "seed=0", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = (tmp_path / "logs" / "train" / "multiruns").glob("*/0")
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert list((tmp_path / "data").glob("mnist1d_400_100_*.npz"))


@pytest.mark.slow
@pytest.mark.ddp
def test_multirun_sweep_of_two_ddp_sim_jobs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    result = run_script("train.py", ["-m", "trainer=ddp_sim", "seed=1,2", *TINY, *where(tmp_path, data_dir),
                                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("outputs:") == 2  # the sweep ran once, not again inside the second rank
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    ckpts = [torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True) for job in "01"]
    assert [c["global_step"] for c in ckpts] == [4, 4]  # 400 samples / (2 ranks x 50) per epoch
    weights = [c["state_dict"]["net.classifier.weight"] for c in ckpts]
    assert not torch.equal(*weights)  # seeds 1 and 2
    with open(sweep / "0" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # trainer.test forks new ranks with a new CSV writer: the fit's rows stay
    assert [bool(row[key]) for row in rows for key in ("train/loss_epoch", "test/acc")].count(True) == 2


@pytest.mark.slow
@pytest.mark.ddp
def test_train_recipe_on_ddp_sim_with_hessian_callbacks_agrees_across_ranks(tmp_path, data_dir):
    out = tmp_path / "run"
    args = ["trainer=ddp_sim", "callbacks=abs", *SMALL_CALLBACKS, *TINY, "trainer.max_epochs=2",
            *where(tmp_path, data_dir), f"hydra.run.dir={out}",
            "+callbacks.dump._target_=tests.recipe_callbacks.DumpRankState", f"+callbacks.dump.dirpath={out}/ranks"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(out / "ranks" / f"rank_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [s["world_size"] for s in states] == [2, 2]
    # the batch each epoch trained with: duration=1 grows after every epoch (the authors' count), up to the cap 200
    assert states[0]["batch_sizes"] == states[1]["batch_sizes"] == [100, 200]
    assert states[0]["next_batch_size"] == states[1]["next_batch_size"] == 200
    assert states[0]["spectrum"] == states[1]["spectrum"] and len(states[0]["spectrum"]) == 2
    for name, value in states[0]["params"].items():
        assert torch.equal(value, states[1]["params"][name]), name
    assert (out / "hessian" / "spectrum_history.png").exists()


@pytest.mark.slow
@needs_submitit
def test_submitit_local_launch_of_one_job(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    result = run_script("train.py", ["-m", f"{LAUNCHER}=local", *TINY, *where(tmp_path, data_dir),
                                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").exists()
    logs = list((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 1 and "outputs: " + str(sweep / "0") in logs[0].read_text()


# ---- resume after SIGKILL -------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(tmp_path, data_dir):
    """A checkpoint at every training epoch end (8 steps); killed at step 12, in the middle of epoch 2 of 3;
    restarted with ckpt_path=last.

    The datamodule's shuffle depends on (seed, epoch) only, so the replayed epoch sees the same batches;
    the spectrum callback's history travels in the checkpoint. (A checkpoint taken in the last batch's
    on_train_batch_end, e.g. every_n_train_steps=8, would not do: Lightning does not rerun that epoch's
    on_train_epoch_end hooks after the restart, so the callbacks' epoch-end work would be skipped.)
    """
    common = [
        "data.num_train=400", "data.num_test=100",
        "data.batch_size=50", "trainer.max_epochs=3", "trainer.deterministic=true",
        "trainer.check_val_every_n_epoch=1", "callbacks=hessian", "callbacks.hessian_spectrum.probe_size=100",
        "callbacks.hessian_spectrum.top_k=1", "callbacks.hessian_spectrum.trace=false",
        "callbacks.hessian_spectrum.max_overhead=null", "callbacks.model_checkpoint.monitor=null",
        "+callbacks.model_checkpoint.save_on_train_epoch_end=true",
        *where(tmp_path, data_dir),
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "recipes" / "train.py")
    jobs = [
        subprocess.Popen([sys.executable, script, *common, f"hydra.run.dir={full}"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, script, *common, f"hydra.run.dir={killed}",
                          "+callbacks.kill._target_=tests.recipe_callbacks.KillAtStep", "+callbacks.kill.step=12"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    outputs = [job.communicate(timeout=240) for job in jobs]
    assert jobs[0].returncode == 0, outputs[0][1][-3000:]
    assert jobs[1].returncode == -9, outputs[1][1][-3000:]  # SIGKILL
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    # the resumed run composes the killed run's overrides (resume_argv) but for its killer
    resumed = run_script("train.py", [f"hydra.run.dir={killed}", "ckpt_path=last", "~callbacks.kill"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final(text: str) -> dict[str, str]:
        return dict(re.findall(r"^  (test/\S+): (\S+)$", text, re.M))

    assert final(resumed.stdout) == final(outputs[0][0]) and "test/acc" in final(resumed.stdout)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (full, killed))
    assert a["global_step"] == b["global_step"] == 24
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    key = next(k for k in a["callbacks"] if k.startswith("HessianSpectrumCallback"))
    histories = [[h["eigenvalues"][0] for h in ckpt["callbacks"][key]["history"]] for ckpt in (a, b)]
    # equal up to the Lanczos tolerance: the callback warm-starts from the last eigenvector, which the
    # checkpoint does not hold, so the resumed run's first probe starts from its seed vector instead
    assert histories[1] == pytest.approx(histories[0], rel=1e-4) and len(histories[0]) == 3

    def logged(run: Path) -> list[tuple[str, str]]:  # the (step, metric) of every value in metrics.csv
        with open(run / "csv" / "metrics.csv") as f:
            return sorted((row["step"], k) for row in csv.DictReader(f) for k, v in row.items()
                          if v and k not in ("step", "epoch"))

    assert logged(killed) == logged(full)  # the replayed steps once each, as in the uninterrupted run


# ---- quantize: HAWQ from a checkpoint, integer-only export ----------------------------------------------


@pytest.mark.slow
def test_quantize_recipe_meets_the_budget_and_exports_a_bit_exact_integer_model(tmp_path, data_dir):
    import json

    import numpy as np
    import onnxruntime

    data = ["data.num_train=400", "data.num_test=100", "data.batch_size=50"]
    train_dir = tmp_path / "train"
    recipes.train(compose_config("train", [*data, "trainer.max_epochs=3", "test=false"], train_dir, data_dir))
    out = tmp_path / "quantize"
    overrides = [*data, f"ckpt_path={train_dir}/checkpoints/last.ckpt", "hawq.probe_size=100",
                 "hawq.probe_batch_size=100", "hawq.max_samples=64", "trainer.max_epochs=1",
                 f"hawq.cache_dir={tmp_path}/cache"]
    cfg = compose_config("quantize", overrides, out, data_dir)
    report = recipes.quantize(cfg)
    assert json.loads((out / "quantize_report.json").read_text())["weight_bits"] == report["weight_bits"]
    assert (out / "quantize_report.md").exists() and (out / "hawq" / "hawq_report.png").exists()

    # the size budget: half-way between every layer at 4 bits and every layer at 8 (HAWQ-V3), biases at 32
    module = instantiate(cfg.model)
    layers = {name: m for name, m in module.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))}
    assert set(report["weight_bits"]) == set(layers) and set(report["weight_bits"].values()) <= {4, 8}

    def size_bits(bits: dict[str, int]) -> int:
        return sum(m.weight.numel() * bits[n] + 32 * m.bias.numel() for n, m in layers.items())

    half_way = (size_bits(dict.fromkeys(layers, 4)) + size_bits(dict.fromkeys(layers, 8))) / 2
    assert report["size_kb"]["quantized"] * 8192 == pytest.approx(size_bits(report["weight_bits"]))
    assert size_bits(report["weight_bits"]) <= half_way

    # onnxruntime runs the exported integer-only graph to the accuracy the report gives
    dm = instantiate(cfg.data)
    dm.setup("test")
    x, y = dm.test_set.tensors
    session = onnxruntime.InferenceSession(report["integer"]["path"])
    logits = session.run(None, {"input": x.numpy()})[0]
    assert float((np.argmax(logits, 1) == y.numpy()).mean()) == report["integer"]["test/acc"]
    assert abs(report["integer"]["test/acc"] - report["quantized"]["test/acc"]) <= 0.05


@pytest.mark.parametrize(
    "override, match",
    [
        ("export.format=tflite", "export.format: must be 'onnx', 'program' or 'none', got 'tflite'"),
        ("hawq.bit_choices=[4,9]", "hawq: .*bit_choices"),
        ("hawq.budgets.size=-1", r"hawq: budgets\['size'\] must be a finite number >= 0"),
        ("trainer=ddp_sim", "trainer.strategy: quantize cannot fine-tune in spawned or forked ranks"),
        ("data.batch_size=5000", "^data: batch_size=5000 exceeds the 4000 training samples"),
    ],
)
def test_quantize_bad_values_name_the_key(override, match, tmp_path, data_dir):
    cfg = compose_config("quantize", [f"ckpt_path={tmp_path}/fresh.ckpt", override], tmp_path, data_dir)
    torch.save({"state_dict": instantiate(cfg.model).state_dict()}, tmp_path / "fresh.ckpt")
    with pytest.raises(recipes.ConfigError, match=match):
        recipes.quantize(cfg)
