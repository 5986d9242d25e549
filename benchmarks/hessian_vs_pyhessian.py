"""Our Hessian spectrum engine next to PyHessian 0.1, same model, batch and loss, in one run (CPU).

1. Top-5 eigenvalues: PyHessian ``hessian(...).eigenvalues(top_n=5)`` (power iteration with deflation, its
   defaults maxIter=100, tol=1e-3) vs ``top_eigenvalues(op, k=5)`` (thick-restart Lanczos) at our default
   tol=1e-3 (PyHessian's nominal one) and at tol=1e-4 (ours: a residual bound, ``||Hx - lx|| <= tol |l|``):
   HVPs, wall time, largest relative error of the five against a reference. Also ours at a fixed budget of
   1/5 of PyHessian's HVPs (``max_iter``), and our error at fixed budgets of 10..22 HVPs over 5 seeds.
2. Trace with the same 100 Hutchinson probes: PyHessian ``trace(maxIter=100, tol=0)`` (tol=0: exactly 100
   probes) vs ``hutchinson_trace(op, num_samples=100)`` (batched), Hutch++ on the same 100 HVPs, and the
   Krylov-deflated estimate of HessianSpectrumCallback (20 Lanczos steps, which also give the top
   eigenvalue, then 80 probes on the rest).
3. Density: PyHessian 0.1's ``density()`` calls the removed ``torch.eig`` and raises on torch 2; ours is
   compared with the exact spectrum (Wasserstein-1 distance, implied trace), next to PyHessian's default SLQ
   settings (1 run of 100 Lanczos steps, no deflation) run through our code.
4. Cold process: the top-5 call alone, once, in a fresh Python process per run (what a notebook or a script
   pays: first-call costs included), the sides interleaved: PyHessian ``hessian(...).eigenvalues(top_n=5)``
   against ``top_eigenvalues(HessianOperator(model, loss_fn, batch), k=5)`` at its defaults and without the
   search for repeated eigenvalues, on small models (the MLP and CNN below, batch 128 and 512), a large one
   (ResNet-20, 0.27M parameters, at its random initialisation in eval mode, on a batch of 128 random 32x32
   images) and a linear regression with 3 outputs under MSE, whose Hessian holds every eigenvalue three times.
   PyHessian starts each eigenvalue from a fresh random vector, so it counts a repeated eigenvalue as often as
   it occurs; one Lanczos run sees it once, which the search mends (the regression row shows both). Written
   to its own file, hessian_cold_start.md; ``--cold-only`` runs just this.

Models (eval mode, cross-entropy, float32 as in practice):
A. MNIST-1D CNN (25 channels, 5,210 parameters), trained 5 epochs; a batch of 512 training samples.
   Reference eigenvalues: SciPy ARPACK ``eigsh`` (tol 1e-12) on float64 HVPs from plain
   ``torch.autograd`` double backward, independent of both libraries. (Its dense Hessian is too slow to
   build on this shared 2-core box.)
B. MNIST-1D MLP (32 hidden units, 2,698 parameters), trained 5 epochs; the same batch. Reference: the dense
   float64 Hessian from torch.func (``jacrev`` of ``grad``) and ``eigvalsh``: exact eigenvalues, trace, spectrum.

HVPs are counted by wrapping PyHessian's ``hessian_vector_product`` and through ``op.num_hvps``. Times are
medians over interleaved repeats (same seed for both libraries before each repeat), one torch thread.

Run: ``.venv/bin/python benchmarks/hessian_vs_pyhessian.py [--cold-only]`` (writes benchmarks/results/
hessian_vs_pyhessian.md and hessian_cold_start.md)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyhessian
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from _common import command, machine, markdown_table, write_result
from torch import nn
from torch.func import functional_call, grad, jacrev

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.hessian import HessianOperator, hutchinson_trace, spectral_density, top_eigenvalues
from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP, resnet20

ROOT = Path(__file__).resolve().parents[1]
PYHESSIAN_MODULE = importlib.import_module("pyhessian.hessian")  # the attribute of that name is the class


OUR_TOLS = (1e-3, 1e-4)  # the default (PyHessian's nominal tol), and tighter


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def mse_loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


LOSSES = {"cross_entropy": (loss_fn, nn.CrossEntropyLoss), "mse": (mse_loss_fn, nn.MSELoss)}


def regression_setup(x: torch.Tensor) -> tuple[nn.Module, tuple, np.ndarray]:
    """A 3-output linear regression under MSE on ``x``, and its exact top 5: its Hessian is
    ``I_3 (x) 2 A^T A / (3 N)`` with ``A = [x, 1]``, so every eigenvalue occurs three times."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(x.shape[1], 3).eval()
    targets = torch.randn(x.shape[0], 3, generator=g)
    A = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    values = torch.linalg.eigvalsh(2 * A.T @ A / (3 * x.shape[0])).flip(0)
    return model, (x, targets), values.repeat_interleave(3)[:5].numpy()


class CountingHVP:
    """Wraps PyHessian's module-level ``hessian_vector_product`` and counts its calls."""

    def __init__(self) -> None:
        self.original = PYHESSIAN_MODULE.hessian_vector_product
        self.calls = 0
        PYHESSIAN_MODULE.hessian_vector_product = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            loss_fn(model, (x[idx], y[idx])).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def arpack_reference(model: nn.Module, batch, k: int, tol: float = 1e-12) -> np.ndarray:
    """Top-k eigenvalues (largest algebraic) by ARPACK on float64 double-backward HVPs."""
    m = copy.deepcopy(model).double()
    params = list(m.parameters())
    x, y = batch[0].double(), batch[1]
    grads = torch.autograd.grad(loss_fn(m, (x, y)), params, create_graph=True)
    dim = sum(p.numel() for p in params)

    def hvp(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        parts, at = [], 0
        for p in params:
            parts.append(t[at : at + p.numel()].view_as(p))
            at += p.numel()
        hv = torch.autograd.grad(grads, params, grad_outputs=parts, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    op = sla.LinearOperator((dim, dim), matvec=hvp, dtype=np.float64)
    vals = sla.eigsh(op, k=k, which="LA", tol=tol, v0=np.ones(dim), return_eigenvectors=False)
    return np.sort(vals)[::-1]


def dense_hessian(model: nn.Module, batch) -> torch.Tensor:
    m = copy.deepcopy(model).double()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    x, y = batch[0].double(), batch[1]

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[at : at + s.numel()].reshape(s)
            at += s.numel()
        return F.cross_entropy(functional_call(m, params, (x,)), y)

    return jacrev(grad(f), chunk_size=512)(theta)


def wasserstein1(a_nodes: np.ndarray, a_weights: np.ndarray, b_nodes: np.ndarray, b_weights: np.ndarray) -> float:
    """W1 distance of two discrete measures on the line (integral of |CDF_a - CDF_b|)."""
    xs = np.concatenate([a_nodes, b_nodes])
    ws = np.concatenate([a_weights, -b_weights])
    order = np.argsort(xs)
    xs, cdf = xs[order], np.cumsum(ws[order])
    return float(np.sum(np.abs(cdf[:-1]) * np.diff(xs)))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def pyhessian_run(model: nn.Module, batch, method: str, **kwargs):
    """Build PyHessian's object (its create_graph backward) and call ``method``; clear the grads it leaves."""
    out = getattr(pyhessian.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False), method)(**kwargs)
    model.zero_grad(set_to_none=True)
    return out


def compare_eigen(model, batch, ref: np.ndarray, repeats: int, counter: CountingHVP) -> list[list[str]]:
    """PyHessian's default top-5 next to ours at our default tol (1e-3, PyHessian's nominal one) and at 1e-4."""
    ph_times, our_times = [], {tol: [] for tol in OUR_TOLS}
    ours_first: dict[float, object] = {}
    budget_times, budget_errors = [], []
    for r in range(repeats):
        torch.manual_seed(r)
        counter.calls = 0
        (ph_vals, _), t = timed(pyhessian_run, model, batch, "eigenvalues", top_n=5)
        ph_times.append(t)
        ph_hvps = counter.calls
        for tol in OUR_TOLS:
            torch.manual_seed(r)
            op = HessianOperator(model, loss_fn, batch)
            ours, t = timed(top_eigenvalues, op, k=5, tol=tol, seed=r)
            our_times[tol].append(t)
            ours_first.setdefault(tol, (ours, op))
        if r == 0:
            budget = ph_hvps // 5
        op = HessianOperator(model, loss_fn, batch)
        fixed, t = timed(top_eigenvalues, op, k=5, tol=1e-12, max_iter=budget, seed=r)
        budget_times.append(t)
        budget_errors.append(float(np.max(np.abs(fixed.eigenvalues.numpy() - ref) / np.abs(ref))))
        if r == 0:
            ph_first = (np.sort(ph_vals)[::-1], ph_hvps)
            torch.manual_seed(r)
            counter.calls = 0
            (tight_vals, _), t = timed(pyhessian_run, model, batch, "eigenvalues", top_n=5, tol=1e-6, maxIter=1000)
            tight = (np.sort(tight_vals)[::-1], counter.calls, t)
    ph_err = float(np.max(np.abs(ph_first[0] - ref) / np.abs(ref)))
    tight_err = float(np.max(np.abs(tight[0] - ref) / np.abs(ref)))
    tp = statistics.median(ph_times)
    rows = [["PyHessian eigenvalues(top_n=5)", str(ph_first[1]), f"{tp:.2f}", f"{ph_err:.1e}",
             ", ".join(f"{v:.4f}" for v in ph_first[0])]]
    for tol in OUR_TOLS:
        ours, op = ours_first[tol]
        to = statistics.median(our_times[tol])
        err = float(np.max(np.abs(ours.eigenvalues.numpy() - ref) / np.abs(ref)))
        label = "default, PyHessian's nominal tol" if tol == OUR_TOLS[0] else "tighter"
        rows += [
            [f"ours top_eigenvalues(k=5, tol={tol:g}) ({label}) [{op.hvp_choice.get('single')}]", str(ours.num_hvps),
             f"{to:.2f}", f"{err:.1e}", ", ".join(f"{v:.4f}" for v in ours.eigenvalues.tolist())],
            [f"ratio PyHessian / ours (tol={tol:g})", f"{ph_first[1] / ours.num_hvps:.1f}x", f"{tp / to:.1f}x",
             f"{ph_err / max(err, 1e-12):.0f}x more accurate", ""],
        ]
    tb = statistics.median(budget_times)
    rows += [
        [f"ours top_eigenvalues(k=5, max_iter={budget}): a fixed budget of 1/5 of PyHessian's HVPs, "
         f"seeds 0..{repeats - 1}", str(budget), f"{tb:.2f}",
         f"{max(budget_errors):.1e} (worst seed), {statistics.median(budget_errors):.1e} (median)", ""],
        ["ratio PyHessian / ours (fixed budget)", f"{ph_first[1] / budget:.1f}x", f"{tp / tb:.1f}x",
         f"{ph_err / max(budget_errors):.0f}x more accurate (worst seed)" if max(budget_errors) < ph_err
         else f"less accurate than PyHessian ({max(budget_errors):.1e} vs {ph_err:.1e})", ""],
    ]
    default = ours_first[OUR_TOLS[0]][0]
    rows.append(["PyHessian tol=1e-6, maxIter=1000 (one run)",
                 f"{tight[1]} ({tight[1] / default.num_hvps:.0f}x ours at tol {OUR_TOLS[0]:g})",
                 f"{tight[2]:.2f} ({tight[2] / statistics.median(our_times[OUR_TOLS[0]]):.0f}x ours)",
                 f"{tight_err:.1e}", ", ".join(f"{v:.4f}" for v in tight[0])])
    rows.append(["reference", "", "", "", ", ".join(f"{v:.4f}" for v in ref)])
    return rows


def budget_sweep(model, batch, ref: np.ndarray, seeds: int) -> str:
    """Worst and median relative error of Lanczos' top 5 at fixed HVP budgets over ``seeds`` start vectors:
    how few products any run needs for a given accuracy."""
    budgets = list(range(10, 24, 2))
    worst, median = [], []
    for b in budgets:
        errs = []
        for seed in range(seeds):
            res = top_eigenvalues(HessianOperator(model, loss_fn, batch), k=5, tol=1e-12, max_iter=b, seed=seed)
            errs.append(float(np.max(np.abs(res.eigenvalues.numpy() - ref) / np.abs(ref))))
        worst.append(f"{max(errs):.1e}")
        median.append(f"{statistics.median(errs):.1e}")
    return markdown_table(["HVP budget", *map(str, budgets)],
                          [[f"worst of {seeds} seeds", *worst], [f"median of {seeds} seeds", *median]])


def compare_trace(model, batch, exact: float | None, repeats: int, counter: CountingHVP) -> list[list[str]]:
    rows, times = {}, {"ph": [], "hutch": [], "hpp": [], "krylov": []}
    for r in range(repeats):
        torch.manual_seed(r)
        counter.calls = 0
        samples, t = timed(pyhessian_run, model, batch, "trace", maxIter=100, tol=0.0)
        times["ph"].append(t)
        if r == 0:
            rows["ph"] = (float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(len(samples))),
                          counter.calls)
        op = HessianOperator(model, loss_fn, batch)
        res, t = timed(hutchinson_trace, op, num_samples=100, batch=25, seed=r)
        times["hutch"].append(t)
        if r == 0:
            rows["hutch"] = res
            choice = op.hvp_choice.get("multi")
        op = HessianOperator(model, loss_fn, batch)
        res, t = timed(hutchinson_trace, op, num_samples=102, batch=25, seed=r, method="hutch++")
        times["hpp"].append(t)
        if r == 0:
            rows["hpp"] = res
        op = HessianOperator(model, loss_fn, batch)
        res, t = timed(krylov_trace, op, seed=r)
        times["krylov"].append(t)
        if r == 0:
            rows["krylov"] = res

    def err(v: float) -> str:
        return f"{100 * abs(v - exact) / abs(exact):.2f}%" if exact is not None else "n/a"

    tp = statistics.median(times["ph"])
    th, thpp, tk = (statistics.median(times[key]) for key in ("hutch", "hpp", "krylov"))
    ph_est, ph_se, ph_hvps = rows["ph"]
    h, hpp, (eig, kr) = rows["hutch"], rows["hpp"], rows["krylov"]

    def probes(se: float) -> str:  # plain Hutchinson probes for this standard error (SE ~ 1 / sqrt(n))
        return f"{100 * (ph_se / se) ** 2:.0f}"

    return [
        ["PyHessian trace(maxIter=100, tol=0)", str(ph_hvps), f"{tp:.2f}", f"{ph_est:.3f}",
         f"not reported ({ph_se:.3f} from its samples)", err(ph_est), probes(ph_se)],
        [f"ours hutchinson_trace(num_samples=100) [{choice}]", str(h.num_hvps), f"{th:.2f} ({tp / th:.2f}x)",
         f"{h.estimate:.3f}", f"{h.std_error:.3f}", err(h.estimate), probes(h.std_error)],
        ["ours hutch++ (102 HVPs: sketch 34)", str(hpp.num_hvps), f"{thpp:.2f} ({tp / thpp:.2f}x)",
         f"{hpp.estimate:.3f}", f"{hpp.std_error:.3f}", err(hpp.estimate), probes(hpp.std_error)],
        [f"ours Krylov-deflated ({eig.num_hvps} Lanczos steps, top-1 {float(eig.eigenvalues[0]):.3f} included, "
         f"+ {kr.num_hvps} probes)", str(eig.num_hvps + kr.num_hvps), f"{tk:.2f} ({tp / tk:.2f}x)",
         f"{kr.estimate:.3f}", f"{kr.std_error:.3f}", err(kr.estimate), probes(kr.std_error)],
    ]


def krylov_trace(op: HessianOperator, seed: int, steps: int = 20, total: int = 100):
    """Top-1 Lanczos run on to ``steps`` HVPs, then Hutchinson probes on the rest (HessianSpectrumCallback's
    default trace): 100 HVPs in all, the top eigenvalue included."""
    eig = top_eigenvalues(op, k=1, min_iter=steps, max_iter=steps, seed=seed, return_basis=True)
    return eig, hutchinson_trace(op, num_samples=total - eig.num_hvps, batch=25, seed=seed, basis=eig.basis,
                                 basis_trace=eig.basis_trace)


def compare_density(model, batch, H: torch.Tensor) -> tuple[list[list[str]], str]:
    ev = torch.linalg.eigvalsh(H).numpy()
    dim, exact_trace = len(ev), float(ev.sum())
    uniform = np.full(dim, 1.0 / dim)
    width = float(ev.max() - ev.min())
    try:
        pyhessian_run(model, batch, "density", iter=5, n_v=1)
        ph_status = "PyHessian density() ran"
    except Exception as err:  # noqa: BLE001 - we report whatever it raises
        model.zero_grad(set_to_none=True)
        ph_status = f"PyHessian 0.1 density() raises `{type(err).__name__}: {str(err).splitlines()[0][:90]}`"
    settings = [
        ("PyHessian defaults (1 run x 100 steps, no deflation), our code",
         dict(num_runs=1, lanczos_steps=100, deflate=0)),
        ("ours defaults (10 runs x 40 steps, deflate 10)", dict()),
        ("ours 40 runs x 40 steps, deflate 40", dict(num_runs=40, lanczos_steps=40, deflate=40)),
    ]
    rows = []
    for label, kw in settings:
        op = HessianOperator(model, loss_fn, batch)
        res, t = timed(spectral_density, op, seed=0, **kw)
        nodes, weights = res.nodes.numpy().ravel(), res.weights.numpy().ravel() / res.nodes.shape[0]
        w1 = wasserstein1(nodes, weights, ev, uniform)
        sums = res.weights.sum(1)
        trace_err = f"{100 * abs(res.trace - exact_trace) / exact_trace:.2f}%"
        se = f"SE {100 * res.trace_std_error / exact_trace:.2f}%" if res.nodes.shape[0] > 1 else "1 run: no SE"
        rows.append([
            label, str(res.num_hvps), f"{t:.2f}", f"{w1:.4f} ({100 * w1 / width:.2f}% of range)",
            f"{trace_err} ({se})", f"{float(sums.min()):.12f}..{float(sums.max()):.12f}",
        ])
    return rows, ph_status



COLD_SIDES = ("pyhessian", "ours", "ours-no-search")


def child(side: str, path: str) -> None:
    """One top-5 call in this (fresh) process; prints its seconds, HVPs and eigenvalues as JSON."""
    torch.set_num_threads(1)
    state = torch.load(path, weights_only=False)
    model, batch = state["model"], state["batch"]
    ours_loss, criterion = LOSSES[state["loss"]]
    counter = CountingHVP()
    start = time.perf_counter()
    if side == "pyhessian":
        values, _ = pyhessian.hessian(model, criterion(), data=batch, cuda=False).eigenvalues(top_n=5)
        hvps = counter.calls
    else:
        result = top_eigenvalues(HessianOperator(model, ours_loss, batch), k=5, check_multiplicity=side == "ours")
        values, hvps = result.eigenvalues.tolist(), result.num_hvps
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "hvps": hvps, "values": sorted(values, reverse=True)}))


def cold_process(setups: list[tuple[str, nn.Module, tuple, np.ndarray, int, str]], folder: Path) -> list[list[str]]:
    """Each side's top-5 call in a fresh process per run, the sides alternating; medians of the runs."""
    rows = []
    for i, (label, model, batch, ref, repeats, loss) in enumerate(setups):
        path = folder / f"setup{i}.pt"
        torch.save({"model": model, "batch": batch, "loss": loss}, path)
        runs: dict[str, list[dict]] = {side: [] for side in COLD_SIDES}
        for r in range(repeats):
            for side in COLD_SIDES if r % 2 == 0 else COLD_SIDES[::-1]:
                out = subprocess.run([sys.executable, __file__, "--child", side, str(path)], capture_output=True,
                                     text=True, check=True)
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(label, side, runs[side][-1]["seconds"], runs[side][-1]["hvps"], flush=True)
        seconds = {side: statistics.median(run["seconds"] for run in runs[side]) for side in COLD_SIDES}
        errors = {side: max(float(np.max(np.abs(np.array(run["values"]) - ref) / np.abs(ref))) for run in runs[side])
                  for side in COLD_SIDES}
        hvps = {side: statistics.median(run["hvps"] for run in runs[side]) for side in COLD_SIDES}
        rows.append([
            label, *(f"{seconds[side]:.2f} ({hvps[side]:.0f})" for side in COLD_SIDES),
            *(f"{seconds['pyhessian'] / seconds[side]:.1f}x" for side in COLD_SIDES[1:]),
            *(f"{errors[side]:.1e}" for side in COLD_SIDES), str(repeats),
        ])
    return rows


def in_process_sections(cnn: nn.Module, mlp: nn.Module, batch, args: argparse.Namespace,
                        counter: CountingHVP) -> list[str]:
    """Sections A and B: top-5, trace and density in this process (medians of interleaved repeats)."""
    eig_header = ["method", "HVPs", "time s", "max rel. error", "top-5 eigenvalues"]
    tr_header = ["method", "HVPs", "time s (speed-up)", "estimate", "std. error", "error vs exact",
                 "Hutchinson probes for this SE"]
    sections = []
    ref = arpack_reference(cnn, batch, 5)
    sections.append(
        f"### A. MNIST-1D CNN ({sum(p.numel() for p in cnn.parameters()):,} parameters), batch {args.batch}\n\n"
        "Reference: ARPACK on float64 HVPs.\n\n"
        + markdown_table(eig_header, compare_eigen(cnn, batch, ref, args.repeats, counter))
        + "\n\nOur top-5 error at a fixed number of HVPs (Lanczos, largest relative error of the five):\n\n"
        + budget_sweep(cnn, batch, ref, args.repeats)
        + "\n\nTrace, 100 probes each (no exact trace for this model). Both libraries draw the same Rademacher "
        "probes from the same seed here, hence equal plain estimates:\n\n"
        + markdown_table(tr_header, compare_trace(cnn, batch, None, args.repeats, counter))
    )

    H = dense_hessian(mlp, batch)
    ev = torch.linalg.eigvalsh(H).flip(0).numpy()
    density_rows, ph_status = compare_density(mlp, batch, H)
    sections.append(
        f"### B. MNIST-1D MLP ({sum(p.numel() for p in mlp.parameters()):,} parameters), batch {args.batch}\n\n"
        "Reference: dense float64 Hessian (torch.func) and eigvalsh.\n\n"
        + markdown_table(eig_header, compare_eigen(mlp, batch, ev[:5].copy(), args.repeats, counter))
        + "\n\nOur top-5 error at a fixed number of HVPs (Lanczos, largest relative error of the five):\n\n"
        + budget_sweep(mlp, batch, ev[:5].copy(), args.repeats)
        + f"\n\nTrace, 100 probes each (exact trace {float(ev.sum()):.3f}):\n\n"
        + markdown_table(tr_header, compare_trace(mlp, batch, float(ev.sum()), args.repeats, counter))
        + f"\n\nDensity against the exact spectrum ({ph_status}):\n\n"
        + markdown_table(["SLQ", "HVPs", "time s", "Wasserstein-1 to exact", "implied trace error",
                          "weights per run sum to"], density_rows)
    )
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--cold-repeats", type=int, default=5, help="fresh-process runs per side (small models)")
    parser.add_argument("--large-repeats", type=int, default=2, help="fresh-process runs per side (ResNet-20)")
    parser.add_argument("--cold-only", action="store_true", help="only the fresh-process comparison (section 4)")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    counter = CountingHVP()
    x, y, _, _ = load_mnist1d(data_dir=args.data_dir)
    batch = (x[: args.batch], y[: args.batch])

    torch.manual_seed(0)
    cnn = train(MNIST1DCNN(), x, y)
    torch.manual_seed(0)
    mlp = train(MNIST1DMLP(hidden=32), x, y)
    if not args.cold_only:
        sections = in_process_sections(cnn, mlp, batch, args, counter)
        write_result("hessian_vs_pyhessian", "\n\n".join([
            "## Hessian spectrum: lightning_hessian vs PyHessian 0.1",
            f"Command: `{command()}`  \nMachine: {machine()}; pyhessian 0.1  \n"
            f"Total run time {time.perf_counter() - started:.0f} s. Times: median of {args.repeats} interleaved "
            "repeats in this process, including each library's set-up (PyHessian's create_graph backward, our "
            "operator's). The fresh-process comparison is in hessian_cold_start.",
            *sections,
        ]))
        started = time.perf_counter()
    small = []
    for label, model in (("MNIST-1D MLP", mlp), ("MNIST-1D CNN", cnn)):
        for n in (128, 512):
            sub = (x[:n], y[:n])
            if label.endswith("MLP"):
                reference = torch.linalg.eigvalsh(dense_hessian(model, sub)).flip(0)[:5].numpy()
            else:
                reference = arpack_reference(model, sub, 5)
            params = sum(p.numel() for p in model.parameters())
            small.append((f"{label} ({params:,} parameters), batch {n}", model, sub, reference, args.cold_repeats,
                          "cross_entropy"))
    regression, regression_batch, reference = regression_setup(x[:128])
    small.append(("linear regression, 3 outputs, MSE (every eigenvalue three times, 123 parameters), batch 128",
                  regression, regression_batch, reference, args.cold_repeats, "mse"))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    resnet = resnet20().eval()
    images = (torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g))
    large = [(f"ResNet-20 ({sum(p.numel() for p in resnet.parameters()):,} parameters), batch 128", resnet, images,
              arpack_reference(resnet, images, 5, tol=1e-8), args.large_repeats, "cross_entropy")]
    with tempfile.TemporaryDirectory() as folder:
        cold_rows = cold_process(small + large, Path(folder))
    header = ["model", *(f"{side} s (HVPs)" for side in COLD_SIDES), "speed-up (ours)",
              "speed-up (ours, no search)", *(f"{side} max rel. error" for side in COLD_SIDES), "runs per side"]
    write_result("hessian_cold_start", "\n\n".join([
        "## Cold process: one top-5 call in a fresh Python process, lightning_hessian vs PyHessian 0.1",
        f"Command: `{command()}`  \nMachine: {machine()}; pyhessian 0.1  \n"
        f"Total run time {time.perf_counter() - started:.0f} s. Seconds of the call alone, in a fresh process per "
        "run, the sides interleaved (what a notebook or a script pays: first-call costs included). PyHessian: "
        "building its object and `eigenvalues(top_n=5)` (power iteration with deflation, maxIter 100, tol 1e-3). "
        "ours: `top_eigenvalues(HessianOperator(model, loss_fn, batch), k=5)` at its defaults (tol 1e-3 on the "
        "residual, the HVP form chosen without timing, and the search for repeated eigenvalues); ours-no-search: "
        "the same with `check_multiplicity=False`, one Lanczos run, which sees a repeated eigenvalue once. "
        "PyHessian restarts each eigenvalue from a fresh random vector and so counts repeats too (the regression "
        "row, whose every eigenvalue occurs three times). Median over the runs, HVPs in brackets; error: the "
        "largest relative error of the five against the reference (dense eigvalsh for the MLP, the closed form "
        "for the regression, ARPACK on float64 HVPs otherwise), worst run.",
        markdown_table(header, cold_rows),
    ]))


if __name__ == "__main__":
    main()
