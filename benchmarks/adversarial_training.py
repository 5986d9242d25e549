"""Adversarial training with AdversarialAugmentCallback vs plain training, MNIST-1D CNN, in one run.

Three trainings per seed, identical except for the callback: plain; FGSM replacing half of every batch;
PGD-k replacing half of every batch (all at the same L-inf eps, in the standardised input units the model
sees; per-coordinate std of MNIST-1D is 1, so eps=0.2 is a fifth of a standard deviation). Each trained
model is then evaluated on the 1000 MNIST-1D test samples: clean accuracy and accuracy under PGD-10 (L-inf,
random start, step 2.5 eps / 10, clamped to the data range) at eps/2, eps and 2 eps. Means and standard
deviations over seeds; the gain/cost columns are per-seed differences to plain training, averaged.

Run: ``.venv/bin/python benchmarks/adversarial_training.py`` (writes benchmarks/results/adversarial_training.md)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import command, machine, markdown_table, write_result

from lightning_hessian import ClassificationModule, MNIST1DDataModule
from lightning_hessian.attacks import pgd, robust_accuracy
from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback
from lightning_hessian.models import MNIST1DCNN

ROOT = Path(__file__).resolve().parents[1]


def train(
    callbacks: list[pl.Callback], dm: MNIST1DDataModule, epochs: int, seed: int
) -> tuple[pl.LightningModule, float]:
    """Adam 1e-2 with a cosine schedule (the project's MNIST-1D recipe); returns the model and seconds."""
    pl.seed_everything(seed, verbose=False)
    module = ClassificationModule(
        MNIST1DCNN(), optimizer=partial(torch.optim.Adam, lr=1e-2),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return module.eval(), time.perf_counter() - start


def evaluate(module: pl.LightningModule, dm: MNIST1DDataModule, eps_list: list[float], steps: int) -> list[float]:
    """Clean test accuracy, then PGD-``steps`` accuracy at each eps (fixed random starts)."""
    x, y = dm.test_set.tensors
    with torch.no_grad():
        results = [(module(x).argmax(1) == y).float().mean().item()]
    for eps in eps_list:
        attack = partial(pgd, eps=eps, steps=steps, clamp=dm.input_range, generator=torch.Generator().manual_seed(0))
        results.append(robust_accuracy(module, attack, [(x, y)]).item())
    return results


def _mean_std(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}" if len(values) > 1 else f"{mean:.1f}"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eps", type=float, default=0.2, help="L-inf radius for training and evaluation")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--pgd-train-steps", type=int, default=5)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="MNIST-1D cache folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    dm = MNIST1DDataModule(data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("fit")
    eps_list = [args.eps / 2, args.eps, 2 * args.eps]
    k = args.pgd_train_steps
    variants = {
        "plain": lambda: [],
        f"FGSM, fraction {args.fraction}": lambda: [
            AdversarialAugmentCallback("fgsm", eps=args.eps, fraction=args.fraction)],
        f"PGD-{k}, fraction {args.fraction}": lambda: [
            AdversarialAugmentCallback("pgd", eps=args.eps, steps=k, fraction=args.fraction)],
    }
    results: dict[str, list[list[float]]] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for seed in range(args.seeds):
        for name, callbacks in variants.items():
            module, elapsed = train(callbacks(), dm, args.epochs, seed)
            results[name].append(evaluate(module, dm, eps_list, args.eval_steps))
            seconds[name].append(elapsed)
            print(f"seed {seed} {name}: clean/robust {[round(v, 3) for v in results[name][-1]]}, {elapsed:.1f} s",
                  flush=True)

    plain_time = statistics.median(seconds["plain"])
    header = ["training", "clean acc %", *(f"PGD-{args.eval_steps} acc % @ eps={e:g}" for e in eps_list),
              f"robust gain @ {args.eps:g} (pts)", "clean cost (pts)", "train s (median)", "time vs plain"]
    rows = []
    for name in variants:
        runs, median_s = results[name], statistics.median(seconds[name])
        gain = [r[2] - p[2] for r, p in zip(runs, results["plain"])]
        cost = [p[0] - r[0] for r, p in zip(runs, results["plain"])]
        rows.append([name, *(_mean_std([r[i] for r in runs]) for i in range(len(eps_list) + 1)),
                     _mean_std(gain) if name != "plain" else "-", _mean_std(cost) if name != "plain" else "-",
                     f"{median_s:.1f}", f"{median_s / plain_time:.2f}x"])

    report = "\n\n".join([
        "## Adversarial training with AdversarialAugmentCallback (MNIST-1D CNN)",
        f"Command: `{command()}`  \nMachine: {machine(f'lightning {pl.__version__}')}  \n"
        f"Total run time {time.perf_counter() - started:.0f} s.",
        f"MNIST1DCNN (25 channels), {dm.num_train} training / {dm.num_test} test samples (standardised, range "
        f"[{dm.input_range[0]:.2f}, {dm.input_range[1]:.2f}]), batch {dm.batch_size}, Adam lr 1e-2 with cosine "
        f"decay, {args.epochs} epochs, seeds 0..{args.seeds - 1} (mean ± std). The callback replaces "
        f"{args.fraction:g} of every batch with L-inf adversarial examples at eps={args.eps:g} (input units), "
        f"clamped to the data range (clamp='auto'). Evaluation: PGD-{args.eval_steps} L-inf, step 2.5 eps / "
        f"{args.eval_steps}, one random start, on all {dm.num_test} test samples. Training times are wall-clock "
        "on a shared machine, variants interleaved per seed; the ratio is indicative.",
        markdown_table(header, rows),
    ])
    write_result("adversarial_training", report)

if __name__ == "__main__":
    main()
