"""Training-time overhead of HessianSpectrumCallback on the MNIST-1D demo (CNN, 4000 samples, batch 100).

Runs the same training with no callback and with the callback at several schedules, interleaved, and
reports wall time, the ratio to the plain run, and the probes' own share (from the callback's history).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import lightning.pytorch as pl
import torch
from _common import command, machine, write_result

from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.data import MNIST1DDataModule
from lightning_hessian.models import MNIST1DCNN, ClassificationModule

SCHEDULES = {
    "no callback": None,
    "every epoch: top-1 + trace (Hutch++), 1024 probe (issue default)": dict(every_n_epochs=1),
    "every epoch: top-1 + trace (plain Hutchinson), 1024 probe": dict(every_n_epochs=1, trace_method="hutchinson"),
    "every epoch: top-1 only, 1024 probe": dict(every_n_epochs=1, trace=False),
    "every 5 epochs: top-1 + trace, 1024 probe": dict(every_n_epochs=5),
    "every 10 epochs: top-1 + trace, 512 probe": dict(every_n_epochs=10, probe_size=512),
}


def run(epochs: int, spectrum: dict | None) -> tuple[float, float, float]:
    pl.seed_everything(0)
    module = ClassificationModule(MNIST1DCNN(), optimizer=partial(torch.optim.Adam, lr=1e-2))
    callbacks = [HessianSpectrumCallback(plot=False, **spectrum)] if spectrum is not None else []
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=epochs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=MNIST1DDataModule(data_dir="data"))
    seconds = time.perf_counter() - start
    probe = sum(h["seconds"] for h in callbacks[0].history) if callbacks else 0.0
    return seconds, probe, float(trainer.callback_metrics["val/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SCHEDULES}
    for _ in range(args.repeats):
        for name, spectrum in SCHEDULES.items():
            times[name].append(run(args.epochs, spectrum))
    base = min(t for t, _, _ in times["no callback"])
    lines = [
        "# HessianSpectrumCallback overhead on the MNIST-1D demo",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"MNIST-1D CNN, 4000 train samples, batch 100, Adam 1e-2, {args.epochs} epochs; best of {args.repeats} "
        "interleaved runs per schedule; probe time is what the callback's own history records.",
        "",
        "| schedule | wall s | vs no callback | probe s | probe share of wall | val acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in times.items():
        seconds, probe, acc = min(runs)
        lines.append(f"| {name} | {seconds:.1f} | {seconds / base:.2f}x | {probe:.1f} | "
                     f"{probe / seconds:.0%} | {acc:.3f} |")
    write_result("spectrum_overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
