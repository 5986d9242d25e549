"""benchmarks/absa_table.py: the schedule's scaling, the tables and the goal checks on hand-made runs, and (slow) a
tiny end-to-end run."""

import json
import logging
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import absa_table  # noqa: E402

from tests.helpers.config import compose_config  # noqa: E402

CAPS = [512, 4096]


def timings(train: float, hessian: float = 0.0) -> dict[str, float]:
    return {"hessian_seconds": hessian, "resize_seconds": 0.5, "communication_seconds": 2.0,
            "train_seconds": train, "compute_seconds": train - hessian - 2.5}


def record(method: str, cap: int, seed: int, acc: float, steps: int, train: float = 100.0, hessian: float = 0.0):
    return {"method": method, "cap": cap, "seed": seed, "acc": acc, "steps": steps, "batches": [64, cap],
            "timings": timings(train, hessian), "probe_samples": 256 if method.startswith("ABS") else None}


def make_runs(absa_steps: int = 1000, absa_acc: tuple[float, float] = (97.0, 98.0)) -> list[dict]:
    """Two seeds: BL at the base batch 97.5 ± 0.7 % in 10,000 steps; at the largest cap BL 90/91 %, FB 50/52 %,
    GG 97/98 % in 3,000 steps, ABS 97/97 % and ABSA ``absa_acc`` in ``absa_steps``."""
    runs = [record("BL", 64, seed, acc, 10_000) for seed, acc in ((0, 97.0), (1, 98.0))]
    accs = {"BL": (90.0, 91.0), "FB": (50.0, 52.0), "GG": (97.0, 98.0), "ABS": (97.0, 97.0), "ABSA": absa_acc}
    steps = {"BL": 20, "FB": 20, "GG": 3000, "ABS": 1200, "ABSA": absa_steps}
    for cap in CAPS:
        for method in absa_table.METHODS:
            runs += [record(method, cap, seed, accs[method][seed], steps[method]) for seed in (0, 1)]
    return runs


def make_timed_runs() -> list[dict]:
    """BL at the base batch takes 100 s (seed 0) and 200 s (seed 1); ABSA 20 s and 50 s (4 s and 5 s Hessian):
    speed-ups 5x and 4x, Hessian 20% and 10%."""
    runs = [record("BL", 64, 0, 97.0, 10_000, 100.0), record("BL", 64, 1, 98.0, 10_000, 200.0)]
    for method in absa_table.METHODS:
        seconds = ((20.0, 4.0), (50.0, 5.0)) if method == "ABSA" else ((40.0, 0.0), (40.0, 0.0))
        runs += [record(method, 4096, seed, 95.0, 100, *times) for seed, times in enumerate(seconds)]
    return runs


def args(**overrides):
    return absa_table.parse_args(["--max-batch-sizes", *map(str, CAPS), "--seeds", "0", "1",
                                  *[f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]])


def test_the_seed_schedule_keeps_its_proportions():
    assert absa_table.milestones(90) == [30, 60, 80] and absa_table.milestones(45) == [15, 30, 40]
    assert absa_table.scaled_epochs(90) == (10, 5.0)
    assert absa_table.scaled_epochs(45) == (5, 2.5)
    assert absa_table.scaled_epochs(4) == (1, 5 * 4 / 90)  # never below one epoch at a batch size


def test_bl_trains_at_each_rows_batch():
    table = absa_table.accuracy_table(make_runs(), args())
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| 64 (base) | 97.5 ± 0.7 / 10000 |")
    assert rows[1].startswith("| 512 (8x) | 90.5 ± 0.7 / 20 | 51.0 ± 1.4 / 20 | 97.5 ± 0.7 / 3000 | 97.0 ± 0.0 / 1200")
    assert rows[2].startswith("| 4096 (64x) | 90.5 ± 0.7 / 20 |")


def test_the_time_table_pairs_each_seed_with_its_own_baseline():
    table, summary = absa_table.timing_table(make_timed_runs(), args())
    assert summary["ABSA 4096"] == pytest.approx({"speedup": 4.5, "hessian": 0.15})  # medians of 5x, 4x; 20%, 10%
    assert summary["BL 64"] == pytest.approx({"speedup": 1.0, "hessian": 0.0})
    absa_row = next(row for row in table.splitlines() if row.startswith("| ABSA"))
    # means: computation (20 - 4 - 2.5 + 50 - 5 - 2.5) / 2, communication 2, changes 0.5, Hessian 4.5, total 35
    assert absa_row == "| ABSA (4096) | 95.0 ± 0.0 | 100 | 28.0 | 2.0 | 0.50 | 4.5 | 35.0 | 4.50x | 15.0 |"
    assert "| BL (4096, at the cap) |" in table


def test_goals_and_the_summary_line():
    _, timed = absa_table.timing_table(make_timed_runs(), args())
    line, checks = absa_table.goals(make_runs(), timed, args())
    assert line == ("ABSA: 10.0x fewer steps than BL at batch 64, accuracy +0.0 points, wall-clock 4.5x faster, "
                    "Hessian 15.0% of time")
    assert re.fullmatch(r"ABSA: [\d.]+x fewer steps than BL at batch \d+, accuracy [+-][\d.]+ points, "
                        r"wall-clock [\d.]+x faster, Hessian [\d.]+% of time", line)
    verdicts = [row.split(":")[0] for row in checks.splitlines()]
    # accuracy and steps met; BL at the cap -7 points; FB -46.5; GG 3,000 > 1,000 steps; Hessian 15% > 3%
    assert verdicts == ["- met", "- met", "- met", "- met", "- NOT met"]
    _, checks = absa_table.goals(make_runs(absa_steps=4000, absa_acc=(96.5, 97.0)), timed, args())
    assert "NOT met: ABSA within 0.5 points" in checks and "(-0.75 points, 2.5x)" in checks
    assert "NOT met: GG needs more steps than ABSA (GG 3000 vs ABSA 4000 steps)" in checks


def test_quick_is_a_smoke_run_that_writes_no_file(monkeypatch):
    written = []
    monkeypatch.setattr(absa_table, "write_result", lambda *a: written.append(a))
    monkeypatch.setattr(absa_table, "run", lambda a: f"ran {a.epochs} epochs, caps {a.max_batch_sizes}")
    monkeypatch.setattr(sys, "argv", ["absa_table.py", "--quick"])
    absa_table.main()
    assert written == []
    monkeypatch.setattr(sys, "argv", ["absa_table.py"])
    absa_table.main()
    assert written == [("absa_table", "ran 45 epochs, caps [512, 4096, 16384]")]


@pytest.mark.slow
def test_a_tiny_table_runs_end_to_end(data_dir, capsys):
    """Every method trains, ABS/ABSA grow (duration 1), the DDP runs time their all-reduces, the text ends with
    the summary line."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    try:
        text = absa_table.run(absa_table.parse_args([
            "--epochs", "3", "--num-train", "1024", "--num-test", "256", "--max-batch-sizes", "128", "256",
            "--seeds", "0", "--data-dir", str(data_dir)]))
    finally:
        lightning_log.setLevel(level)  # run() quiets Lightning's banners
    print(text)
    assert re.search(r"\| 256 \(4x\) \| [\d.]+ ± 0\.0 / 12 \| [\d.]+ ± 0\.0 / 12 \|", text)  # BL and FB at 256: 4 x 3
    assert 'Last batch at the 256 cap per seed: {"GG": [256], "ABS": [256], "ABSA": [256]}' in text
    absa_row = next(row for row in text.splitlines() if row.startswith("| ABSA (256)"))
    communication, hessian = (float(cell) for cell in absa_row.split("|")[5:8:2])
    assert communication > 0 and hessian > 0
    assert re.fullmatch(r"ABSA: [\d.]+x fewer steps than BL at batch 64, accuracy [+-][\d.]+ points, "
                        r"wall-clock [\d.]+x faster, Hessian [\d.]+% of time", text.splitlines()[-1])


def test_the_sweep_config_has_the_benchmarks_schedule(tmp_path, data_dir):
    cfg = compose_config("train", ["experiment=absa_table"], tmp_path, data_dir)
    bench = absa_table.parse_args([])
    assert cfg.trainer.max_epochs == bench.epochs
    assert list(cfg.model.scheduler.milestones) == absa_table.milestones(bench.epochs)
    schedule = cfg.callbacks.adaptive_batch_size
    assert (schedule.duration, schedule.fb_warmup_epochs) == absa_table.scaled_epochs(bench.epochs)
    assert (cfg.data.batch_size, cfg.model.optimizer.lr) == (bench.base_batch, bench.lr)


def test_saved_runs_are_reused_and_only_the_missing_ones_run(tmp_path, data_dir, monkeypatch):
    """--reuse-runs with one more timing seed trains only that seed's 2-process block; other settings are refused."""
    settings = ["--max-batch-sizes", "512", "4096", "--seeds", "0", "1", "--num-train", "1024", "--num-test", "256",
                "--data-dir", str(data_dir)]
    saved = tmp_path / "runs.json"
    timed = [dict(r, seed=0, devices=2) for r in make_timed_runs() if r["seed"] == 0]
    saved.write_text(json.dumps({"table_1": make_runs(), "table_2": timed}))
    trained = []

    def train(method, cap, seed, args, devices=1):
        trained.append((method, cap, seed, devices))
        return next(dict(r, seed=seed, cap=cap, devices=devices) for r in timed if r["method"] == method)

    monkeypatch.setattr(absa_table, "train", train)
    args = absa_table.parse_args([*settings, "--timing-seeds", "0", "1", "--reuse-runs", str(saved),
                                  "--save-runs", str(saved)])
    text = absa_table.run(args)
    assert trained == [("BL", 64, 1, 2)] + [(m, 4096, 1, 2) for m in absa_table.METHODS]
    assert "the other 22 + 6 are from" in text and "seeds [0, 1]" in text
    assert json.loads(saved.read_text())["settings"]["num_train"] == 1024  # saved again, with its settings
    trained.clear()  # --rerun-timing: table 1 from the file, table 2 (both seeds' blocks) trained again
    text = absa_table.run(absa_table.parse_args([*settings, "--timing-seeds", "0", "1", "--reuse-runs", str(saved),
                                                 "--rerun-timing"]))
    assert trained == [(m, c, seed, 2) for seed in (0, 1) for m, c in [("BL", 64)] + [(m, 4096) for m in
                                                                                   absa_table.METHODS]]
    assert "the other 22 + 0 are from" in text
    # --rerun-methods: those methods' table-1 runs (2 caps x 2 seeds each) trained again, table 2 from the file
    text = absa_table.run(absa_table.parse_args([*settings, "--timing-seeds", "0", "1", "--reuse-runs", str(saved),
                                                 "--rerun-methods", "ABS", "ABSA", "--workers", "1"]))
    assert "for 8 + 0 runs; the other 14 + 12 are from" in text
    with pytest.raises(SystemExit, match="was made with"):
        absa_table.run(absa_table.parse_args([*settings, "--epochs", "30", "--reuse-runs", str(saved)]))
