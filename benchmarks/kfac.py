"""K-FAC: our KFACOperator next to curvlinops' KFACLinearOperator, our preconditioner next to kfac-pytorch, and
metric="kfac" next to the Hessian metrics of HAWQ, in one run.

1. Curvature: the same model (the MNIST-1D CNN's Conv2d twin, as curvlinops handles Linear and Conv2d only) and
   data through ``KFACOperator`` and ``curvlinops.KFACLinearOperator(separate_weight_and_bias=False)``: the largest
   relative difference of ``K v`` over random vectors, for type-2 and empirical Fisher, expand and reduce, and the
   time to build each (median of interleaved repeats).
2. Step cost: a plain training step (zero_grad, forward, backward, [precondition], SGD step) with plain SGD, with
   our ``KFACPreconditioner`` and with kfac-pytorch's ``KFACPreconditioner`` (eigen method, the same damping,
   decay, KL clip and update intervals), median over interleaved repeats, on the MNIST-1D CNN's Conv2d twin
   (kfac-pytorch preconditions Linear and Conv2d only) and ResNet-20 (CIFAR-shaped random batches of 64). Overhead =
   (step with K-FAC - SGD step) / SGD step. The Lightning callback calls this same ``step``.
3. HAWQ sensitivity of a trained MNIST-1D CNN: time of ``metric="kfac"`` (no Hessian-vector product) against the
   Hutchinson ``"trace"`` and the exact ``"quadratic"`` forms, and how the per-layer 4-bit costs rank against the
   exact quadratic forms.

Run: ``.venv/bin/python benchmarks/kfac.py`` (writes benchmarks/results/kfac.md; ``--quick`` for a smoke run).
Peers: ``make bench-setup`` (curvlinops-for-pytorch from PyPI; kfac-pytorch from a local checkout of
github.com/gpauloski/kfac-pytorch, ``pip install --no-deps <checkout>``, as it is not on PyPI).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import command, machine, markdown_table, write_result
from adahessian import CNN2d
from torch import nn

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.hessian import KFACOperator
from lightning_hessian.models import MNIST1DCNN
from lightning_hessian.models.resnet import resnet20
from lightning_hessian.optim import KFACPreconditioner
from lightning_hessian.quant.sensitivity import layer_sensitivity


def version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (absent)"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ 1. curvature
def curvature_section(quick: bool) -> list[str]:
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        return ["curvlinops is not installed (`make bench-setup`): section skipped."]
    torch.manual_seed(0)
    model = CNN2d(MNIST1DCNN(channels=8)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (512,), generator=g)
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    loss = nn.CrossEntropyLoss()

    def ours(fisher: str, approx: str) -> KFACOperator:
        return KFACOperator(model, lambda m, batch: loss(m(batch[0]), batch[1]), data, fisher_type=fisher,
                            kfac_approx=approx)

    def theirs(fisher: str, approx: str) -> KFACLinearOperator:
        op = KFACLinearOperator(model, loss, list(model.parameters()), data, fisher_type=fisher, kfac_approx=approx,
                                separate_weight_and_bias=False, check_deterministic=False)
        op.compute_kronecker_factors()
        return op

    rows = []
    for fisher in ("type-2", "empirical"):
        for approx in ("expand", "reduce"):
            a, b = ours(fisher, approx), theirs(fisher, approx)
            V = torch.randn(a.dim, 8, generator=g, dtype=torch.float64)
            mine, peer = a.matmat(V.T).T, torch.as_tensor(b @ V)
            gap = float((mine - peer).abs().max() / peer.abs().max())
            repeats = 1 if quick else 3
            t_ours, t_peer = [], []
            for _ in range(repeats):  # interleaved
                t_ours.append(median_time(lambda f=fisher, k=approx: ours(f, k), 1))
                t_peer.append(median_time(lambda f=fisher, k=approx: theirs(f, k), 1))
            rows.append([fisher, approx, f"{gap:.1e}", f"{1e3 * statistics.median(t_ours):.0f}",
                         f"{1e3 * statistics.median(t_peer):.0f}",
                         f"{statistics.median(t_peer) / statistics.median(t_ours):.2f}"])
            print(rows[-1], flush=True)
    header = ["fisher", "weight sharing", "max rel. difference of K v", "build ms, ours", "build ms, curvlinops",
              "curvlinops / ours"]
    return [f"Conv2d twin of the MNIST-1D CNN (8 channels, float64), cross-entropy, 4 batches of 128. "
            f"Build: the factors over the 4 batches, median of {1 if quick else 3} interleaved repeats.", "",
            markdown_table(header, rows)]


# ---------------------------------------------------------------------------------------------- 2. step cost
def peer_preconditioner() -> type | None:
    """kfac-pytorch's preconditioner (its package is ``kfac``, which this script's own name would shadow)."""
    here = Path(__file__).resolve().parent
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        from kfac.preconditioner import KFACPreconditioner as Peer
    except ImportError:
        return None
    finally:
        sys.path[:] = saved
    return Peer


def step_costs(make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, settings: dict, steps: int,
               repeats: int) -> dict[str, float]:
    """Median seconds per step for SGD, ours and kfac-pytorch, interleaved repeats of ``steps`` steps."""
    Peer = peer_preconditioner()
    runs = {}
    for name in ("SGD", "ours", "kfac-pytorch"):
        if name == "kfac-pytorch" and Peer is None:
            continue
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if name == "ours":
            pre = KFACPreconditioner(model, **settings)
            runs[name] = (model, opt, lambda p=pre, o=opt: p.step(o))
        elif name == "kfac-pytorch":
            pre = Peer(model, lr=0.05, compute_method="eigen", **settings)
            runs[name] = (model, opt, pre.step)
        else:
            runs[name] = (model, opt, None)

    def step(model: nn.Module, opt: torch.optim.Optimizer, precondition: Callable | None) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if precondition is not None:
            precondition()
        opt.step()

    for run in runs.values():  # warm-up, the first factors and eigendecompositions included
        step(*run)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(*run)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def step_section(quick: bool) -> list[str]:
    rows = []
    # (label, model, input shape, classes, [(factor steps, inverse steps)], repeats); a repeat covers whole
    # inverse-update periods (steps = the inverse interval), so every method's schedule is averaged alike
    cases = [
        ("MNIST-1D CNN (Conv2d twin), batch 100", lambda: CNN2d(MNIST1DCNN()), (100, 40), 10, [(1, 10), (10, 100)],
         3 if quick else 7),
        ("ResNet-20, batch 64, 32x32", resnet20, (64, 3, 32, 32), 10, [(1, 10)], 1 if quick else 3),
    ]
    for label, make, shape, classes, intervals, repeats in cases:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)
        for factor_steps, inv_steps in intervals:
            settings = dict(factor_update_steps=factor_steps, inv_update_steps=inv_steps, damping=1e-3,
                            factor_decay=0.95, kl_clip=1e-3)
            t = step_costs(make, x, y, settings, inv_steps, repeats)
            sgd = t["SGD"]
            overhead = {name: (v - sgd) / sgd for name, v in t.items()}
            peer = overhead.get("kfac-pytorch")
            rows.append([label, f"{factor_steps} / {inv_steps}", f"{1e3 * sgd:.1f}", f"{1e3 * t['ours']:.1f}",
                         f"{1e3 * t['kfac-pytorch']:.1f}" if peer is not None else "absent",
                         f"{100 * overhead['ours']:.0f}%", f"{100 * peer:.0f}%" if peer is not None else "",
                         f"{overhead['ours'] / peer:.2f}" if peer else ""])
            print(rows[-1], flush=True)
    header = ["model", "factor / inverse update every", "SGD ms/step", "ours ms/step", "kfac-pytorch ms/step",
              "ours overhead", "kfac-pytorch overhead", "our overhead / theirs"]
    return ["Both at damping 1e-3, factor decay 0.95, KL clip 1e-3, eigendecompositions in float32; SGD lr 0.05 "
            f"momentum 0.9; one torch thread. Time per step: median over interleaved repeats "
            f"({3 if quick else 7} for the CNN, {1 if quick else 3} for ResNet-20), each as many steps as the inverse "
            "interval. Conventions differ (kfac-pytorch starts its running averages from the identity and scales "
            "its factors differently), so the updates differ; the work per step is the same: both capture A and G "
            "every factor step and eigendecompose both factors of every layer every inverse step.", "",
            markdown_table(header, rows)]


# -------------------------------------------------------------------------------------------------- 3. HAWQ
def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def hawq_section(quick: bool, data_dir: str) -> list[str]:
    x, y, _, _ = load_mnist1d(4000, 1000, data_dir=data_dir)
    torch.manual_seed(0)
    model = MNIST1DCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3 if quick else 15):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 100):
            idx = perm[i : i + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    probe = [(x[i : i + 250], y[i : i + 250]) for i in range(0, 1000, 250)]

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    results, times = {}, {}
    for metric in ("kfac", "trace", "quadratic"):
        start = time.perf_counter()
        results[metric] = layer_sensitivity(model, loss_fn, probe, metrics=[metric], rel_tol=0.05)
        times[metric] = time.perf_counter() - start
    exact = results["quadratic"].omega("quadratic")
    layers = list(exact)
    rows = []
    for metric, sens in results.items():
        omega = sens.omega(metric)
        rho = spearman([omega[n][4] for n in layers], [exact[n][4] for n in layers])
        ratio = statistics.median(omega[n][4] / exact[n][4] for n in layers)
        rows.append([metric, f"{times[metric]:.2f}", str(sens.num_hvps), f"{rho:.2f}", f"{ratio:.2f}"])
        print(rows[-1], flush=True)
    header = ["metric", "seconds", "Hessian-vector products", "rank corr. with exact (4 bit)",
              "median Omega / exact (4 bit)"]
    return [f"MNIST-1D CNN trained {3 if quick else 15} epochs with SGD, eval mode; probe 1000 training samples in 4 "
            "batches; 4 layers, bits (2, 4, 8); Hutchinson to 5% relative standard error.", "",
            markdown_table(header, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    sections = [
        "# K-FAC: curvature vs curvlinops, preconditioner vs kfac-pytorch, HAWQ metric=\"kfac\"",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine(version('curvlinops-for-pytorch'), version('kfac-pytorch'))}",
        "",
        "## Curvature: KFACOperator vs curvlinops KFACLinearOperator",
        "",
        *curvature_section(args.quick),
        "",
        "## Time per optimizer step: SGD, SGD + our K-FAC, SGD + kfac-pytorch",
        "",
        *step_section(args.quick),
        "",
        "## HAWQ sensitivity: metric=\"kfac\" vs Hutchinson trace and exact quadratic forms",
        "",
        *hawq_section(args.quick, args.data_dir),
        "",
    ]
    sections.insert(4, f"Total time: {time.perf_counter() - started:.0f} s.")
    write_result("kfac" if not args.quick else "kfac_quick", "\n".join(sections))


if __name__ == "__main__":
    sys.exit(main())
