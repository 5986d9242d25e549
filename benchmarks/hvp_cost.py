"""Cost of one Hessian-vector product relative to one gradient, per HVP form, single and batched (CPU).

For each model: time of one gradient (forward + backward), then one HVP through ``HessianOperator`` with
each form: double backward from scratch (forward, create_graph backward, second backward), double backward
on a cached first-order graph (what the operator does for materialised data: one backward per HVP), and
forward-over-reverse (``jvp`` of ``grad``); then ``matmat`` of k vectors per form, divided by k.

Models: the MNIST-1D CNN (5,210 parameters) on a batch of 1024 MNIST-1D signals, and ResNet-20 (0.27M
parameters) on a batch of 128 random 32x32 colour images, both in eval mode with cross-entropy.
Medians over rounds that time every computation once, round-robin, one torch thread.

Run: ``.venv/bin/python benchmarks/hvp_cost.py`` (writes benchmarks/results/hvp_cost.md)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import command, machine, markdown_table, write_result
from torch import nn

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.hessian import HessianOperator
from lightning_hessian.models import MNIST1DCNN, resnet20

ROOT = Path(__file__).resolve().parents[1]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def measure(model: nn.Module, batch, k: int, repeats: int, warmup: bool) -> tuple[list[list[str]], str]:
    """Times every computation once per round, round-robin (so all share the same load), medians."""
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    V = torch.randn(k, dim, generator=torch.Generator().manual_seed(0))
    scratch = HessianOperator(model, loss_fn, batch, hvp="reverse", cache_graph=False)
    cached = HessianOperator(model, loss_fn, batch, hvp="reverse", cache_graph=True)
    cached_batched = HessianOperator(model, loss_fn, batch, hvp="reverse-batched", cache_graph=True)
    forward = HessianOperator(model, loss_fn, batch, hvp="forward")
    cached.matvec(V[0])  # builds the cached graphs, once
    cached_batched.matmat(V[:2])
    work = {  # label: (call, vectors per call, the single-HVP label it batches)
        "gradient (forward + backward)": (lambda: torch.autograd.grad(loss_fn(model, batch), params), 1, None),
        "1 HVP: double backward, from scratch": (lambda: scratch.matvec(V[0]), 1, None),
        "1 HVP: double backward, cached graph": (lambda: cached.matvec(V[0]), 1, None),
        "1 HVP: forward-over-reverse": (lambda: forward.matvec(V[0]), 1, None),
        f"{k} HVPs (matmat), double backward from scratch, loop on one first-order graph / {k}":
            (lambda: scratch.matmat(V), k, "1 HVP: double backward, from scratch"),
        f"{k} HVPs (matmat), double backward cached, loop / {k}":
            (lambda: cached.matmat(V), k, "1 HVP: double backward, cached graph"),
        f"{k} HVPs (matmat), double backward cached, is_grads_batched / {k}":
            (lambda: cached_batched.matmat(V), k, "1 HVP: double backward, cached graph"),
        f"{k} HVPs (matmat), forward-over-reverse, vmap / {k}":
            (lambda: forward.matmat(V), k, "1 HVP: forward-over-reverse"),
    }
    times: dict[str, list[float]] = {label: [] for label in work}
    for round_ in range(repeats + int(warmup)):
        for label, (call, vectors, _) in work.items():
            start = time.perf_counter()
            call()
            if round_ >= int(warmup):
                times[label].append((time.perf_counter() - start) / vectors)
    per = {label: statistics.median(t) for label, t in times.items()}
    t_grad = per["gradient (forward + backward)"]
    rows = []
    for label, (_, _, single) in work.items():
        versus = f"{per[single] / per[label]:.2f}x vs 1 HVP of that form" if single else ""
        rows.append([label, f"{1e3 * per[label]:.1f}", f"{per[label] / t_grad:.2f}", versus])
    auto = HessianOperator(model, loss_fn, batch)
    auto.matvec(V[0])
    auto.matmat(V[:2])
    return rows, f"`hvp=\"auto\"` picks {auto.hvp_choice['single']} (one vector), {auto.hvp_choice['multi']} (several)"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    x, y, _, _ = load_mnist1d(data_dir=args.data_dir)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    setups = [  # title, model, batch, vectors per matmat, rounds, warm-up round
        ("MNIST-1D CNN, batch 1024", MNIST1DCNN().eval(), (x[:1024], y[:1024]), 8, max(args.repeats, 5), True),
        ("ResNet-20, batch 128 (random 32x32 images)", resnet20().eval(),
         (torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)), 4, args.repeats,
         False),
    ]
    header = ["computation", "ms per gradient / HVP", "x one gradient", "batched vs single"]
    sections = []
    for title, model, batch, k, repeats, warmup in setups:
        rows, auto = measure(model, batch, k, repeats, warmup)
        n = sum(p.numel() for p in model.parameters())
        sections.append(f"### {title}, {n:,} parameters\n\n{markdown_table(header, rows)}\n\n{auto}.")
        print(sections[-1], flush=True)
    report = "\n\n".join([
        "## HVP cost: one Hessian-vector product vs one gradient",
        f"Command: `{command()}`  \nMachine: {machine()}  \nTotal run time {time.perf_counter() - started:.0f} s. "
        "Medians over rounds that run every computation once, round-robin (CNN: a warm-up round and "
        f"{max(args.repeats, 5)} rounds; ResNet-20: {args.repeats} rounds).",
        *sections,
    ])
    write_result("hvp_cost", report)


if __name__ == "__main__":
    main()
