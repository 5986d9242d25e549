"""Data-free quantization (ZeroQ): calibration on real data, on distilled data and on Gaussian noise.

Two trained models, quantized after training with no fine-tune (post-training quantization, as ZeroQ):

- a CIFAR-style ResNet-20 (``resnet20(width=4)``) on the generated 32x32 task of ``hawq_table.py`` (same data,
  model and training, imported from there), 6 epochs;
- the MNIST-1D CNN with BatchNorm after every convolution (``MNIST1DCNN(channels=25, batch_norm=True)``), 40
  epochs. The default MNIST-1D CNN has no BatchNorm: there ``distill_data`` (and ``calibration="distilled"``)
  stops with an error saying so, since there are no statistics to distil from, so this table uses the BatchNorm
  variant.

Each model is quantized at uniform W8A8 and at a mixed W4/8 A8 plan (weights 4 or 8 bits per layer within
HAWQ-V3's size budget 0.5, activations 8 bits, planned with ZeroQ's KL sensitivity), with the sensitivity and the
activation ranges measured on 32 inputs of one of three kinds: real training samples, inputs distilled from the
model's BatchNorm statistics (``distill_data``: what ``HAWQModule(calibration="distilled")`` uses) and standard
Gaussian noise, each drawn with seeds 0, 1, 2. The MNIST-1D inputs are standardised, so the distillation keeps
ZeroQ's input prior (mean 0, std 1); the generated 32x32 images are not (their std is about 2.3), so the
ResNet-20 rows use no input prior (``input_prior=None``), and one more row shows ZeroQ's prior there.
"BN mismatch" is ``batchnorm_mismatch``'s worst layer (in running standard deviations) of the 32 inputs.

    python benchmarks/zeroq_table.py [--seeds 3] [--quick]

Writes benchmarks/results/zeroq_table.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from _common import command, machine, write_result
from hawq_table import accuracy, finetune, synthetic_images
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.models import MNIST1DCNN, ClassificationModule, resnet20
from lightning_hessian.quant.distill import batchnorm_mismatch, distill_data
from lightning_hessian.quant.hawq import HAWQModule
from lightning_hessian.quant.modules import quantizable_layers

NUM_SAMPLES = 32
CONFIGS = {"W8A8": {"bits": 8}, "W4/8 A8, size 0.5": {"budgets": {"size": 0.5}, "bit_choices": (4, 8)}}


def calibration_inputs(kind: str, module: ClassificationModule, x_train: torch.Tensor, seed: int,
                       input_prior: tuple[float, float] | None) -> tuple[torch.Tensor, float]:
    """32 inputs of ``kind`` (real / distilled / noise) drawn with ``seed``, and the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if kind == "real":
        x = x_train[torch.randperm(len(x_train), generator=g)[:NUM_SAMPLES]]
    elif kind == "noise":
        x = torch.randn((NUM_SAMPLES, *x_train.shape[1:]), generator=g)
    else:
        x = distill_data(module, tuple(x_train.shape[1:]), NUM_SAMPLES, seed=seed, input_prior=input_prior)
    return x, time.perf_counter() - start


def ptq_accuracy(module: ClassificationModule, x: torch.Tensor, test: DataLoader, cache: str, config: dict,
                 ) -> tuple[float, dict[str, int]]:
    """Test accuracy after planning (KL sensitivity) and calibrating on ``x`` alone; the weight bits."""
    with torch.no_grad():
        labels = module.eval()(x).argmax(-1)  # what a loss needs; KL and the ranges do not use them
    hawq = HAWQModule(module, act_bits=8, metric="kl", probe_data=[(x, labels)], cache_dir=cache,
                      report_dir=tempfile.mkdtemp(prefix="zeroq_report_"), **config)
    return accuracy(hawq, test), hawq.weight_bits


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} (sd {statistics.stdev(values):.2f})"


def margin(ours: list[float], other: list[float]) -> str:
    """The difference of the means with its standard error."""
    se = math.sqrt(statistics.variance(ours) / len(ours) + statistics.variance(other) / len(other))
    return f"{statistics.mean(ours) - statistics.mean(other):+.2f} ± {se:.2f}"


def run(name: str, module: ClassificationModule, x_train: torch.Tensor, test: DataLoader, seeds: list[int],
        input_prior: tuple[float, float] | None, prior_row: bool) -> str:
    """Every calibration kind x configuration x seed on the trained ``module``: a markdown section with its goals."""
    cache = tempfile.mkdtemp(prefix="zeroq_cache_")
    num_layers = len(quantizable_layers(module))
    kinds = [("real", "real training samples", input_prior, seeds), ("distilled", "distilled", input_prior, seeds),
             ("noise", "Gaussian noise N(0, 1)", input_prior, seeds)]
    if prior_row:
        kinds.append(("distilled", "distilled with ZeroQ's input prior (0, 1)", (0.0, 1.0), seeds[:1]))
    rows, accs, seconds = [], {}, {}
    for kind, label, prior, kind_seeds in kinds:
        accs[label] = {config: [] for config in CONFIGS}
        seconds[label], mismatch, eights = [], [], []
        for seed in kind_seeds:
            x, took = calibration_inputs(kind, module.net, x_train, seed, prior)
            seconds[label].append(took)
            mismatch.append(max(batchnorm_mismatch(module.net, x).values()))
            for config, kwargs in CONFIGS.items():
                acc, bits = ptq_accuracy(module, x, test, cache, kwargs)
                accs[label][config].append(acc)
                if "budgets" in kwargs:
                    eights.append(sum(b == 8 for b in bits.values()))
        took = f"{statistics.median(seconds[label]):.1f}" if kind == "distilled" else ""
        rows.append(f"| {label} | {len(kind_seeds)} | {mean_sd(accs[label]['W8A8'])} | "
                    f"{mean_sd(accs[label]['W4/8 A8, size 0.5'])} | {statistics.median(mismatch):.3f} | "
                    f"{', '.join(map(str, eights))} of {num_layers} | {took} |")
    real, distilled, noise = accs["real training samples"], accs["distilled"], accs["Gaussian noise N(0, 1)"]
    w8_gap = statistics.mean(distilled["W8A8"]) - statistics.mean(real["W8A8"])
    mix = "W4/8 A8, size 0.5"
    mixed = [d - n for d, n in zip(distilled[mix], noise[mix])]
    median_s = statistics.median(seconds["distilled"])
    return "\n".join([
        f"## {name}", "",
        f"FP32 test accuracy: {accuracy(module, test):.2f}%. Test accuracy % after quantization (mean and sd over "
        "the seeds); BN mismatch: median over the seeds; 8-bit layers of the mixed plan: per seed; distillation: "
        f"median seconds for the {NUM_SAMPLES} inputs.", "",
        f"| calibration inputs ({NUM_SAMPLES}) | seeds | W8A8 acc. % | W4/8 A8 (size 0.5) acc. % | BN mismatch | "
        "8-bit layers (mixed) | distillation s |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Goals (means over the same seeds):", "",
        f"- W8A8, distilled within 0.3 points of real: {margin(distilled['W8A8'], real['W8A8'])} -> "
        f"{'met' if w8_gap >= -0.3 else 'NOT met'}",
        f"- W4/8 A8, distilled clearly above noise: {margin(distilled[mix], noise[mix])} (per seed "
        f"{', '.join(f'{m:+.1f}' for m in mixed)}) -> "
        f"{'met' if min(mixed) > 0 and statistics.mean(mixed) > 1.0 else 'NOT met'} (\"clearly\": above on every "
        "seed and by more than a point on average)",
        f"- distillation under 30 s: {median_s:.1f} s (median) -> {'met' if median_s < 30 else 'NOT met'}", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="calibration draws (real, distilled, noise) per row")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run, not for the table)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*negative Hessian sensitivity.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    began, seeds, sections = time.perf_counter(), list(range(args.seeds)), []
    load_before = machine()

    x, y = synthetic_images(2000, seed=0)
    xt, yt = synthetic_images(1000, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    epochs = 2 if args.quick else 6
    module = ClassificationModule(
        resnet20(width=4), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs))
    finetune(module, train, epochs, seed=0)
    sections.append(run(f"ResNet-20 (width 4) on the generated 32x32 task, {epochs} epochs", module, x,
                        DataLoader(TensorDataset(xt, yt), batch_size=500), seeds, None, prior_row=True))

    x, y, xt, yt = load_mnist1d(4000, 1000, data_dir=Path(__file__).resolve().parents[1] / "data")
    train = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    torch.manual_seed(0)
    epochs = 6 if args.quick else 40
    module = ClassificationModule(MNIST1DCNN(channels=25, batch_norm=True),
                                  optimizer=partial(torch.optim.Adam, lr=1e-2),
                                  scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs))
    finetune(module, train, epochs, seed=0)
    sections.append(run(f"MNIST-1D CNN with BatchNorm (4000/1000 split), {epochs} epochs", module, x,
                        DataLoader(TensorDataset(xt, yt), batch_size=1000), seeds, (0.0, 1.0), prior_row=False))

    header = ["# Data-free quantization (ZeroQ): real vs distilled vs noise calibration", "",
              f"Command: `{command()}`  ", f"Machine at the start: {load_before}  ",
              f"Machine at the end: {machine()}  ",
              f"Total wall time: {time.perf_counter() - began:.0f} s (the CPU is shared with other jobs: the load "
              "figures above; times are wall-clock under that load)", "",
              "\n\n".join(__doc__.split("\n\n")[1:-2]), ""]
    write_result("zeroq_table", "\n".join(header + sections))


if __name__ == "__main__":
    main()
