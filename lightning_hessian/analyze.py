"""The analyze recipe's work: a full Hessian report of a trained model on a fixed probe set.

``analyze_model`` measures the top-k eigenpairs, the trace, the spectral density and per-layer values (the
one measurement of ``hessian.summary``, as ``HessianSpectrumCallback`` makes at each probe), walks the loss
along the top eigenvector(s) (1-D and 2-D), and writes ``report.json``, ``report.md`` and the figures into
one folder. The recipe (``lightning_hessian.recipes.analyze``) loads the checkpoint and
the probe set and calls it; a notebook can call it on any model, loss and batches.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_hessian.checks import check_number, check_positive_int, check_seed
from lightning_hessian.hessian import Batches, HessianOperator, layer_blocks
from lightning_hessian.hessian.operator import LossFn
from lightning_hessian.hessian.summary import SpectrumOptions, measure_spectrum
from lightning_hessian.hessian.trace import MIN_TRACE_SAMPLES
from lightning_hessian.landscape import loss_line, loss_plane
from lightning_hessian.no_trace import leave_no_trace
from lightning_hessian.plots import new_figure, plot_spectral_density, save_figure


@dataclass
class AnalysisOptions:
    """What ``analyze_model`` measures (the ``analysis`` node of ``conf/analyze.yaml``).

    ``radius`` is the largest step along the unit eigenvectors in the landscape plots; ``None`` picks the
    step where the quadratic model ``lambda_1 a^2 / 2`` rises by ``rise`` (loss units), so the plot shows
    the basin at any curvature scale.
    """

    top_k: int = 5
    tol: float = 1e-3
    max_hvps: int = 1000
    trace: bool = True
    trace_rel_tol: float = 0.05
    trace_max_samples: int = 100
    density: bool = True
    density_runs: int = 4
    density_steps: int = 30
    per_layer: bool = True
    radius: float | None = None
    rise: float = 1.0
    points_1d: int = 21
    points_2d: int = 11
    mode: str = "eval"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "max_hvps", "trace_max_samples", "density_runs", "density_steps"):
            check_positive_int(getattr(self, name), name)
        for name in ("points_1d", "points_2d"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 3 or value % 2 == 0:
                raise ValueError(f"{name} must be an odd integer >= 3 (so the grid holds the trained point), "
                                 f"got {value!r}")
        if self.trace_max_samples < MIN_TRACE_SAMPLES:
            raise ValueError(f"trace_max_samples must be >= {MIN_TRACE_SAMPLES} (the probes every trace takes before "
                             f"its stopping rule), got {self.trace_max_samples}")
        for name in ("tol", "trace_rel_tol", "rise"):
            check_number(getattr(self, name), name, 0, low_open=True)
        if self.radius is not None:
            check_number(self.radius, "radius (None: automatic)", 0, low_open=True)
        check_seed(self.seed)
        if self.mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {self.mode!r}")


def analyze_model(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    out_dir: str | Path,
    options: AnalysisOptions | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the Hessian of ``loss_fn`` over ``batches`` at ``model``'s parameters; write the report.

    Returns the report (also saved as ``out_dir/report.json``); figures and ``report.md`` sit beside it.
    ``meta`` (checkpoint, probe set, ...) is copied into the report. The model is left as it was found.

    Example::

        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.analyze import AnalysisOptions, analyze_model
        >>> from lightning_hessian.hessian import dense_hessian
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,)))
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> options = AnalysisOptions(top_k=2, tol=1e-8, density=False, per_layer=False, points_1d=3, points_2d=3)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     report = analyze_model(model, loss_fn, [batch], out, options)
        >>> exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch)).flip(0)[:2]
        >>> torch.allclose(torch.tensor(report["eigenvalues"], dtype=torch.float64), exact), report["num_params"]
        (True, 23)
    """
    opts = options or AnalysisOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {**(meta or {}), "options": vars(opts).copy(), "seconds": {}}
    seconds = report["seconds"]
    with leave_no_trace(model, opts.mode):
        op = HessianOperator(model, loss_fn, Batches(batches))
        report["num_params"] = op.dim
        report["loss"] = op.loss()
        record = measure_spectrum(op, spectrum_options(opts, op.dim))
        eig = record.eigen
        seconds.update(record.part_seconds)
        report["eigenvalues"] = [float(v) for v in eig.eigenvalues[: opts.top_k]]
        report["residual_norms"] = [float(v) for v in eig.residual_norms[: opts.top_k]]
        report["eigen_converged"] = bool(eig.converged)
        report["hvps"] = record.hvps
        if record.trace is not None:
            report["trace"] = {"estimate": record.trace, "std_error": record.trace_std_error,
                               "num_samples": record.trace_samples}
        density = record.density
        if density is not None:
            report["density"] = {"trace": density.trace, "trace_std_error": density.trace_std_error,
                                 "sigma": density.sigma}
        if opts.per_layer:
            sizes = {name: sum(p.numel() for p in params) for name, params in layer_blocks(op.model).items()}
            report["per_layer"] = {}
            for name, value in record.layer_eigenvalue.items():
                layer = report["per_layer"][name] = {"eigenvalue": value, "num_params": sizes[name]}
                if name in record.layer_trace:
                    layer["trace"] = record.layer_trace[name]
                    layer["trace_per_param"] = record.layer_trace[name] / sizes[name]

        start = time.perf_counter()
        report["landscape"] = _landscape(op, eig.eigenvalues, eig.eigenvectors, opts)
        seconds["landscape"] = time.perf_counter() - start

    report["figures"] = _figures(report, density, out)
    (out / "report.json").write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False))
    (out / "report.md").write_text(markdown_report(report))
    return report


def spectrum_options(opts: AnalysisOptions, dim: int) -> SpectrumOptions:
    """The measurement ``analyze_model`` makes (``hessian.summary``, as the spectrum callback's probes): the top
    ``max(top_k, 2)`` pairs (the 2-D landscape needs two), the Krylov-deflated trace, density and per-layer
    values as ``opts`` say."""
    return SpectrumOptions(
        top_k=min(max(opts.top_k, 2), dim), tol=opts.tol, max_hvps=opts.max_hvps, trace=opts.trace,
        trace_rel_tol=opts.trace_rel_tol, trace_min_samples=MIN_TRACE_SAMPLES, trace_max_samples=opts.trace_max_samples,
        per_layer=opts.per_layer, density=opts.density, density_runs=opts.density_runs,
        density_steps=opts.density_steps, seed=opts.seed,
    )


def _landscape(
    op: HessianOperator, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, opts: AnalysisOptions
) -> dict[str, Any]:
    lam = float(eigenvalues[0])
    radius = opts.radius if opts.radius is not None else (math.sqrt(2 * opts.rise / lam) if lam > 0 else 1.0)
    alphas = torch.linspace(-radius, radius, opts.points_1d, dtype=torch.float64)
    line = loss_line(op, eigenvectors[0], alphas)
    h = float(alphas[1] - alphas[0])
    mid = opts.points_1d // 2
    land = {
        "radius": radius,
        "alphas": alphas.tolist(),
        "loss_1d": line.tolist(),
        "quadratic_1d": (line[mid] + 0.5 * lam * alphas**2).tolist(),
        # second difference at the trained point: equals lambda_1 up to O(h^2) where the loss is smooth
        "curvature_1d": float((line[mid + 1] - 2 * line[mid] + line[mid - 1]) / h**2),
    }
    if len(eigenvectors) >= 2:  # a plane needs two directions (one parameter has one)
        grid = torch.linspace(-radius, radius, opts.points_2d, dtype=torch.float64)
        land["grid_2d"] = grid.tolist()
        land["loss_2d"] = loss_plane(op, eigenvectors[0], eigenvectors[1], grid, grid).tolist()
        land["eigenvalues_2d"] = [lam, float(eigenvalues[1])]
    return land


# ---- figures and Markdown -------------------------------------------------------------------------------


def _figures(report: dict[str, Any], density: Any, out: Path) -> dict[str, str]:
    land = report["landscape"]
    figures: dict[str, str] = {}

    with new_figure(figsize=(5, 3.6)) as (fig, ax):
        ax.plot(land["alphas"], land["loss_1d"], label="loss")
        ax.plot(land["alphas"], land["quadratic_1d"], "--",
                label=f"quadratic, $\\lambda_1$={report['eigenvalues'][0]:.3g}")
        ax.set(xlabel="step along top eigenvector", ylabel="loss", title="Loss along the top eigenvector")
        ax.legend(fontsize=8)
        figures["landscape_1d"] = str(save_figure(fig, out / "landscape_1d.png"))

    if "loss_2d" in land:
        with new_figure(figsize=(5, 4.2)) as (fig, ax):
            contour = ax.contourf(land["grid_2d"], land["grid_2d"], torch.tensor(land["loss_2d"]).T.numpy(), levels=30)
            fig.colorbar(contour, ax=ax, label="loss")
            ax.plot([0], [0], "w+", ms=10)
            ax.set(xlabel="$v_1$", ylabel="$v_2$", title="Loss in the plane of the top two eigenvectors")
            figures["landscape_2d"] = str(save_figure(fig, out / "landscape_2d.png"))

    if density is not None:
        figures["density"] = str(plot_spectral_density(density.grid.tolist(), density.density.tolist(),
                                                       out / "spectral_density.png"))
    if report.get("per_layer"):
        names = list(report["per_layer"])
        has_trace = all("trace_per_param" in v for v in report["per_layer"].values())
        with new_figure(1, 2 if has_trace else 1, figsize=(10 if has_trace else 5, 3.6), squeeze=False) as (fig, axes):
            axes[0, 0].barh(names, [report["per_layer"][n]["eigenvalue"] for n in names])
            axes[0, 0].set(xlabel="top eigenvalue", title="Per-layer top eigenvalue")
            axes[0, 0].invert_yaxis()  # the first layer on top
            if has_trace:
                axes[0, 1].barh(names, [report["per_layer"][n]["trace_per_param"] for n in names])
                axes[0, 1].set(xlabel="trace / parameters", title="Per-layer average trace")
                axes[0, 1].invert_yaxis()
            figures["per_layer"] = str(save_figure(fig, out / "per_layer.png"))
    return figures


def _finite_or_null(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no such numbers; e.g. one SLQ run has no error)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: headline numbers, per-layer table and the figures."""
    lines = ["# Hessian analysis", ""]
    if report.get("checkpoint"):
        lines += [f"Checkpoint: `{report['checkpoint']}`", ""]
    lines += [
        f"Parameters: {report['num_params']}; loss on the probe set: {report['loss']:.4f}",
        "",
        "| quantity | value |",
        "| --- | --- |",
    ]
    for i, value in enumerate(report["eigenvalues"]):
        lines.append(f"| eigenvalue {i + 1} | {value:.6g} |")
    if "trace" in report:
        tr = report["trace"]
        lines.append(f"| trace (Hutchinson, {tr['num_samples']} probes) | {tr['estimate']:.6g} ± "
                     f"{_error(tr['std_error'])} |")
    if "density" in report:
        density = report["density"]
        lines.append(f"| trace (SLQ) | {density['trace']:.6g} ± {_error(density['trace_std_error'])} |")
    land = report["landscape"]
    lines.append(f"| curvature along v1 (finite difference) | {land['curvature_1d']:.6g} |")
    if report.get("per_layer"):
        lines += ["", "| layer | parameters | top eigenvalue | trace / parameter |", "| --- | --- | --- | --- |"]
        for name, v in report["per_layer"].items():
            per_param = f"{v['trace_per_param']:.4g}" if "trace_per_param" in v else "-"
            lines.append(f"| {name} | {v['num_params']} | {v['eigenvalue']:.4g} | {per_param} |")
    lines.append("")
    for name, path in report["figures"].items():
        lines += [f"![{name}]({Path(path).name})", ""]
    return "\n".join(lines)


def _error(value: float | None) -> str:
    return f"{value:.2g}" if value is not None and math.isfinite(value) else "n/a"
