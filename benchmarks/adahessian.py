"""AdaHessian next to SGD, Adam and torch_optimizer.Adahessian on the MNIST-1D CNN, in one run.

1. Training: the MNIST-1D CNN (4000 train / 1000 test, batch 100) trained with SGD (lr 0.1, momentum 0.9),
   Adam (lr 1e-2, the MNIST-1D benchmark's setting) and AdaHessian at its published defaults (lr 0.15,
   betas (0.9, 0.999), eps 1e-4, hessian_power 1): test accuracy after each seed's run and wall time per epoch.
   ``torch_optimizer.Adahessian`` is tried on the same CNN; its curvature code handles 2-D and 4-D weights
   only, so it is also run on the CNN's Conv2d twin (the same function with ``(1, k)`` kernels, checked
   numerically), where both implementations compute the same update.
2. Step cost on the Conv2d twin, same model and batch for both: median time per step (interleaved repeats,
   one thread); peak tensor memory of one step, from the torch profiler's allocation events (tracemalloc
   cannot see torch's allocations, a CPU build has no allocator statistics, and peak RSS is dominated by
   the import-time high-water mark); and RSS growth over 50 further steps, which would show a leak.

Run: ``.venv/bin/python benchmarks/adahessian.py`` (writes benchmarks/results/adahessian.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import command, machine, write_result
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.models import MNIST1DCNN
from lightning_hessian.optim import AdaHessian

# Both AdaHessians need backward(create_graph=True); PyTorch's reminder to clear .grad afterwards is heeded.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")


def torch_optimizer_adahessian() -> type[torch.optim.Optimizer]:
    """``torch_optimizer.Adahessian``; its package imports pytorch_ranger, absent when installed --no-deps."""
    try:
        import torch_optimizer
    except ModuleNotFoundError as err:
        if err.name != "pytorch_ranger":
            raise
        stub = types.ModuleType("pytorch_ranger")
        for cls in ("Ranger", "RangerQH", "RangerVA"):
            setattr(stub, cls, type(cls, (torch.optim.Optimizer,), {}))
        sys.modules["pytorch_ranger"] = stub
        import torch_optimizer
    return torch_optimizer.Adahessian


class CNN2d(nn.Module):
    """The MNIST-1D CNN with each Conv1d replaced by the equivalent Conv2d over a ``(1, length)`` image."""

    def __init__(self, cnn: MNIST1DCNN):
        super().__init__()
        layers = []
        for layer in cnn.features:
            if isinstance(layer, nn.Conv1d):
                conv = nn.Conv2d(layer.in_channels, layer.out_channels, (1, layer.kernel_size[0]),
                                 stride=(1, layer.stride[0]), padding=(0, layer.padding[0]))
                conv.weight.data.copy_(layer.weight.data.unsqueeze(2))
                conv.bias.data.copy_(layer.bias.data)
                layer = conv
            layers.append(layer)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cnn.classifier.in_features, cnn.classifier.out_features)
        self.classifier.load_state_dict(cnn.classifier.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(x.shape[0], 1, 1, -1)).flatten(1))


def make_model(kind: str, channels: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cnn = MNIST1DCNN(channels=channels)
    return cnn if kind == "conv1d" else CNN2d(cnn)


OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], bool]] = {
    # name: (factory(params), backward needs create_graph)
    "SGD (lr 0.1, momentum 0.9)": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), False),
    "Adam (lr 1e-2)": (lambda p: torch.optim.Adam(p, lr=1e-2), False),
    "AdaHessian, ours (lr 0.15)": (lambda p: AdaHessian(p, lr=0.15), True),
    # hessian_power=1 as ours (its own default is 0.5): the same update, so the comparison is of implementations
    "torch_optimizer.Adahessian (lr 0.15)": (lambda p: torch_optimizer_adahessian()(p, lr=0.15, hessian_power=1.0),
                                             True),
}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, graph: bool) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward(create_graph=graph)
    opt.step()


def train(name: str, kind: str, data: tuple[torch.Tensor, ...], epochs: int, batch: int, seed: int) -> dict:
    x, y, xt, yt = data
    model = make_model(kind, 25, seed)
    factory, graph = OPTIMIZERS[name]
    opt = factory(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    epoch_times = []
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            start = time.perf_counter()
            for i in range(0, len(x), batch):
                idx = perm[i : i + batch]
                train_step(model, opt, x[idx], y[idx], graph)
            epoch_times.append(time.perf_counter() - start)
    except Exception as err:  # the peer's failure is a result to report, not a crash
        return {"error": f"{type(err).__name__}: {err}"}
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return {"acc": acc, "epoch_s": statistics.median(epoch_times)}


def step_times(kind: str, channels: int, batch: int, names: list[str], repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per step for each optimizer, repeats interleaved so load changes hit all alike."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 40, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    runs = {}
    for name in names:
        model = make_model(kind, channels, 0)
        factory, graph = OPTIMIZERS[name]
        opt = factory(model.parameters())
        train_step(model, opt, x, y, graph)  # warm-up (state allocation)
        runs[name] = (model, opt, graph)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, (model, opt, graph) in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, x, y, graph)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_memory(kind: str, channels: int, batch: int, name: str, steps: int) -> dict[str, float]:
    """Peak live tensor memory during one step above its start, and RSS growth over ``steps`` steps.

    The peak comes from the profiler's allocation events (every CPU tensor allocation and free, in
    order) over forward, backward and ``step``, recorded after ``zero_grad(set_to_none=True)`` so the
    previous step's gradients and graph are already gone.
    """
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 40, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    model = make_model(kind, channels, 0)
    factory, graph = OPTIMIZERS[name]
    opt = factory(model.parameters())
    train_step(model, opt, x, y, graph)
    opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        F.cross_entropy(model(x), y).backward(create_graph=graph)
        opt.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    train_step(model, opt, x, y, graph)
    rss_start = _current_rss_mb()
    for _ in range(steps):
        train_step(model, opt, x, y, graph)
    return {"peak_mb": peak / 2**20, "rss_growth_mb": _current_rss_mb() - rss_start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = list(OPTIMIZERS)
    ours, peer = names[2], names[3]

    cnn = make_model("conv1d", 25, 0)
    probe = torch.randn(8, 40)
    twin_gap = (cnn(probe) - CNN2d(cnn)(probe)).abs().max().item()

    data = load_mnist1d(4000, 1000, data_dir=Path(__file__).resolve().parents[1] / "data")
    started = time.perf_counter()
    rows = []
    for kind, kind_names in (("conv1d", names), ("conv2d", [ours, peer])):
        for name in kind_names:
            results = [train(name, kind, data, args.epochs, 100, seed) for seed in range(args.seeds)]
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                rows.append(f"| {name} | {kind} | fails: `{errors[0]}` | | |")
                continue
            accs = [100 * r["acc"] for r in results]
            rows.append(
                f"| {name} | {kind} | {statistics.mean(accs):.1f} | {min(accs):.1f} - {max(accs):.1f} "
                f"| {1e3 * statistics.median(r['epoch_s'] for r in results):.0f} |"
            )
            print(rows[-1], flush=True)
    train_s = time.perf_counter() - started

    cost_rows = []
    compared = [names[1], ours, peer]
    for channels, batch, steps in ((25, 100, 20), (64, 256, 5)):
        times = step_times("conv2d", channels, batch, compared, repeats=5, steps=steps)
        for name in compared:
            mem = step_memory("conv2d", channels, batch, name, steps=50)
            cost_rows.append(
                f"| {channels} ch, batch {batch} | {name} | {1e3 * times[name]:.2f} | "
                f"{times[name] / times[ours]:.2f} | {mem['peak_mb']:.2f} | {mem['rss_growth_mb']:+.1f} |"
            )
            print(cost_rows[-1], flush=True)

    report = "\n".join([
        "# AdaHessian vs SGD, Adam and torch_optimizer.Adahessian (MNIST-1D CNN)",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Data: MNIST-1D 4000 train / 1000 test (seed 42), batch 100, {args.epochs} epochs, "
        f"{args.seeds} seeds (model init and data order). Conv2d twin max |output gap| vs the Conv1d CNN: "
        f"{twin_gap:.1e}. Training section took {train_s:.0f} s.",
        "",
        "## Test accuracy and time per epoch",
        "",
        "| optimizer | model | test acc % (mean) | min - max | ms / epoch (median) |",
        "|---|---|---:|---:|---:|",
        *rows,
        "",
        "## Time and memory per step (Conv2d twin, same model and batch for all)",
        "",
        "Time: median over 5 interleaved repeats of a full step (zero_grad, forward, backward, step). "
        "Peak memory: the most tensor memory live at once during one step above its start (activations, "
        "graph, gradients, curvature temporaries), from the torch profiler's allocation events. RSS growth: "
        "resident memory after 50 more steps minus before (0 = nothing accumulates).",
        "",
        "| model | optimizer | ms / step | time / ours | peak step memory MB | RSS growth over 50 steps MB |",
        "|---|---|---:|---:|---:|---:|",
        *cost_rows,
        "",
    ])
    write_result("adahessian", report)


if __name__ == "__main__":
    main()
