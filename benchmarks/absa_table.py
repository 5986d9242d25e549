"""ABS / ABSA against BL, FB and GG on MNIST-1D: the seed paper's accuracy table and its wall-clock breakdown.

Table 1 has the structure of the ResNet-18 / CIFAR-10 table of Yao et al. (arXiv 1810.01021): a row for the
base batch (BL only), then one row per maximum batch (8x to 256x the base). In each row BL trains at that row's
batch, FB at it from the start (LR scaled linearly, warmed up), GG grows to it where the LR schedule decays, and
ABS and ABSA grow to it as the Hessian's top eigenvalue falls. Every method starts from the same base
hyper-parameters (the MNIST-1D CNN with BatchNorm, as the seed's networks have; SGD with momentum) and the
callback's defaults, with no per-method tuning. The schedule keeps the seed's proportions at ``--epochs`` (default
45, so that the whole benchmark fits in an hour on 2 CPU cores): the seed's 90 epochs with the LR x0.1 at epochs
30, 60 and 80, and the callback's epoch counts (ABS's ``duration`` of 10 epochs at one batch, FB's 5-epoch warmup)
scaled by ``epochs / 90``. Test accuracy mean ± std over seeds, optimizer steps mean over seeds. These runs are
single processes, ``--workers`` at a time.

Table 2 runs BL at the base batch and every method at the largest cap again, one run at a time on 2 processes
(forked DDP, gloo) so that the gradient all-reduces are real, and breaks each run's training time down with the
callback's own timers (``abs/*_seconds``). Speed-ups are the median over seeds of BL's time at the base batch over
the method's, both measured in the same seed's block of runs.

``--quick`` is a smoke run (9 epochs on 4,000 samples, caps 4x and 16x, one seed): it prints the tables and
writes no result file. ``--save-runs`` keeps every run's record; ``--reuse-runs`` takes those of a saved file
instead of running them again (to add ``--timing-seeds`` to a finished table within another hour, say);
``--rerun-timing`` runs table 2 again all the same (after a change to the probe's cost alone), ``--rerun-methods``
table 1's runs of the methods named (after a change to how they decide).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import command, machine, markdown_table, write_result
from lightning.pytorch.strategies import DDPStrategy

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.data import MNIST1DDataModule
from lightning_hessian.models import MNIST1DCNN, ClassificationModule

METHODS = ("BL", "FB", "GG", "ABS", "ABSA")
SCHEDULES = {"BL": "bl", "FB": "fb", "GG": "gg", "ABS": "abs", "ABSA": "abs"}
SEED_EPOCHS = 90
DECAYS = (1 / 3, 2 / 3, 8 / 9)  # the seed's LR decays at epochs 30, 60 and 80 of 90
DURATION, FB_WARMUP = 10, 5.0  # the callback's defaults, in epochs of the seed's 90


class Report(pl.Callback):
    """Rank 0 writes what the tables need at the end of fit (the main process of a forked DDP run never sees the
    callbacks' state)."""

    def __init__(self, path: Path, schedule: AdaptiveBatchSizeCallback):
        self.path, self.schedule = path, schedule

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({
                "steps": trainer.global_step, "timings": self.schedule.timings,
                "batches": [h["batch_size"] for h in self.schedule.history],
                "eigenvalues": [h["eigenvalue"] for h in self.schedule.history],
                "probe_hvps": [h.get("probe_hvps", 0) for h in self.schedule.history],
                "lower_bounds": [h.get("eigenvalue_lower_bound", False) for h in self.schedule.history],
                "probe_samples": self.schedule.state_dict()["probe"].get("size"),
            }))


def milestones(epochs: int) -> list[int]:
    return sorted({max(1, round(epochs * f)) for f in DECAYS})


def scaled_epochs(epochs: int) -> tuple[int, float]:
    """ABS's ``duration`` and FB's warmup epochs at the same share of an ``epochs``-long run as the defaults of
    the seed's 90."""
    return max(1, round(DURATION * epochs / SEED_EPOCHS)), FB_WARMUP * epochs / SEED_EPOCHS


def quiet() -> None:
    """Keep the log to one line per run: Lightning's banners and the warnings every run repeats."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*sync_dist=True.*", ".*LeafSpec.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=message)


def train(method: str, cap: int, seed: int, args: argparse.Namespace, devices: int = 1) -> dict[str, Any]:
    """One run: ``method`` with maximum batch ``cap`` (BL trains at ``cap``), on ``devices`` processes."""
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    module = ClassificationModule(
        MNIST1DCNN(batch_norm=args.batch_norm),
        optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=5e-4),
        scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones(args.epochs), gamma=0.1),
    )
    batch = cap if method == "BL" else args.base_batch
    data = MNIST1DDataModule(data_dir=args.data_dir, num_train=args.num_train, num_test=args.num_test,
                             batch_size=batch // devices, eval_batch_size=args.num_test, seed=42)
    duration, fb_warmup = scaled_epochs(args.epochs)
    schedule = AdaptiveBatchSizeCallback(max_batch_size=cap, schedule=SCHEDULES[method], adversarial=method == "ABSA",
                                         duration=duration, fb_warmup_epochs=fb_warmup, seed=seed, plot=False)
    strategy = DDPStrategy(start_method="fork", process_group_backend="gloo") if devices > 1 else "auto"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.json"
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=devices, strategy=strategy,
                             callbacks=[schedule, Report(path, schedule)], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=folder)
        trainer.fit(module, datamodule=data)
        result = json.loads(path.read_text())
    data.setup("test")
    x, y = data.test_set.tensors
    module.eval()
    with torch.no_grad():
        result["acc"] = 100 * (module(x).argmax(1) == y).float().mean().item()
    result.update(method=method, cap=cap, seed=seed, devices=devices)
    print(f"{method:4} cap {cap:5} seed {seed} x{devices}: {result['acc']:.2f}% in {result['steps']} steps, "
          f"{result['timings']['train_seconds']:.0f} s, last batch {result['batches'][-1]}", flush=True)
    return result


def _train_job(job: tuple[str, int, int, argparse.Namespace]) -> dict[str, Any]:
    return train(*job)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def accuracy_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cell(method: str, cap: int) -> str:
        group = [r for r in runs if r["method"] == method and r["cap"] == cap]
        return f"{mean_std([r['acc'] for r in group])} / {statistics.mean(r['steps'] for r in group):.0f}"

    header = ["BS (max)", *(f"{m} acc % / steps" for m in METHODS)]
    rows = [[f"{args.base_batch} (base)", cell("BL", args.base_batch), *["" for _ in METHODS[1:]]]]
    rows += [[f"{cap} ({cap // args.base_batch}x)", *(cell(m, cap) for m in METHODS)] for cap in args.max_batch_sizes]
    return markdown_table(header, rows)


def timing_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, dict[str, dict[str, float]]]:
    """The breakdown per method (means over seeds) and each method's median speed-up over BL at the base batch."""
    cap = args.max_batch_sizes[-1]
    base = {r["seed"]: r["timings"]["train_seconds"] for r in runs
            if r["method"] == "BL" and r["cap"] == args.base_batch}
    header = ["method (batch)", "acc %", "steps", "computation s", "communication s", "batch-size changes s",
              "Hessian s", "total s", "speed-up vs BL at base", "Hessian % of time"]
    rows, summary = [], {}
    for method, batch in [("BL", args.base_batch), *((m, cap) for m in METHODS)]:
        group = [r for r in runs if r["method"] == method and r["cap"] == batch]
        mean = {k: statistics.mean(r["timings"][k] for r in group) for k in group[0]["timings"]}
        speedup = statistics.median(base[r["seed"]] / r["timings"]["train_seconds"] for r in group)
        hessian = statistics.median(r["timings"]["hessian_seconds"] / r["timings"]["train_seconds"] for r in group)
        summary[f"{method} {batch}"] = {"speedup": speedup, "hessian": hessian}
        label = f"{method} ({batch})" if method != "BL" or batch == args.base_batch else f"BL ({batch}, at the cap)"
        rows.append([label, mean_std([r["acc"] for r in group]), f"{statistics.mean(r['steps'] for r in group):.0f}",
                     f"{mean['compute_seconds']:.1f}", f"{mean['communication_seconds']:.1f}",
                     f"{mean['resize_seconds']:.2f}", f"{mean['hessian_seconds']:.1f}", f"{mean['train_seconds']:.1f}",
                     f"{speedup:.2f}x", f"{100 * hessian:.1f}"])
    return markdown_table(header, rows), summary


def goals(runs: list[dict[str, Any]], timed: dict[str, dict[str, float]], args: argparse.Namespace) -> tuple[str, str]:
    """The summary line and the goal checks at the largest cap, computed from the tables' runs."""
    cap, base = args.max_batch_sizes[-1], args.base_batch

    def mean(method: str, batch: int, key: str) -> float:
        return statistics.mean(r[key] for r in runs if r["method"] == method and r["cap"] == batch)

    bl_acc, bl_steps = mean("BL", base, "acc"), mean("BL", base, "steps")
    ratio = {m: bl_steps / mean(m, cap, "steps") for m in METHODS}
    delta = {m: mean(m, cap, "acc") - bl_acc for m in METHODS}
    absa = timed[f"ABSA {cap}"]
    line = (f"ABSA: {ratio['ABSA']:.1f}x fewer steps than BL at batch {base}, accuracy {delta['ABSA']:+.1f} points, "
            f"wall-clock {absa['speedup']:.1f}x faster, Hessian {100 * absa['hessian']:.1f}% of time")
    checks = [
        ("ABSA within 0.5 points of BL at the base batch, >= 5x fewer steps (moonshot 10x)",
         delta["ABSA"] >= -0.5 and ratio["ABSA"] >= 5, f"{delta['ABSA']:+.2f} points, {ratio['ABSA']:.1f}x"),
        (f"BL at batch {cap} clearly worse", delta["BL"] <= -1, f"{delta['BL']:+.2f} points"),
        ("FB collapses or loses accuracy at the largest cap", delta["FB"] <= -1, f"{delta['FB']:+.2f} points"),
        ("GG needs more steps than ABSA", ratio["GG"] < ratio["ABSA"],
         f"GG {mean('GG', cap, 'steps'):.0f} vs ABSA {mean('ABSA', cap, 'steps'):.0f} steps"),
        ("ABSA wall-clock >= 3x faster than BL at the base batch, Hessian <= 3% of the time",
         absa["speedup"] >= 3 and absa["hessian"] <= 0.03,
         f"{absa['speedup']:.2f}x, Hessian {100 * absa['hessian']:.1f}%"),
    ]
    text = "\n".join(f"- {'met' if ok else 'NOT met'}: {what} ({figure})" for what, ok, figure in checks)
    return line, text


SETTINGS = ("epochs", "base_batch", "lr", "num_train", "num_test", "batch_norm")  # what a reused run must share


def reused_runs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The runs of an earlier ``--save-runs`` file (``--reuse-runs``), refused if made with other settings."""
    if not args.reuse_runs:
        return {"table_1": [], "table_2": []}
    saved = json.loads(Path(args.reuse_runs).read_text())
    settings = {key: getattr(args, key) for key in SETTINGS}
    if saved.setdefault("settings", settings) != settings:
        raise SystemExit(f"--reuse-runs {args.reuse_runs} was made with {saved['settings']}, not {settings}")
    return saved


def run(args: argparse.Namespace) -> str:
    """Both tables' runs (those not in ``--reuse-runs``), then the result text (ending with the summary line)."""
    torch.set_num_threads(1)
    quiet()
    MNIST1DDataModule(data_dir=args.data_dir, num_train=args.num_train, num_test=args.num_test).prepare_data()
    header_machine, start = machine(), time.perf_counter()
    saved = reused_runs(args)

    def take(table: str, jobs: list[tuple[str, int, int]]) -> tuple[list[dict[str, Any]], list[tuple[str, int, int]]]:
        """The saved runs of ``jobs`` and the jobs still to run."""
        have = {(r["method"], r["cap"], r["seed"]): r for r in saved[table]
                if table != "table_1" or r["method"] not in args.rerun_methods}
        return [have[j] for j in jobs if j in have], [j for j in jobs if j not in have]

    jobs = [("BL", args.base_batch, seed) for seed in args.seeds]
    jobs += [(m, cap, seed) for seed in args.seeds for cap in args.max_batch_sizes for m in METHODS]
    runs, jobs = take("table_1", jobs)
    order = {"BL": 5, "FB": 4, "GG": 2, "ABS": 1, "ABSA": 0}  # longest first, BL at the base batch first of all
    jobs.sort(key=lambda j: -1 if j[0] == "BL" and j[1] == args.base_batch else order[j[0]])
    with multiprocessing.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
        runs += pool.imap_unordered(_train_job, [(*job, args) for job in jobs])
    table_1_seconds = time.perf_counter() - start

    cap = args.max_batch_sizes[-1]
    timed_jobs = [job for seed in args.timing_seeds for job in [("BL", args.base_batch, seed)] + [(m, cap, seed)
                  for m in METHODS]]  # one block per seed: BL at the base batch, then every method at the cap
    timed_runs, timed_jobs = ([], timed_jobs) if args.rerun_timing else take("table_2", timed_jobs)
    timed_runs += [train(*job, args, devices=2) for job in timed_jobs]
    total_minutes = (time.perf_counter() - start) / 60
    if args.save_runs:
        Path(args.save_runs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_runs).write_text(json.dumps({"settings": {key: getattr(args, key) for key in SETTINGS},
                                                    "table_1": runs, "table_2": timed_runs}))
    note = f"{total_minutes:.0f} min in all ({table_1_seconds / 60:.0f} for table 1)"
    if args.reuse_runs:
        note += (f" for {len(jobs)} + {len(timed_jobs)} runs; the other {len(runs) - len(jobs)} + "
                 f"{len(timed_runs) - len(timed_jobs)} are from `{args.reuse_runs}` (an earlier run's --save-runs)")
    return report(runs, timed_runs, args, header_machine, note)


def probe_counts(runs: list[dict[str, Any]]) -> str:
    """How many products ABS's and ABSA's probes made in the timed runs, and how many stopped at a lower bound."""
    parts = []
    for method in ("ABS", "ABSA"):
        hvps = [n for r in runs if r["method"] == method for n in r.get("probe_hvps", []) if n]
        bounds = sum(b for r in runs if r["method"] == method for b in r.get("lower_bounds", []))
        if hvps:
            parts.append(f"{method} {len(hvps)} probes, {statistics.mean(hvps):.1f} products each on average, "
                         f"{bounds} stopped once the eigenvalue was known to lie above the growth threshold")
    return f"Probes in these runs: {'; '.join(parts)}." if parts else ""


def report(runs: list[dict[str, Any]], timed_runs: list[dict[str, Any]], args: argparse.Namespace,
           header_machine: str, duration_note: str) -> str:
    cap = args.max_batch_sizes[-1]
    table_2, timed = timing_table(timed_runs, args)
    line, checks = goals(runs, timed, args)
    by_seed = sorted(runs, key=lambda r: r["seed"])
    final = {m: [r["batches"][-1] for r in by_seed if r["method"] == m and r["cap"] == cap]
             for m in ("GG", "ABS", "ABSA")}
    probes = sorted({r["probe_samples"] for r in runs + timed_runs if r.get("probe_samples")})
    duration, fb_warmup = scaled_epochs(args.epochs)
    ms = milestones(args.epochs)
    text = [
        "# ABS / ABSA vs BL, FB, GG on MNIST-1D, and where the time goes",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {header_machine}; load {os.getloadavg()[0]:.2f} at the end; {duration_note}  ",
        f"MNIST-1D {args.num_train} train / {args.num_test} test, CNN {'with' if args.batch_norm else 'without'} "
        f"BatchNorm, SGD momentum 0.9, lr {args.lr} at batch {args.base_batch}, weight decay 5e-4; the seed's "
        f"schedule scaled to {args.epochs} epochs: LR x0.1 at epochs {', '.join(map(str, ms))}; seeds {args.seeds}. "
        "Callback defaults for every method, their epoch counts scaled likewise (ABS/ABSA: the top eigenvalue after "
        f"every epoch on a fixed probe set of {'/'.join(map(str, probes)) or 'no'} training samples, sized "
        f"automatically; grow x2 when it halves or after {duration} epoch(s) at one batch (10 of 90), LR scaled with "
        "the batch; ABSA: FGSM eps 0.1 on 20% of each batch, halved per growth, none in the second half or at the "
        f"cap; FB: LR scaled linearly, {fb_warmup:g}-epoch warmup (5 of 90); GG: the batch grows by the power of 2 "
        "nearest each LR decay, the LR keeps the rest). BL trains at the row's batch with the base LR.",
        "",
        "## Accuracy and optimizer steps (single process)",
        "",
        accuracy_table(runs, args),
        "",
        f"Last batch at the {cap} cap per seed: {json.dumps(final)}.",
        "",
        f"## Where the time goes: the {cap} cap on 2 processes (DDP, gloo), seeds {args.timing_seeds}",
        "",
        table_2,
        "",
        "Timers of `AdaptiveBatchSizeCallback` (rank 0, from train start to train end; means over seeds, the "
        "speed-up and Hessian share medians): communication = the gradient all-reduces, from a bucket's hand-over "
        "to its reduced values (waits for the other rank included); batch-size changes = loader rebuilds after a "
        "growth and the LR/batch updates; Hessian = the probes; computation = the rest (forward, backward, "
        "optimizer, data loading, Lightning's loop).",
        "",
        probe_counts(timed_runs),
        "",
        "## Goals (largest cap)",
        "",
        checks,
        "",
        line,
    ]
    return "\n".join(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=45, help="the seed's 90-epoch schedule scaled to this")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--timing-seeds", type=int, nargs="+", default=None,
                        help="seeds of the 2-process table (default: the first of --seeds)")
    parser.add_argument("--base-batch", type=int, default=64)
    parser.add_argument("--max-batch-sizes", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-test", type=int, default=4000)
    parser.add_argument("--no-batch-norm", dest="batch_norm", action="store_false")
    parser.add_argument("--workers", type=int, default=2, help="single-process runs at a time (table 1)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--save-runs", default=None, help="also write every run's record to this JSON file")
    parser.add_argument("--rerun-timing", action="store_true",
                        help="run table 2 again even where --reuse-runs holds its runs (after a change to the probe)")
    parser.add_argument("--rerun-methods", nargs="+", default=[], choices=METHODS,
                        help="run these methods' table-1 runs again even where --reuse-runs holds them")
    parser.add_argument("--reuse-runs", default=None,
                        help="take the runs this --save-runs file holds instead of running them again (e.g. to add "
                             "--timing-seeds)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (9 epochs, 4k samples, caps 4x and 16x, one seed): prints, writes no file")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.num_train, args.num_test = 9, [0], 4000, 1000
        args.max_batch_sizes = [256, 1024]
    args.timing_seeds = args.timing_seeds or args.seeds[:1]
    args.max_batch_sizes = sorted(args.max_batch_sizes)
    return args


def main() -> None:
    args = parse_args()
    text = run(args)
    if args.quick:
        print(text)
    else:
        write_result("absa_table", text)


if __name__ == "__main__":
    main()
