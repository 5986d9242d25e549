"""Speed-up to a target test accuracy against batch size, SGD and K-FAC, on the MNIST-1D CNN: Fig. 2 of
"Inefficiency of K-FAC for Large Batch Size Training" (Ma et al., AAAI 2020) at small scale.

For every batch size B (64 to 8192, doubling) and each optimizer (SGD with momentum 0.9; the same SGD with every
gradient preconditioned by our ``KFACPreconditioner``: empirical factors every step, eigendecompositions every 10
steps, damping 0.3 chosen by a few trial runs at batch 64 and 2048, KL clip lr^2) the learning rate is tuned by a
small search on a factor-2 grid: start from the previous batch size's best rate times sqrt(2) (the first batch size
from a fixed guess), try half and double, and extend in the better direction while it keeps improving (at most
``--max-runs`` runs per point). A run counts the optimizer steps until the test accuracy (evaluated every few steps,
on 2000 held-out samples) first reaches the target; it stops as soon as it can no longer beat the best run of its
point (or, still near chance accuracy after half its budget, as diverged). The speed-up of B is the steps at the
smallest batch size over the steps at B (each optimizer against itself, as in the paper's figure); perfect scaling
doubles it with every doubling of B.

Run: ``.venv/bin/python benchmarks/kfac_batch_size.py`` (12 to 27 minutes on 2 shared cores; writes
benchmarks/results/kfac_batch_size.md and .png); ``--quick`` for a smoke run (3 batch sizes, a lower target).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, command, machine, markdown_table, write_result

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.models import MNIST1DCNN
from lightning_hessian.optim import KFACPreconditioner

KFAC = dict(factor_update_steps=1, inv_update_steps=10, damping=0.3, factor_decay=0.95)
START_LR = {"SGD": 0.1, "K-FAC": 0.2}
CHANCE = 0.3  # a run whose best test accuracy is still below this after half its cap has diverged


@dataclass
class Run:
    lr: float
    steps: int | None  # to the target; None when it did not get there within its cap
    best_acc: float
    seconds: float


def train(method: str, batch: int, lr: float, data: tuple[torch.Tensor, ...], target: float, cap: int,
          seed: int) -> Run:
    """Steps of ``method`` at ``batch`` and ``lr`` until the test accuracy reaches ``target`` (at most ``cap``)."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = MNIST1DCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    # KL clip lr^2: the preconditioned gradient's step is capped at the same Fisher norm whatever the rate, so the
    # rate scales the step at every batch size (a fixed clip would fix the step of large batches, where it binds)
    precond = KFACPreconditioner(model, kl_clip=lr**2, **KFAC) if method == "K-FAC" else None
    gen = torch.Generator().manual_seed(seed)
    perm, at = torch.randperm(len(x), generator=gen), 0
    every = max(1, min(10, 2048 // batch))  # test evaluations: cheap against the steps between them
    best, start = 0.0, time.perf_counter()
    for step in range(1, cap + 1):
        if at + batch > len(x):
            perm, at = torch.randperm(len(x), generator=gen), 0
        idx = perm[at : at + batch]
        at += batch
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if precond is not None:
            precond.step(opt)
        opt.step()
        if step % every == 0 or step == cap:
            with torch.no_grad():
                acc = float((model(xt).argmax(1) == yt).float().mean())
            if not math.isfinite(float(model.classifier.weight.detach().sum())):
                break  # diverged
            best = max(best, acc)
            if acc >= target:
                return Run(lr, step, best, time.perf_counter() - start)
            if best < CHANCE and step >= max(20, cap // 2):
                break
    return Run(lr, None, best, time.perf_counter() - start)


def tune(method: str, batch: int, guess: float, data: tuple[torch.Tensor, ...], target: float, cap: int,
         max_runs: int, seed: int) -> tuple[Run | None, list[Run]]:
    """Search the learning rate on a factor-2 grid around ``guess``; each run capped by the best so far."""
    runs: dict[float, Run] = {}

    def attempt(lr: float) -> Run:
        best = min((r.steps for r in runs.values() if r.steps is not None), default=cap)
        runs[lr] = train(method, batch, lr, data, target, best, seed)
        print(f"  {method:6s} B={batch:5d} lr={lr:.4g}: {runs[lr].steps} steps "
              f"(best acc {runs[lr].best_acc:.3f}, {runs[lr].seconds:.0f} s)", flush=True)
        return runs[lr]

    def score(lr: float) -> float:
        r = runs[lr]
        return r.steps if r.steps is not None else math.inf

    for lr in (guess, guess / 2, guess * 2):
        attempt(lr)
    while len(runs) < max_runs:
        lrs = sorted(runs)
        best = min(lrs, key=score)
        if math.isinf(score(best)):
            break  # nothing reached the target: no direction to follow
        if best == lrs[0]:
            attempt(best / 2)
        elif best == lrs[-1]:
            attempt(best * 2)
        else:
            break  # the best rate has a slower one on either side
    reached = [r for r in runs.values() if r.steps is not None]
    return (min(reached, key=lambda r: r.steps) if reached else None), sorted(runs.values(), key=lambda r: r.lr)


def plot(batches: list[int], best: dict[str, dict[int, Run | None]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in (("SGD", "o"), ("K-FAC", "s")):
        points = [(b, r.steps) for b in batches if (r := best[method][b]) is not None]
        if not points:
            continue
        bs, steps = zip(*points)
        left.plot(bs, steps, marker=marker, label=method)
        right.plot(bs, [steps[0] / s for s in steps], marker=marker, label=method)
    b0 = batches[0]
    right.plot(batches, [b / b0 for b in batches], "k--", label="perfect scaling")
    for ax, ylabel in ((left, f"steps to {100 * target:.0f}% test accuracy"), (right, f"speed-up over batch {b0}")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("MNIST-1D CNN: SGD and K-FAC, learning rate tuned per batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 batch sizes, lower target: a smoke run")
    parser.add_argument("--target", type=float, default=None, help="test accuracy to reach (default 0.85)")
    parser.add_argument("--max-runs", type=int, default=5, help="learning rates tried per point at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = args.target or (0.7 if args.quick else 0.85)
    batches = [64, 512, 4096] if args.quick else [64 * 2**i for i in range(8)]
    num_train = 8000 if args.quick else 32000
    x, y, xt, yt = load_mnist1d(num_train, 2000, data_dir=args.data_dir)
    data = (x, y, xt, yt)
    started = time.perf_counter()
    best: dict[str, dict[int, Run | None]] = {"SGD": {}, "K-FAC": {}}
    tried: dict[str, dict[int, list[Run]]] = {"SGD": {}, "K-FAC": {}}
    for method in ("SGD", "K-FAC"):
        guess, cap = START_LR[method], 3000
        for batch in batches:
            winner, runs = tune(method, batch, guess, data, target, cap, args.max_runs, args.seed)
            best[method][batch], tried[method][batch] = winner, runs
            if winner is not None:
                guess = winner.lr * math.sqrt(2)
                cap = 4 * winner.steps  # a larger batch should not need more steps than this
    seconds = time.perf_counter() - started

    rows = []
    for batch in batches:
        row = [str(batch)]
        for method in ("SGD", "K-FAC"):
            r, base = best[method][batch], best[method][batches[0]]
            if r is None:
                row += ["not reached", "", "", str(len(tried[method][batch]))]
                continue
            speedup = base.steps / r.steps if base is not None else math.nan
            row += [str(r.steps), f"{speedup:.1f}", f"{r.lr:.3g}", str(len(tried[method][batch]))]
        s, k = best["SGD"][batch], best["K-FAC"][batch]
        row.append(f"{s.steps / k.steps:.2f}" if s is not None and k is not None else "")
        rows.append(row)
    header = ["batch", "SGD steps", "SGD speed-up", "SGD lr", "SGD runs", "K-FAC steps", "K-FAC speed-up",
              "K-FAC lr", "K-FAC runs", "SGD steps / K-FAC steps"]
    name = "kfac_batch_size" if not args.quick else "kfac_batch_size_quick"
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(exist_ok=True)
    plot(batches, best, png, target)
    total_runs = sum(len(v) for m in tried.values() for v in m.values())
    report = "\n".join([
        "# K-FAC vs SGD: steps to a target accuracy against batch size (MNIST-1D CNN)",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Data: MNIST-1D {num_train} train / 2000 test (seed 42); target test accuracy {100 * target:.0f}%; model "
        f"seed {args.seed}. K-FAC: {KFAC}, KL clip lr^2. {total_runs} runs in {seconds / 60:.1f} min "
        "(learning-rate search as described in the script; every run stops once it cannot beat its point's best).",
        f"Plot: `benchmarks/results/{png.name}`",
        "",
        markdown_table(header, rows),
        "",
        *verdict(batches, best),
    ])
    write_result(name, report)


def verdict(batches: list[int], best: dict[str, dict[int, Run | None]]) -> list[str]:
    """Where each optimizer's returns diminish: the speed-up gained from one batch size to the next."""
    lines = ["Speed-up gained from one batch size to the next (perfect scaling: their ratio, 2.0 for a doubling):",
             ""]
    for method in ("SGD", "K-FAC"):
        gains = []
        for small, large in zip(batches, batches[1:]):
            a, b = best[method][small], best[method][large]
            gains.append(f"{small}->{large}: {a.steps / b.steps:.2f}" if a is not None and b is not None else
                         f"{small}->{large}: -")
        lines.append(f"- {method}: " + ", ".join(gains))
    return lines


if __name__ == "__main__":
    main()
