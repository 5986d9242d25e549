"""Boundary thickness after plain, FGSM-adversarial, mixup and noisy-mixup training (MNIST-1D CNN), and the
qualitative claims of Yang et al. ("Boundary thickness and robustness in learning models", NeurIPS 2020)
checked on it.

Per seed, five trainings identical but for the callbacks or the data: plain; FGSM replacing half of every batch
(L-inf eps 0.2, as in benchmarks/adversarial_training.py); mixup (alpha 1); noisy mixup (alpha 1, half of the
mixup partners uniform noise in the data's range); and plain on 1,000 instead of 4,000 training samples for as
many steps (4x the epochs: the "fewer samples" check). Every run logs the thickness of a fixed probe set of 256
training samples 25 times, at the same steps (BoundaryThicknessCallback), and the training and test accuracy
after every epoch. After training: the thickness of the 1,000 test samples (the same target
classes for every model), clean accuracy on the training and test sets, and test accuracy under PGD-10 in L-inf
(eps 0.2) and L2 (eps 1.0). Thickness: band 0 < p_i - p_j < 0.75, targeted L2 PGD-20 to eps 4 (input units,
standardised data), 128 midpoint cells, all inside the data's range.

Cross-check of the attack under the thickness: on every plain model the test thickness is also integrated along
the segments that torchattacks' PGDL2 (targeted, no random start, same eps, steps and step size, on the data
mapped onto [0, 1]) finds; the two should agree to the attacks' rounding.

Run: ``.venv/bin/python benchmarks/boundary_thickness.py`` (writes benchmarks/results/boundary_thickness.md;
torchattacks from ``make bench-setup``)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchattacks
from _common import command, machine, markdown_table, write_result
from torch import nn
from torch.utils.data import TensorDataset

from lightning_hessian import ClassificationModule, MNIST1DDataModule
from lightning_hessian.attacks import boundary_thickness, pgd, robust_accuracy
from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback
from lightning_hessian.callbacks.thickness import BoundaryThicknessCallback
from lightning_hessian.models import MNIST1DCNN

ROOT = Path(__file__).resolve().parents[1]
BAND = (0.0, 0.75)
THICKNESS = dict(eps=4.0, steps=20, num_points=128)


class AccuracyByEpoch(pl.Callback):
    """The epoch's running training accuracy and the test accuracy (the datamodule's validation set) per epoch."""

    def __init__(self):
        self.train, self.test = [], []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train.append(trainer.callback_metrics["train/acc"].item())
        self.test.append(trainer.callback_metrics["val/acc"].item())


def train(callbacks: list[pl.Callback], dm: MNIST1DDataModule, epochs: int, seed: int) -> tuple[nn.Module, float]:
    """Adam 1e-2 with a cosine schedule (the project's MNIST-1D recipe), validated on the test set after every
    epoch; returns the model and seconds."""
    pl.seed_everything(seed, verbose=False)
    module = ClassificationModule(
        MNIST1DCNN(), optimizer=partial(torch.optim.Adam, lr=1e-2),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return module.eval(), time.perf_counter() - start


def evaluate(model: nn.Module, dm: MNIST1DDataModule, steps: int) -> dict[str, float]:
    """Test thickness, clean training and test accuracy, PGD accuracy on the test set."""
    x, y = dm.test_set.tensors
    x_train, y_train = dm.train_set.tensors
    thick, by_label = (boundary_thickness(model, x, i, **THICKNESS, clamp=dm.input_range,
                                          generator=torch.Generator().manual_seed(0))
                       for i in (model(x).argmax(1).detach(), y))
    with torch.no_grad():
        clean, train_acc = ((model(a).argmax(1) == b).float().mean().item() for a, b in ((x, y), (x_train, y_train)))
    linf = partial(pgd, eps=0.2, steps=steps, clamp=dm.input_range, generator=torch.Generator().manual_seed(0))
    l2 = partial(pgd, eps=1.0, steps=steps, norm="l2", clamp=dm.input_range,
                 generator=torch.Generator().manual_seed(0))
    return {"thickness": thick.mean.item(), "thickness_se": thick.std_error.item(), "by_label": by_label.mean.item(),
            "reached": thick.reached.float().mean().item(), "clean": clean, "train_acc": train_acc,
            "pgd_linf": robust_accuracy(model, linf, [(x, y)]).item(),
            "pgd_l2": robust_accuracy(model, l2, [(x, y)]).item()}


class UnitInterval(nn.Module):
    """``net`` on ``(N, 1, 1, 40)`` inputs mapped affinely onto [0, 1] (torchattacks clamps there and takes image
    batches); L2 lengths scale by ``hi - lo``."""

    def __init__(self, net: nn.Module, lo: float, hi: float):
        super().__init__()
        self.net, self.lo, self.hi = net, lo, hi

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net((self.lo + u * (self.hi - self.lo)).flatten(1))


def cross_check(model: nn.Module, dm: MNIST1DDataModule) -> dict[str, float]:
    """The test thickness of ``model`` in float32 and float64: ours, and along the segments of torchattacks'
    targeted PGDL2 (same targets, eps, steps and step size; cross-entropy steps; in float64 its gradient-norm guard
    lowered from 1e-10 to 1e-300), integrated with the same midpoint rule."""
    x32 = dm.test_set.tensors[0]
    with torch.no_grad():
        i = model(x32).argmax(1)
    targets = (i + torch.randint(1, 10, i.shape, generator=torch.Generator().manual_seed(0))) % 10
    lo, hi = dm.input_range
    eps, steps, scale, n = THICKNESS["eps"], THICKNESS["steps"], hi - lo, THICKNESS["num_points"]
    result = {}
    for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64")):
        typed, x = copy.deepcopy(model).to(dtype), x32.to(dtype)
        result[f"ours {name}"] = boundary_thickness(typed, x, i, **THICKNESS, clamp=dm.input_range,
                                                    targets=targets).mean.item()
        attack = torchattacks.PGDL2(UnitInterval(typed, lo, hi), eps=eps / scale, alpha=2.5 * eps / steps / scale,
                                    steps=steps, random_start=False)
        attack.set_mode_targeted_by_label(quiet=True)
        if dtype == torch.float64:
            attack.eps_for_division = 1e-300
        x_adv = lo + attack(((x - lo) / scale).view(-1, 1, 1, x.shape[1]), targets).flatten(1) * scale
        inside = torch.zeros(len(x), dtype=dtype)
        with torch.no_grad():
            for k in range(n):
                p = typed(x + (k + 0.5) / n * (x_adv - x)).softmax(1)
                margin = p.gather(1, i[:, None]) - p.gather(1, targets[:, None])
                inside += ((margin > BAND[0]) & (margin < BAND[1])).squeeze(1).to(dtype)
        result[f"torchattacks {name}"] = ((x_adv - x).flatten(1).norm(dim=1) * inside / n).mean().item()
    return result


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected among continuous values)."""
    ranks = [torch.tensor(v).argsort().argsort().double() for v in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def verdict(differences: list[float]) -> str:
    """'holds' when every seed moves the expected way (positive), 'mixed' when the mean does, else 'does not hold'."""
    if all(d > 0 for d in differences):
        return "holds"
    return "mixed" if statistics.fmean(differences) > 0 else "does not hold"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--small-train", type=int, default=1000, help="training samples of the 'fewer samples' run")
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="MNIST-1D cache folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    data = {}
    for size in (4000, args.small_train):  # the small set: the first samples of the full one, the same test set
        dm = MNIST1DDataModule(data_dir=args.data_dir)
        dm.prepare_data()
        dm.setup("fit")
        dm.train_set = TensorDataset(*(t[:size] for t in dm.train_set.tensors))
        data[size] = dm
    small = f"plain, {args.small_train} samples"
    stretch = 4000 // args.small_train  # epochs of the small set per epoch of the full one: the same steps
    variants = {  # name: (training samples, callbacks)
        "plain": (4000, lambda s: []),
        "FGSM, fraction 0.5": (4000, lambda s: [AdversarialAugmentCallback("fgsm", eps=0.2, fraction=0.5, seed=s)]),
        "mixup": (4000, lambda s: [AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, seed=s)]),
        "noisy mixup": (4000, lambda s: [AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, mixup_noise=0.5,
                                                                    seed=s)]),
        small: (args.small_train, lambda s: []),
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    checks: list[dict[str, float]] = []
    for seed in range(args.seeds):
        for name, (size, callbacks) in variants.items():
            every = 4000 // size
            probe = BoundaryThicknessCallback(**THICKNESS, every_n_epochs=every, seed=0)
            accuracy = AccuracyByEpoch()
            model, seconds = train([*callbacks(seed), probe, accuracy], data[size], args.epochs * every, seed)
            record = evaluate(model, data[size], args.eval_steps)
            gap = [a - b for a, b in zip(accuracy.train, accuracy.test)][every - 1::every]  # at the probes' epochs
            record.update(seconds=seconds, curve=[h["thickness"] for h in probe.history], gap=gap,
                          probe_share=sum(h["seconds"] for h in probe.history) / seconds)
            results[name].append(record)
            if name == "plain":
                checks.append(cross_check(model, data[4000]))
            print(f"seed {seed} {name}: thickness {record['thickness']:.3f} (train probe {record['curve'][-1]:.3f}), "
                  f"clean {record['clean']:.3f}, PGD L-inf {record['pgd_linf']:.3f}, L2 {record['pgd_l2']:.3f}, "
                  f"{seconds:.1f} s", flush=True)

    def column(name: str, key: str) -> list[float]:
        return [r[key] for r in results[name]]

    header = ["training", "test thickness", "train-probe thickness", "reached %", "test thickness, i = label",
              "clean acc %", "train acc %",
              "PGD L-inf 0.2 acc %", "PGD L2 1.0 acc %", "thickness vs plain (per seed)", "train s (median)",
              "of which thickness probes %"]
    rows = []
    for name in variants:
        rs = results[name]
        delta = [r["thickness"] - p["thickness"] for r, p in zip(rs, results["plain"])]
        rows.append([name, mean_std(column(name, "thickness")), mean_std([r["curve"][-1] for r in rs]),
                     mean_std(column(name, "reached"), 100, 1), mean_std(column(name, "by_label")),
                     mean_std(column(name, "clean"), 100, 1),
                     mean_std(column(name, "train_acc"), 100, 1), mean_std(column(name, "pgd_linf"), 100, 1),
                     mean_std(column(name, "pgd_l2"), 100, 1), "-" if name == "plain" else mean_std(delta, digits=3),
                     f"{statistics.median(column(name, 'seconds')):.1f}",
                     mean_std(column(name, "probe_share"), 100, 0)])

    # claim 1: adversarial training, mixup and noisy mixup thicken the boundary (per-seed differences to plain)
    claims = []
    for name in ("FGSM, fraction 0.5", "mixup", "noisy mixup"):
        delta = [r["thickness"] - p["thickness"] for r, p in zip(results[name], results["plain"])]
        relative = [d / p["thickness"] for d, p in zip(delta, results["plain"])]
        claims.append([f"{name} thickens the boundary (test set)", verdict(delta),
                       f"{mean_std(delta, digits=3)} ({mean_std(relative, 100, 0)} %) vs plain"])
    # claim 2: thickness goes with robustness, over the twelve models of the four 4,000-sample trainings
    main_names = ["plain", "FGSM, fraction 0.5", "mixup", "noisy mixup"]
    thick = [r["thickness"] for n in main_names for r in results[n]]
    for key, label in (("pgd_linf", "PGD L-inf 0.2"), ("pgd_l2", "PGD L2 1.0")):
        rho = spearman(thick, [r[key] for n in main_names for r in results[n]])
        claims.append([f"thicker goes with more robust ({label} accuracy)",
                       "holds" if rho >= 0.5 else "weak" if rho > 0 else "does not hold",
                       f"Spearman rho {rho:+.2f} over {len(thick)} models"])
    # claim 3: thin boundaries with overfitting: late in training, and with fewer samples
    for name in ("plain", small):
        curves = [r["curve"] for r in results[name]]
        half = len(curves[0]) // 2
        fall = [c[half - 1] - c[-1] for c in curves]
        relative = [f / c[half - 1] for f, c in zip(fall, curves)]
        gap_growth = [r["gap"][-1] - r["gap"][half - 1] for r in results[name]]
        claims.append([f"{name}: the train-probe thickness falls in the second half of training, as the train-test "
                       "gap grows", verdict(fall) if all(g > 0 for g in gap_growth) else "gap does not grow",
                       f"falls by {mean_std(fall, digits=3)} ({mean_std(relative, 100, 0)} %) from the middle to the "
                       f"end, while the gap grows by {mean_std(gap_growth, 100, 1)} pts"])
    fewer = [p["thickness"] - s["thickness"] for s, p in zip(results[small], results["plain"])]
    fewer_probe = [p["curve"][-1] - s["curve"][-1] for s, p in zip(results[small], results["plain"])]
    gap = [r["train_acc"] - r["clean"] for r in results["plain"]]
    small_gap = [r["train_acc"] - r["clean"] for r in results[small]]
    claims.append([f"fewer samples ({args.small_train} vs 4000, as many steps): thinner boundary (test set; "
                   "training probe)", f"{verdict(fewer)}; {verdict(fewer_probe)}",
                   f"thinner by {mean_std(fewer, digits=3)}; by {mean_std(fewer_probe, digits=3)}; final train-test "
                   f"gap {mean_std(small_gap, 100, 1)} pts vs {mean_std(gap, 100, 1)} pts"])

    epochs_shown = sorted({0, *range(4, args.epochs, 5), args.epochs - 1})
    curve_rows = [[name, *(mean_std([r["curve"][e] for r in results[name]]) for e in epochs_shown)]
                  for name in variants]
    curve_rows += [[f"{name}: train - test acc (pts)", *(mean_std([r["gap"][e] for r in results[name]], 100, 1)
                                                           for e in epochs_shown)] for name in ("plain", small)]
    report = "\n\n".join([
        "## Boundary thickness after plain, adversarial, mixup and noisy-mixup training (MNIST-1D CNN)",
        f"Command: `{command()}`  \n"
        f"Machine: {machine(f'lightning {pl.__version__}', f'torchattacks {torchattacks.__version__}')}  \n"
        f"Total run time {time.perf_counter() - started:.0f} s.",
        f"MNIST1DCNN (25 channels), 4000 training / 1000 test samples (standardised, range "
        f"[{data[4000].input_range[0]:.2f}, {data[4000].input_range[1]:.2f}]), batch 100, Adam lr 1e-2 with cosine "
        f"decay, {args.epochs} epochs, seeds 0..{args.seeds - 1} (mean ± std over seeds). Thickness (Yang et al. "
        f"2020): band {BAND[0]:g} < p_i - p_j < {BAND[1]:g} along the segment from x (class i: the model's "
        f"prediction) to a targeted L2 PGD-{THICKNESS['steps']} point (eps {THICKNESS['eps']:g}) of a random other "
        f"class j, {THICKNESS['num_points']} midpoint cells, clamped to the data range; 'reached' is the share of "
        "the segments whose end the model assigns to j. Test thickness: the 1000 test samples, the same target "
        "offsets j - i for every model; 'i = label': the same with the labels as the classes i (which inaccurate "
        "models inflate: a misclassified sample can start inside the band); train-probe thickness: "
        "BoundaryThicknessCallback's 256 training samples after the last epoch. Robust accuracy: "
        f"PGD-{args.eval_steps}, one random start, on the test set. Mixup draws integer labels with probability "
        "lam (the callback's unbiased form of the mixup loss); noisy mixup labels its noise partners uniformly "
        "over the classes (the paper adds an 11th class instead).",
        markdown_table(header, rows),
        "### The paper's claims here",
        markdown_table(["claim", "verdict", "by how much (mean ± std over seeds)"], claims),
        "### Train-probe thickness by epoch",
        f"Epochs of the 4000-sample trainings; the {args.small_train}-sample training is measured at the same steps "
        f"(every {stretch} of its epochs). The last rows: the epoch's running training accuracy minus the test "
        "accuracy, for the plain trainings.",
        markdown_table(["training", *(f"epoch {e + 1}" for e in epochs_shown)], curve_rows),
        "### Cross-check of the attack",
        "Test thickness of the plain models along our segments (targeted L2 PGD on the log-odds against j, whose "
        "steps are the cross-entropy's in exact arithmetic) and along those of torchattacks' PGDL2 (on the "
        "cross-entropy, like the paper's code), in float32 and in float64 (there with torchattacks' guard against a "
        "zero gradient norm lowered from 1e-10 to 1e-300):",
        markdown_table(["segments", "float32", "float64", "float32 - float64, largest"], [
            [who, *(mean_std([c[f"{who} {p}"] for c in checks], digits=4) for p in ("float32", "float64")),
             f"{max(abs(c[f'{who} float32'] - c[f'{who} float64']) for c in checks):.1e}"]
            for who in ("ours", "torchattacks")]),
        f"Ours in float64 against torchattacks' in float64: largest difference "
        f"{max(abs(c['ours float64'] - c['torchattacks float64']) for c in checks):.1e}. Past the boundary the "
        "other classes soon hold less than 1e-7, where the float32 cross-entropy gradient p - e_j loses its j entry "
        "(p_j - 1 rounds to 0): its steps then wander and the segments end elsewhere, which moves the thickness "
        "(it depends on where a segment ends even past the band).",
    ])
    write_result("boundary_thickness", report)


if __name__ == "__main__":
    main()
