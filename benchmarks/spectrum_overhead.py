"""Training-time overhead of HessianSpectrumCallback at its defaults, on four kinds of fit, and its accuracy.

For each model the same training runs with no callback and with ``HessianSpectrumCallback()`` (no arguments),
interleaved and repeated, and once with the former default schedule (a full probe every epoch: top-1 and the
Krylov-deflated trace on 1,024 samples, eig_tol 1e-3, no budget; on ResNet-20, where that probe alone would take
the better part of an hour on a CPU, one product on its 1,024 samples is timed instead). Reported: wall time and
its ratio to the plain run, the probes' own share of the wall time, probes run (full / eigenvalue-only) and
skipped, products per probe, the probe set's size, and the accuracy of every reported top eigenvalue: after each
probe a tight cold Lanczos run (tol 1e-8) on the same probe set gives the exact value (outside the timed and
budgeted time).

Models: the MNIST-1D demo CNN (its data, batch 100, Adam, 20 epochs); ResNet-20 on generated 32x32 images
(batch 128); an MNIST-1D MLP on 20,000 samples at batch 8 (2,500 steps per epoch); a HuggingFace-style
transformer classifier on dict batches (``input_ids``, ``attention_mask``, ``labels``; ``hessian_loss`` is the
model's own ``.loss``). For the transformer the peak memory of a probe is compared with a training step's
(fresh processes, peak RSS above the loaded state): the default probe collates the probe set in batches of the
training batch size; the former default took one batch of 1,024.

Run: ``.venv/bin/python benchmarks/spectrum_overhead.py`` (writes benchmarks/results/spectrum_overhead.md)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import command, machine, markdown_table, write_result
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hessian.callbacks.hessian_probe import HessianProbe
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.data import MNIST1DDataModule
from lightning_hessian.hessian import HessianOperator, top_eigenvalues
from lightning_hessian.hessian.summary import SpectrumOptions
from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP, ClassificationModule, resnet20
from lightning_hessian.no_trace import leave_no_trace

OLD_DEFAULT = dict(max_overhead=None, probe_size=1024, probe_batch_size=1024, eig_tol=1e-3)
OLD_MIN_PRODUCTS = 30  # the former default's fewest products per probe: 20 Krylov steps, then 10 trace probes


# ---- models and data -------------------------------------------------------------------------------------


class Images(pl.LightningDataModule):
    """32x32 colour images of 10 classes: a fixed random prototype per class plus noise (learnable, generated)."""

    def __init__(self, num_train: int, batch_size: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        prototypes = F.avg_pool2d(torch.randn(10, 3, 32, 32, generator=g), 5, 1, 2)
        labels = torch.randint(0, 10, (num_train,), generator=g)
        self.train_set = TensorDataset(prototypes[labels] + 0.5 * torch.randn(num_train, 3, 32, 32, generator=g),
                                       labels)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class TokenClassifier(nn.Module):
    """A small BERT-like classifier called the HuggingFace way: ``model(**batch)`` returns ``.loss``, ``.logits``."""

    def __init__(self, vocab: int = 64, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.encoder(self.embed(input_ids) + self.position, src_key_padding_mask=attention_mask == 0)
        logits = self.head(hidden[:, 0])
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


class Sentences(Dataset):
    """Token sequences (padded at the end) labelled by whether token 1 occurs more often than token 2."""

    def __init__(self, n: int, length: int = 32, vocab: int = 64):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, vocab, (n, length), generator=g)
        marks = torch.randint(0, 3, (n, length), generator=g)
        self.ids[marks == 1], self.ids[marks == 2] = 1, 2
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids[:, 0] = 0  # the [CLS] position
        self.ids *= self.mask
        self.labels = (((self.ids == 1) * self.mask).sum(1) > ((self.ids == 2) * self.mask).sum(1)).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TextClassifier(pl.LightningModule):
    """How HuggingFace fine-tuning modules are written: dict batches, the model's own loss, no ``forward``."""

    def __init__(self, num_train: int = 4096, batch_size: int = 32):
        super().__init__()
        self.model = TokenClassifier()
        self.num_train, self.batch_size = num_train, batch_size

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def hessian_loss(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Sentences(self.num_train), batch_size=self.batch_size, shuffle=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def setups(args: argparse.Namespace) -> dict[str, dict]:
    """name: a factory of (module, datamodule or None), its epochs, and the former default's epochs (one where
    its every-epoch probe of 1,024 samples takes minutes; none where it would take hours: there one product on
    those samples is timed instead)."""
    def demo():
        return ClassificationModule(MNIST1DCNN(), optimizer=partial(torch.optim.Adam, lr=1e-2)), \
            MNIST1DDataModule(data_dir="data")

    def resnet():
        return ClassificationModule(resnet20(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9)), \
            Images(args.resnet_samples)

    def long_epochs():
        return ClassificationModule(MNIST1DMLP(hidden=32), optimizer=partial(torch.optim.SGD, lr=0.02)), \
            MNIST1DDataModule(data_dir="data", num_train=20000, batch_size=8)

    def text():
        return TextClassifier(args.text_samples), None

    return {
        "MNIST-1D demo CNN (4,000 samples, batch 100)": dict(make=demo, epochs=args.epochs, old_epochs=args.epochs,
                                                             repeats=args.repeats or 7),
        "MNIST-1D MLP, 2,500 steps per epoch (20,000 samples, batch 8)": dict(make=long_epochs, epochs=3, old_epochs=3,
                                                                              repeats=args.repeats or 7),
        f"transformer classifier, dict batches ({args.text_samples} sequences of 32 tokens, batch 32)":
            dict(make=text, epochs=args.text_epochs, old_epochs=1, repeats=args.repeats or 5),
        f"ResNet-20, generated 32x32 images ({args.resnet_samples} samples, batch 128)":
            dict(make=resnet, epochs=args.resnet_epochs, old_epochs=0, repeats=args.repeats or 5),
    }


# ---- runs ------------------------------------------------------------------------------------------------


class Checked(HessianSpectrumCallback):
    """The callback, and after each probe the exact top eigenvalue of its probe set (a tight cold Lanczos run),
    whose time is kept out of the budget and subtracted from the run's wall time."""

    def __init__(self, check: bool = True, **kwargs):
        super().__init__(plot=False, **kwargs)
        self.check = check  # off for the former default (on ResNet-20's 1,024 samples the check alone takes hours)
        self.checks: list[tuple[float, float]] = []
        self.check_seconds = self.check_cpu = 0.0

    def _probe_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = len(self.history)
        super()._probe_and_log(trainer, pl_module)
        if len(self.history) == before or not self.check:
            return
        start, cpu = time.perf_counter(), time.process_time()
        with leave_no_trace(pl_module, self.mode):
            op = HessianOperator(pl_module, self._probe._loss, self._probe.batches)
            exact = float(top_eigenvalues(op, k=1, tol=1e-8, max_iter=500, seed=12345).eigenvalues[0])
        self.checks.append((self.history[-1]["eigenvalues"][0], exact))
        spent = time.perf_counter() - start
        self.check_seconds += spent
        self.check_cpu += time.process_time() - cpu
        self._budget._clock += spent  # not training time either


def run(make, epochs: int, spectrum: dict | None, check: bool = True) -> dict:
    pl.seed_everything(0)
    module, data = make()
    callback = Checked(check, **spectrum) if spectrum is not None else None
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback] if callback else [], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data) if data is not None else trainer.fit(module)
    seconds = time.perf_counter() - start - (callback.check_seconds if callback else 0.0)
    cpu = time.process_time() - cpu - (callback.check_cpu if callback else 0.0)
    return {"seconds": seconds, "cpu": cpu, "callback": callback, "steps": trainer.global_step}


def one_product_seconds(make) -> float:
    """Seconds of one Hessian-vector product (its graph built and cached first) on the first 1,024 training
    samples in one batch, as the former default probed them."""
    pl.seed_everything(0)
    module, data = make()
    if data is not None:
        data.setup("fit")
    loader = data.train_dataloader() if data is not None else module.train_dataloader()
    batch = next(iter(DataLoader(loader.dataset, batch_size=1024, collate_fn=loader.collate_fn)))
    with leave_no_trace(module, "eval"):
        op = HessianOperator(module, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch)
        v = torch.randn(op.dim)
        op.matvec(v)  # builds the graph
        start = time.perf_counter()
        op.matvec(v)
        return time.perf_counter() - start


def describe(result: dict, base: dict, runs: int) -> list[str]:
    """A table row's cells for one run, against ``base`` (the plain run's wall and CPU seconds, scaled to as
    many epochs)."""
    seconds, cpu, cb = result["seconds"], result["cpu"], result["callback"]
    cells = [f"{seconds:.1f}", f"{100 * (seconds / base['seconds'] - 1):+.1f}%", f"{cpu:.1f}",
             f"{100 * (cpu / base['cpu'] - 1):+.1f}%"]
    if cb is None:
        return [*cells, "", "", "", "", "", str(runs)]
    history = cb.history
    full = sum("trace" in h for h in history)
    probe = cb._budget.probe_seconds  # probes, the timed product, the set-up
    hvps = f"{statistics.median(h['hvps'] for h in history):.0f}" if history else ""
    errors = [abs(got - exact) / abs(exact) for got, exact in cb.checks]
    worst = f"{100 * max(errors):.3f}%" if errors else ("no probe" if not history else "not checked")
    return [*cells, f"{100 * probe / seconds:.1f}%", f"{full} / {len(history) - full} / {cb.skipped}", hvps,
            str(cb._probe.size or cb._probe.max_size()), worst, str(runs)]


# ---- memory ----------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak) of this process, KiB (Linux)."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_child(kind: str) -> None:
    """Peak RSS above the resident state of one training step, or one probe (default chunking or one batch of
    1,024), on the transformer classifier, everything loaded first and the peak reset (``/proc/self/clear_refs``);
    printed as JSON (MiB)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = TextClassifier()
    data = Sentences(1024)
    step_batch = next(iter(DataLoader(data, batch_size=32)))
    size = 32 if kind == "probe (batches of 32)" else 1024
    probe = HessianProbe(SpectrumOptions(top_k=1, tol=1e-2, trace=False),
                         probe_data=list(DataLoader(data, batch_size=size)))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (imports, data) no longer counts
    base = _status_kib("VmRSS")
    if kind == "step":
        module.training_step(step_batch, 0).backward()
        opt.step()
    else:
        probe.measure(module)
    print(json.dumps({"mib": (_status_kib("VmHWM") - base) / 1024}))


def memory_table() -> str:
    rows = []
    kinds = ("step", "probe (batches of 32)", "probe (one batch of 1024)")
    peaks = {}
    for kind in kinds:
        out = subprocess.run([sys.executable, __file__, "--memory", kind], capture_output=True, text=True, check=True)
        peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    for kind in kinds:
        rows.append([kind, f"{peaks[kind]:.0f}", f"{peaks[kind] / peaks['step']:.1f}x"])
    return markdown_table(["transformer classifier, 1,024-sequence probe set", "peak RSS above loaded, MiB",
                           "x one training step (batch 32)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, help="interleaved runs per schedule (default: 7 for the MNIST-1D "
                        "fits, whose runs are short and noisier, 5 for ResNet-20 and the transformer)")
    parser.add_argument("--resnet-samples", type=int, default=3840)
    parser.add_argument("--resnet-epochs", type=int, default=3)
    parser.add_argument("--text-samples", type=int, default=4096)
    parser.add_argument("--text-epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only the setups whose name contains one of these words")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        memory_child(args.memory)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    header = ["model", "schedule", "wall s", "wall vs none", "CPU s", "CPU vs none", "probe share of wall",
              "probes full / eig-only / skipped", "products per probe", "probe set", "worst top-eig. error vs exact",
              "runs"]
    rows = []
    for name, setup in setups(args).items():
        if args.only and not any(word in name for word in args.only):
            continue
        runs: dict[str, list[dict]] = {"no callback": [], "HessianSpectrumCallback() (defaults)": []}
        for r in range(setup["repeats"]):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for label in order:
                spectrum = None if label == "no callback" else {}
                runs[label].append(run(setup["make"], setup["epochs"], spectrum))
                print(name, label, f"{runs[label][-1]['seconds']:.1f} s", flush=True)
        base = {key: statistics.median(r[key] for r in runs["no callback"]) for key in ("seconds", "cpu")}
        for label, results in runs.items():
            median = {key: statistics.median(r[key] for r in results) for key in ("seconds", "cpu")}
            shown = min(results, key=lambda r: abs(r["seconds"] - median["seconds"]))
            rows.append([name, label, *describe({**shown, **median}, base, len(results))])
        if setup["old_epochs"]:
            old = run(setup["make"], setup["old_epochs"], OLD_DEFAULT, check=False)
            print(name, "old", f"{old['seconds']:.1f} s", flush=True)
            scale = setup["old_epochs"] / setup["epochs"]
            rows.append([name, f"former default: full probe every epoch, 1,024 samples, no budget "
                         f"({setup['old_epochs']} epoch(s), against the plain run's time per epoch)",
                         *describe(old, {key: value * scale for key, value in base.items()}, 1)])
        else:
            seconds = one_product_seconds(setup["make"])
            print(name, "old: one product", f"{seconds:.1f} s", flush=True)
            per_epoch = base["seconds"] / setup["epochs"]
            rows.append([name, f"former default: not run; one Hessian-vector product on its 1,024 samples takes "
                         f"{seconds:.1f} s, so its probe (at least {OLD_MIN_PRODUCTS} products) would take at least "
                         f"{OLD_MIN_PRODUCTS * seconds:.0f} s per epoch, {OLD_MIN_PRODUCTS * seconds / per_epoch:.0f}x "
                         "the plain epoch", *[""] * (len(header) - 2)])
        errors = [abs(got - exact) / abs(exact) for r in runs["HessianSpectrumCallback() (defaults)"]
                  for got, exact in r["callback"].checks]
        print(name, "worst error over all default runs", max(errors) if errors else None, flush=True)
        report(started, header, rows, "")  # so far (the whole run takes the better part of an hour)
    memory = memory_table() if not args.only or any("transformer" in w for w in args.only) else ""
    report(started, header, rows, memory)


def report(started: float, header: list[str], rows: list[list[str]], memory: str) -> None:
    lines = [
        "# HessianSpectrumCallback overhead at its defaults",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Total run time {time.perf_counter() - started:.0f} s. Each model trains with no callback and with "
        "`HessianSpectrumCallback()` (interleaved runs, as many as the runs column says: medians of wall and CPU "
        "time, the probe columns from the run nearest the median; the box is shared, so CPU time, this process's "
        "own, is the steadier measure), and once with the former default (`max_overhead=None, probe_size=1024, "
        "probe_batch_size=1024, eig_tol=1e-3`: top-1 and the Krylov-deflated trace every epoch; on ResNet-20 one "
        "product on its 1,024 samples is timed instead, see its row). Probe share: the "
        "seconds the callback accounts to itself (the loss check at train start, the timed product, the probes) over "
        "the run's wall time. Error: the largest relative difference, over every "
        "probe the run reported, between its top eigenvalue and the exact one of the same probe set (a cold "
        "Lanczos run to tol 1e-8 after the probe, outside the timed and budgeted time; not made for the former "
        "default).",
        "",
        markdown_table(header, rows),
    ]
    if memory:
        lines += ["", "Memory of a probe on the transformer classifier (fresh processes; the default chunks the "
                  "probe set into training-sized batches and caches the graphs of at most 4 training batches, or 64 "
                  "MiB if that is more, rebuilding the rest at each product):", "", memory]
    write_result("spectrum_overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
