"""ABS / ABSA against the BL, FB and GG baselines on MNIST-1D (the structure of the ABSA paper's table).

Every method starts from the same base hyper-parameters (SGD with momentum, step decay of the LR at 50%
and 75% of training, the same base batch) with no per-method tuning, at several maximum batch sizes, over
several seeds. Reports test accuracy (mean ± std over seeds) and optimizer steps, and the Hessian probe's
share of ABS's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch
from _common import command, machine, write_result

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.data import MNIST1DDataModule
from lightning_hessian.models import MNIST1DCNN, ClassificationModule

METHODS = ("BL", "FB", "GG", "ABS", "ABSA")


def train(method: str, max_batch: int, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed)
    milestones = [args.epochs // 2, args.epochs * 3 // 4]
    module = ClassificationModule(
        MNIST1DCNN(),
        optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=5e-4),
        scheduler=partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones, gamma=0.1),
    )
    data = MNIST1DDataModule(data_dir="data", num_train=args.num_train, num_test=args.num_test,
                             batch_size=args.base_batch, seed=42)
    schedule = {"BL": "bl", "FB": "fb", "GG": "gg", "ABS": "abs", "ABSA": "abs"}[method]
    abs_cb = AdaptiveBatchSizeCallback(max_batch_size=max_batch, schedule=schedule, adversarial=method == "ABSA",
                                       probe_size=args.probe_size, seed=seed, plot=False)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[abs_cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=args.epochs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    acc = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    return {"acc": 100 * acc, "steps": trainer.global_step, "seconds": seconds, "probe": abs_cb.probe_seconds,
            "final_batch": abs_cb.batch_size}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base-batch", type=int, default=64)
    parser.add_argument("--max-batch-sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-test", type=int, default=4000)
    parser.add_argument("--probe-size", type=int, default=None, help="default: the callback's (sized automatically)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for seed in args.seeds:
        baseline = train("BL", args.base_batch, seed, args)
        for max_batch in args.max_batch_sizes:
            results.setdefault(("BL", max_batch), []).append(baseline)
            for method in METHODS[1:]:
                results.setdefault((method, max_batch), []).append(train(method, max_batch, seed, args))
                print(method, max_batch, seed, results[(method, max_batch)][-1], flush=True)
    header = "| BS (max) | " + " | ".join(f"{m} acc % / iters" for m in METHODS) + " |"
    lines = [
        "# ABS / ABSA vs BL, FB, GG on MNIST-1D",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"MNIST-1D {args.num_train} train / {args.num_test} test, CNN, SGD momentum 0.9, lr {args.lr}, "
        f"weight decay 5e-4, LR x0.1 at epochs {args.epochs // 2} and {args.epochs * 3 // 4}, "
        f"{args.epochs} epochs, base batch {args.base_batch}, seeds {args.seeds}; callback defaults "
        "(decay_ratio 2, duration 10, factor 2; ABSA: FGSM eps 0.1 on 20% of each batch, halved per growth). "
        "Accuracy mean ± std over seeds; iters = optimizer steps.",
        "",
        header,
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for max_batch in args.max_batch_sizes:
        cells = []
        for method in METHODS:
            runs = results[(method, max_batch)]
            steps = statistics.mean(r["steps"] for r in runs)
            cells.append(f"{mean_std([r['acc'] for r in runs])} / {steps:.0f}")
        lines.append(f"| {max_batch} ({max_batch // args.base_batch}x) | " + " | ".join(cells) + " |")
    abs_runs = [r for m in ("ABS", "ABSA") for b in args.max_batch_sizes for r in results[(m, b)]]
    share = sum(r["probe"] for r in abs_runs) / sum(r["seconds"] for r in abs_runs)
    final = {b: [r["final_batch"] for r in results[("ABS", b)]] for b in args.max_batch_sizes}
    lines += ["", f"Hessian probe share of ABS/ABSA wall time: {share:.1%}. ABS final batch per seed: {final}."]
    write_result("absa_table", "\n".join(lines))


if __name__ == "__main__":
    main()
