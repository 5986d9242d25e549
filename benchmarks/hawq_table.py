"""HAWQ mixed precision against uniform INT8/INT4 and random allocations, fine-tuned the same way.

Two models, each trained briefly in FP32 and then quantized by ``HAWQModule`` and fine-tuned for a few
epochs (quantization-aware, same optimizer and data order for every configuration):

- the MNIST-1D CNN (``MNIST1DCNN(channels=25)``) on the standard 4000/1000 split;
- a CIFAR-style ResNet-20 (``resnet20(width=4)``: 4/8/16 channels per stage) on a generated 32x32 RGB
  task (no CIFAR-10 copy is available offline): 10 classes, each a fixed smooth random colour pattern,
  seen under random contrast, a 0.5-weight distractor pattern of a random class, a random shift of up to
  6 pixels and Gaussian noise (sigma 2, per pixel, against unit-variance patterns); 2000 training and
  1000 test images. The width is 4, not 8: at width 8 uniform W4A4 cost only about 0.4 points after the
  fine-tune, inside the seed noise, so no allocation could show a margin; the narrower network has less
  redundancy and W4A4 costs it a few points. Its probe set is 256 samples (64 before: plans and
  activation ranges from 6 images per class were noisy).

FP32 training uses a cosine learning-rate schedule; the fine-tunes a constant learning rate 1/100 of
the training one, with several seeds (the spread between seeds is the noise floor of every margin).
Rows: FP32 (and FP32 fine-tuned like the others, the fair reference); uniform W8A8 and W4A4; HAWQ mixed
4/8 at HAWQ-V3 size budgets 0.25/0.5/0.75 of the way from all-4-bit to all-8-bit weights, planned with
three sensitivities side by side: "trace" (HAWQ-V2/V3, ``Tr(H_i)/n_i * ||dW_i||^2``), "quadratic" (the
exact ``dW_i^T H_ii dW_i``, one Hessian-vector product per layer and bit width) and "quadratic+act"
(that plus ``dA_i^T H_A dA_i``, the exact second-order cost of rounding the layer's input activations
to the same bits, ``H_A`` the Hessian w.r.t. that input); and random 4/8 allocations at the 0.5 budget
(``allocate_bits`` with i.i.d. uniform random sensitivities, so each fills the same budget as HAWQ does).

Activations follow the weights (``act_bits="follow"``, HAWQ-V3's setting): a layer at b bits has b-bit
weights and b-bit input activations (W4A4 / W8A8; residual additions stay at 8 bits). An earlier
version of this table kept every activation at 8 bits (W*A8): uniform 4-bit weights then cost almost
nothing after fine-tuning and every allocation tied within the seed noise, so the table could not tell
a good plan from a bad one. "trace" and "quadratic" price the weight half of W4A4 only (``dW_i``): they
do not see the rounding of a layer's input activations, which the same bits control; "quadratic+act"
prices both halves (each with the range ``QuantAct`` calibrates on the probe set). Every Omega is a
second-order prediction of the loss right after quantization (compare the PTQ column); the fine-tune
then recovers some layers more than others, which none of them models, so the best PTQ plan need not
stay the best after fine-tuning.

Size: weights of the conv/linear layers at their bits plus 32-bit biases (BatchNorm folds into them).
BOPS: per-sample ``MACs * b_w * b_a`` (32 x 32 for float). "PTQ" is the accuracy right after
quantization (activation ranges calibrated on the probe set), before fine-tuning; "sum Omega" is each
metric's objective, the summed predicted loss increase of the allocation.

    python benchmarks/hawq_table.py [--seeds 5] [--quick]

Writes benchmarks/results/hawq_table.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import command, machine, write_result
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.models import MNIST1DCNN, ClassificationModule, resnet20
from lightning_hessian.probe_set import draw_probe_indices, probe_batches
from lightning_hessian.quant.allocation import allocate_bits, allocation_total
from lightning_hessian.quant.costs import budget_between, layer_stats, model_bops, model_size, size_costs
from lightning_hessian.quant.hawq import HAWQModule

BUDGETS = (0.25, 0.5, 0.75)
METRICS = ("trace", "quadratic", "quadratic+act")
TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, num_sanity_val_steps=0)


def synthetic_images(n: int, seed: int, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated 32x32 task of the module docstring (class patterns are fixed; ``seed`` draws samples)."""
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.randn(num_classes, 3, 4, 4, generator=g), size=32, mode="bicubic")
    protos = (protos - protos.mean((1, 2, 3), keepdim=True)) / protos.std((1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    distractor = torch.randint(0, num_classes, (n,), generator=g)
    x = protos[y] * torch.empty(n, 1, 1, 1).uniform_(0.6, 1.2, generator=g) + 0.5 * protos[distractor]
    shifts = torch.randint(-6, 7, (n, 2), generator=g).tolist()
    x = torch.stack([torch.roll(img, tuple(s), (1, 2)) for img, s in zip(x, shifts)])
    return x + 2.0 * torch.randn(x.shape, generator=g), y


def accuracy(module: pl.LightningModule, test: DataLoader) -> float:
    metrics = pl.Trainer(**TRAINER).test(module, test, verbose=False)[0]
    return 100.0 * metrics["test/acc"]


def random_allocations(stats, budget_fraction: float, count: int) -> list[dict[str, int]]:
    """Allocations filling the same size budget as HAWQ, chosen by i.i.d. uniform random sensitivities."""
    costs = {"size": size_costs(stats, (4, 8))}
    budget = {"size": budget_between(costs["size"], budget_fraction)}
    out = []
    for seed in range(count):
        rng = random.Random(seed)
        sens = {name: {4: rng.random(), 8: 0.0} for name in stats}
        out.append(allocate_bits(sens, costs, budget))
    return out


@dataclass
class Row:
    """One table row: its bits (None: float), test accuracy before (PTQ) and after fine-tuning per seed."""

    label: str
    bits: dict[str, int] | None
    accs: list[float]
    seconds: float
    ptq: float | None = None

    @property
    def mean(self) -> float:
        return statistics.mean(self.accs)


def finetune(module: pl.LightningModule, train: DataLoader, epochs: int, seed: int, batches: int | None = None
             ) -> float:
    """Fit ``module`` (``epochs``, at most ``batches`` per epoch) with a fixed seed; return the seconds."""
    pl.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    pl.Trainer(max_epochs=epochs, limit_train_batches=batches, **TRAINER).fit(module, train)
    return time.perf_counter() - start


def run(name: str, module: ClassificationModule, train: DataLoader, test: DataLoader, example: torch.Tensor,
        epochs: int, tune: dict, hawq_kwargs: dict, num_seeds: int) -> str:
    """Train FP32, then quantize and fine-tune every configuration; return a markdown section.

    ``tune`` holds the fine-tune's ``epochs``, ``batches`` (per epoch) and ``optimizer``. FP32 + fine-tune,
    uniform W8A8/W4A4 and HAWQ at 0.5 (every metric) are fine-tuned with seeds ``0..num_seeds-1``, random
    allocation ``i`` with seed ``i``, HAWQ at 0.25/0.75 with seed 0: every comparison in the goals averages
    the same seeds.
    """
    train_s = finetune(module, train, epochs, seed=0)
    stats = layer_stats(module, example)
    seeds = list(range(num_seeds))
    rows = [Row("FP32", None, [accuracy(module, test)], train_s), Row("FP32 + same fine-tune", None, [], 0.0)]
    for seed in seeds:
        tuned = copy.deepcopy(module)
        tuned.optimizer_factory, tuned.scheduler_factory = tune["optimizer"], None
        rows[-1].seconds += finetune(tuned, train, tune["epochs"], seed, tune["batches"]) / num_seeds
        rows[-1].accs.append(accuracy(tuned, test))
    probe_size = hawq_kwargs.pop("probe_size")
    probe = probe_batches(train.dataset, draw_probe_indices(len(train.dataset), probe_size, seed=0), probe_size)
    hawq_args = {"cache_dir": tempfile.mkdtemp(prefix="hawq_cache_"), "act_bits": "follow", **hawq_kwargs}
    report_dir = tempfile.mkdtemp(prefix="hawq_reports_")  # HAWQModule's own report files, not kept
    configs = [("uniform W8A8", {"bits": 8}, seeds), ("uniform W4A4", {"bits": 4}, seeds)]
    configs += [(f"HAWQ {metric} 4/8, size {f}", {"budgets": {"size": f}, "metric": metric},
                 seeds if f == 0.5 else [0]) for metric in METRICS for f in BUDGETS]
    configs += [(f"random 4/8 #{i + 1}, size 0.5", {"bits": bits}, [i])
                for i, bits in enumerate(random_allocations(stats, 0.5, num_seeds))]
    reports, sensitivity, plan_s = {}, {}, {}
    for label, kwargs, row_seeds in configs:
        row = Row(label, None, [], 0.0)
        for seed in row_seeds:
            hawq = HAWQModule(module, optimizer=tune["optimizer"], probe_data=probe, report_dir=report_dir,
                              **hawq_args, **kwargs)
            if row.ptq is None:  # this test run plans and quantizes (calibrated on the probe set): PTQ accuracy
                start = time.perf_counter()
                row.ptq = accuracy(hawq, test)
                row.bits = hawq.weight_bits
                if "metric" in kwargs:
                    plan_s.setdefault(kwargs["metric"], time.perf_counter() - start)
                    reports[label] = hawq.bit_report().to_markdown()
                    sensitivity.setdefault(kwargs["metric"], hawq.sensitivity)
            else:  # the same quantized start as the first seed, without another PTQ test pass
                hawq.quantize(row.bits)
                hawq.calibrate(probe)
            row.seconds += finetune(hawq, train, tune["epochs"], seed, tune["batches"]) / len(row_seeds)
            row.accs.append(accuracy(hawq, test))
        rows.append(row)
    return format_section(name, stats, rows, reports, sensitivity, plan_s, epochs, tune, num_seeds, probe_size)


def format_section(name, stats, rows, reports, sensitivity, plan_s, epochs, tune, num_seeds, probe_size) -> str:
    by_label = {row.label: row for row in rows}
    randoms = [row for row in rows if row.label.startswith("random")]
    random_accs = [row.accs[0] for row in randoms]
    per_epoch = f", {tune['batches']} batches each" if tune["batches"] else ""
    lines = [f"## {name}", "",
             f"FP32 training: {epochs} epochs. Every other row: {tune['epochs']} fine-tune epoch(s){per_epoch} "
             f"from the FP32 weights. Probe set (sensitivities and activation ranges): {probe_size} training "
             "samples.", "",
             "| configuration | test acc. % | PTQ acc. % | "
             + "".join(f"sum Omega {metric} | " for metric in METRICS)
             + "size KB | vs FP32 | MBOPS/sample | vs FP32 | s per fit |",
             "|---|---:|---:|" + "---:|" * len(METRICS) + "---:|---:|---:|---:|---:|"]
    omegas = [sensitivity[metric].omega(metric) for metric in METRICS]
    float_size, float_bops = model_size(stats, None, "bytes"), model_bops(stats, None)
    for row in rows:
        size = model_size(stats, row.bits, "bytes")
        bops = model_bops(stats, row.bits)  # activations follow the weights: MACs * b * b
        shown = f"{row.accs[0]:.1f}"
        if len(row.accs) > 1:
            shown = f"{row.mean:.2f} (sd {statistics.stdev(row.accs):.2f}, {len(row.accs)} seeds)"
        before = "" if row.ptq is None else f"{row.ptq:.1f}"
        predicted = ["" if row.bits is None else f"{allocation_total(omega, row.bits):.3g}" for omega in omegas]
        lines.append(f"| {row.label} | {shown} | {before} | {' | '.join(predicted)} | {size / 1024:.2f} | "
                     f"{float_size / size:.2f}x | {bops / 1e6:.2f} | {float_bops / bops:.1f}x | {row.seconds:.1f} |")
    mean_random, mean_random_ptq = statistics.mean(random_accs), statistics.mean(row.ptq for row in randoms)
    distinct = len({tuple(sorted(row.bits.items())) for row in randoms})
    lines.append(f"| random 4/8, size 0.5: mean of {len(randoms)} ({distinct} distinct allocations) | "
                 f"{mean_random:.2f} (sd {statistics.stdev(random_accs):.2f}) | {mean_random_ptq:.2f} |"
                 + " |" * (len(METRICS) + 5))
    int8, int4, ref = by_label["uniform W8A8"], by_label["uniform W4A4"], by_label["FP32 + same fine-tune"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def beats(ours: list[float], other: list[float]) -> str:
        """The margin of the means with its standard error; "met" only beyond two standard errors."""
        margin = statistics.mean(ours) - statistics.mean(other)
        se = math.sqrt(statistics.variance(ours) / len(ours) + statistics.variance(other) / len(other))
        label = "met" if margin > 2 * se else "NOT met" if margin < -2 * se else "a tie (within 2 SE)"
        return f"{margin:+.2f} ± {se:.2f} -> {label}"

    lines += ["", f"Goals (margins in accuracy points ± their standard error, means over the same {num_seeds} "
              f"fine-tune seeds; the random mean over {len(randoms)} allocations, one seed each; \"met\" only "
              "beyond two standard errors):", "",
              f"- INT8 (W8A8) within 0.3 points of FP32: {int8.mean - ref.mean:+.2f} against FP32 with the same "
              f"fine-tune ({int8.mean - by_label['FP32'].mean:+.2f} against the trained FP32) -> "
              f"{verdict(int8.mean - ref.mean >= -0.3)}"]
    for metric in METRICS:
        hawq = by_label[f"HAWQ {metric} 4/8, size 0.5"]
        lines += [f"- HAWQ ({metric}) at 0.5 beats uniform W4A4: {beats(hawq.accs, int4.accs)}; beats the mean "
                  f"random allocation at 0.5: {beats(hawq.accs, random_accs)}; before fine-tuning (PTQ): "
                  f"{hawq.ptq - int4.ptq:+.1f} and {hawq.ptq - mean_random_ptq:+.2f}"]
    lines += [f"- random allocations at 0.5 after fine-tuning: best {max(random_accs):.1f}, worst "
              f"{min(random_accs):.1f}", ""]
    trace = sensitivity["trace"]
    timings = ", ".join(f"{plan_s[metric]:.1f} s ({metric})" for metric in METRICS)
    lines += [f"Sensitivity, trace: {trace.num_samples} Hutchinson probes, {trace.num_hvps} HVPs, converged: "
              f"{trace.converged}; quadratic: {sensitivity['quadratic'].num_hvps} HVPs (layers x bit widths); "
              f"quadratic+act: {sensitivity['quadratic+act'].num_hvps} (the same for the weights, as many w.r.t. "
              f"the layer inputs). Measure + plan + quantize + one PTQ test pass: {timings}. The other budgets "
              "and seeds re-plan from the on-disk cache.", ""]
    for metric in METRICS:
        lines += [f"HAWQ plan at size 0.5, {metric} metric:", "", reports[f"HAWQ {metric} 4/8, size 0.5"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="fine-tune seeds, and random allocations at 0.5")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run, not for the table)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*val_dataloader.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    began = time.perf_counter()
    sections = []

    x, y, xt, yt = load_mnist1d(4000, 1000, data_dir=Path(__file__).resolve().parents[1] / "data")
    train = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    test = DataLoader(TensorDataset(xt, yt), batch_size=1000)
    torch.manual_seed(0)
    epochs = 6 if args.quick else 40
    module = ClassificationModule(MNIST1DCNN(channels=25), optimizer=partial(torch.optim.Adam, lr=1e-2),
                                  scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs))
    sections.append(run(
        "MNIST-1D CNN (4000/1000 split)", module, train, test, x[:2], epochs,
        {"epochs": 1 if args.quick else 3, "batches": None, "optimizer": partial(torch.optim.Adam, lr=1e-4)},
        {"probe_size": 1000}, args.seeds,
    ))

    x, y = synthetic_images(2000, seed=0)
    xt, yt = synthetic_images(1000, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(xt, yt), batch_size=500)
    torch.manual_seed(0)
    epochs = 2 if args.quick else 6
    module = ClassificationModule(
        resnet20(width=4), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs))
    sections.append(run(
        "ResNet-20 (width 4) on the generated 32x32 task", module, train, test, x[:2], epochs,
        {"epochs": 1, "batches": 4 if args.quick else 16, "optimizer": partial(torch.optim.SGD, lr=5e-4, momentum=0.9)},
        {"probe_size": 256, "max_samples": 64, "trace_rel_tol": 0.1}, args.seeds,
    ))

    header = ["# HAWQ mixed precision vs uniform and random allocations", "",
              f"Command: `{command()}`  ", f"Machine: {machine()}  ",
              f"Total wall time: {time.perf_counter() - began:.0f} s", "",
              "\n\n".join(__doc__.split("\n\n")[1:-2]), ""]
    write_result("hawq_table", "\n".join(header + sections))


if __name__ == "__main__":
    main()
