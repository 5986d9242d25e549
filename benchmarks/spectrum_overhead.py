"""Training-time overhead of HessianSpectrumCallback on MNIST-1D (the demo's CNN and data, batch 100).

Runs the same training with no callback and with the callback at several schedules, interleaved, and
reports wall time, the ratio to the plain run, the probes' own share and Hessian-vector products (from the
callback's history), and the epoch size at which each schedule would cost 5%. It also times one HVP on the
probe set against one training epoch: the floor under any schedule that probes every epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch
from _common import command, machine, write_result

from lightning_hessian.callbacks.probe import cross_entropy_loss
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.data import MNIST1DDataModule
from lightning_hessian.hessian import HessianOperator
from lightning_hessian.models import MNIST1DCNN, ClassificationModule

SCHEDULES = {
    "no callback": None,
    "every epoch: top-1 + trace (Krylov-deflated, default), 1024 probe (issue default)": dict(every_n_epochs=1),
    "every epoch: top-1 + trace (Hutch++), 1024 probe": dict(every_n_epochs=1, trace_method="hutch++"),
    "every epoch: top-1 + trace (plain Hutchinson), 1024 probe": dict(every_n_epochs=1, trace_method="hutchinson"),
    "every epoch: top-1 only, 1024 probe": dict(every_n_epochs=1, trace=False),
    "every epoch, max_overhead=0.05: top-1 + trace, 1024 probe": dict(every_n_epochs=1, max_overhead=0.05),
    "every 10 epochs: top-1 + trace, 512 probe": dict(every_n_epochs=10, probe_size=512),
}


def run(epochs: int, spectrum: dict | None) -> tuple[float, HessianSpectrumCallback | None, float, pl.Trainer]:
    pl.seed_everything(0)
    module = ClassificationModule(MNIST1DCNN(), optimizer=partial(torch.optim.Adam, lr=1e-2))
    callback = HessianSpectrumCallback(plot=False, **spectrum) if spectrum is not None else None
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback] if callback else [], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         check_val_every_n_epoch=epochs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=MNIST1DDataModule(data_dir="data"))
    return time.perf_counter() - start, callback, float(trainer.callback_metrics["val/acc"]), trainer


def one_hvp_seconds(trainer: pl.Trainer, probe: int = 1024, repeats: int = 10) -> float:
    """Median time of one HVP (from scratch: one probe's first one) on ``probe`` of ``trainer``'s training samples."""
    module = trainer.lightning_module
    x, y = next(iter(torch.utils.data.DataLoader(trainer.datamodule.train_dataloader().dataset, batch_size=probe)))
    module.eval()
    times = []
    for _ in range(repeats):
        op = HessianOperator(module, cross_entropy_loss, [(x, y)], hvp="reverse")
        v = torch.randn(op.dim)
        start = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[tuple[float, HessianSpectrumCallback | None, float]]] = {name: [] for name in SCHEDULES}
    for _ in range(args.repeats):
        for name, spectrum in SCHEDULES.items():
            seconds, callback, acc, trainer = run(args.epochs, spectrum)
            runs[name].append((seconds, callback, acc))
            if spectrum is None:
                plain = trainer
    base = statistics.median(seconds for seconds, _, _ in runs["no callback"])
    epoch = base / args.epochs
    train_samples = len(plain.datamodule.train_dataloader().dataset)
    hvp = one_hvp_seconds(plain)
    lines = [
        "# HessianSpectrumCallback overhead on MNIST-1D (the demo's CNN and data)",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"MNIST-1D CNN, {train_samples} train samples, batch 100, Adam 1e-2, {args.epochs} epochs; the median of "
        f"{args.repeats} interleaved runs per schedule (by wall time); probe time and HVPs are what the "
        "callback's own history records. Break-even: the epoch size (train samples at this model's speed) at "
        "which the schedule's probes cost 5% of training.",
        "",
        "| schedule | wall s | vs no callback | probes run | HVPs per probe | probe s | probe share of wall "
        "| 5% break-even epoch | val acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in runs.items():
        seconds, callback, acc = sorted(results, key=lambda r: r[0])[len(results) // 2]
        history = callback.history if callback else []
        probe = sum(h["seconds"] for h in history)
        hvps = f"{sum(h['hvps'] for h in history) / len(history):.0f}" if history else ""
        per_epoch = probe / args.epochs
        even = f"{per_epoch / 0.05 / epoch * train_samples:,.0f} samples" if history else ""
        lines.append(f"| {name} | {seconds:.1f} | {seconds / base:.2f}x | {len(history)} | {hvps} | {probe:.1f} | "
                     f"{probe / seconds:.0%} | {even} | {acc:.3f} |")
    lines += [
        "",
        f"One HVP on the 1,024-sample probe (from scratch) takes {hvp * 1e3:.0f} ms; one epoch of the plain run "
        f"takes {epoch * 1e3:.0f} ms, so a single HVP per epoch already costs {hvp / epoch:.0%} of training, and "
        f"probing every epoch within 5% needs epochs of at least {hvp / 0.05 / epoch * train_samples:,.0f} "
        "samples even at one HVP per probe. So on this data set the issue's 5% target cannot be met by any "
        "every-epoch schedule, only by probing less often; ``max_overhead=0.05`` skips what the budget cannot "
        "pay for, but always runs the first probe (its cost is unknown before), which alone is more than 5% of "
        "a run this short.",
    ]
    write_result("spectrum_overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
