"""What a mixed-precision plan does per layer: bits, Hessian sensitivity, size and BOPS against float.

A :class:`BitReport` is the table HAWQ runs are judged by (which layers kept 8 bits and why); it renders
as markdown and as a bar plot (beside the exact Pareto frontier of cost against summed sensitivity, with the
plan marked, when a :class:`Frontier` is given), and :meth:`BitReport.save` writes both into a run's output
folder.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_hessian.quant.allocation import ParetoPoint, allocation_total
from lightning_hessian.quant.costs import FLOAT_BITS, LayerStats, check_layer_bits
from lightning_hessian.quant.sensitivity import Sensitivity


@dataclass(frozen=True)
class LayerRow:
    """One quantizable layer: its bits (``None``: left in float) and what they cost against float.

    ``size_bits`` counts weights at ``bits`` and the bias at 32 bits; BOPS are per sample
    (``MACs * b_w * b_a``, 32 x 32 for float). ``avg_trace``/``top_eigenvalue``/``omega`` are ``None``
    when no sensitivity was measured.

    >>> stats = {"fc": LayerStats("Linear", params=64, bias=2, macs=64)}
    >>> row = bit_report(stats, {"fc": 4}).rows[0]  # activations at the weights' 4 bits
    >>> row.size_bits, row.float_size_bits, row.bops, row.float_bops
    (320.0, 2112.0, 1024.0, 65536.0)
    """

    name: str
    kind: str
    params: int
    bits: int | None
    avg_trace: float | None
    top_eigenvalue: float | None
    omega: float | None
    size_bits: float
    float_size_bits: float
    bops: float
    float_bops: float


@dataclass(frozen=True)
class Frontier:
    """The exact Pareto frontier of ``resource`` against the summed sensitivity (``pareto_frontier(..., "all")``,
    within ``fixed`` budgets on other resources) and the plan's own ``(chosen_cost, chosen_objective)``."""

    resource: str
    costs: tuple[float, ...]
    objectives: tuple[float, ...]
    chosen_cost: float
    chosen_objective: float
    fixed: tuple[tuple[str, float], ...] = ()

    def least_within(self, budget: float) -> float:
        """The least summed sensitivity of an allocation costing at most ``budget`` (``inf`` if none)."""
        i = bisect.bisect_right(self.costs, budget)
        return self.objectives[i - 1] if i else float("inf")

    def to_markdown(self) -> str:
        within = "".join(f", {r} <= {b:.4g}" for r, b in self.fixed)
        best = self.least_within(self.chosen_cost * (1 + 1e-12))
        return (f"Pareto frontier ({self.resource} against summed Omega{within}): {len(self.costs)} non-dominated "
                f"allocations, {self.resource} {self.costs[0]:.4g} to {self.costs[-1]:.4g}. This plan: "
                f"{self.resource} {self.chosen_cost:.4g}, summed Omega {self.chosen_objective:.4g} (the least at that "
                f"{self.resource}: {best:.4g}).")


def frontier_of(points: Sequence[ParetoPoint], resource: str, costs: Mapping[str, Mapping[int, float]],
                sensitivity: Mapping[str, Mapping[int, float]], bits: Mapping[str, int],
                fixed: Mapping[str, float] | None = None) -> Frontier:
    """A :class:`Frontier` from ``pareto_frontier(..., resource, "all")`` points and the plan ``bits``, priced with
    ``costs`` (the resource's table) and ``sensitivity``."""
    return Frontier(resource, tuple(p.budget for p in points), tuple(p.objective for p in points),
                    allocation_total(costs, bits), allocation_total(sensitivity, bits),
                    tuple((r, float(b)) for r, b in (fixed or {}).items()))


@dataclass(frozen=True)
class BitReport:
    """Per-layer rows and their totals; ``to_markdown()``, ``plot(path)`` and ``save(folder)``.

    >>> stats = {"conv": LayerStats("Conv1d", params=12, bias=4, macs=96), "fc": LayerStats("Linear", 64, 2, 64)}
    >>> report = bit_report(stats, {"conv": 8, "fc": 4}, activation_bits=8)
    >>> report.size_bits, report.float_size_bits  # 12 x 8 + 64 x 4 weight bits, 6 biases at 32 bits
    (544.0, 2624.0)
    >>> report.bops  # per sample: 96 MACs x 8 x 8 + 64 MACs x 4 x 8
    8192.0
    """

    rows: tuple[LayerRow, ...]
    activation_bits: int | None
    metric: str = "trace"
    frontier: Frontier | None = None

    @property
    def size_bits(self) -> float:
        return sum(r.size_bits for r in self.rows)

    @property
    def float_size_bits(self) -> float:
        return sum(r.float_size_bits for r in self.rows)

    @property
    def bops(self) -> float:
        return sum(r.bops for r in self.rows)

    @property
    def float_bops(self) -> float:
        return sum(r.float_bops for r in self.rows)

    def to_markdown(self) -> str:
        """A markdown table: one row per layer and a total row with the compression against float."""
        lines = [
            "| layer | type | weights | bits | Tr(H)/n | top eig. | Omega(bits) | size KB (float) | MBOPS (float) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.kind} | {r.params} | {r.bits if r.bits is not None else 'float'} | "
                f"{_num(r.avg_trace)} | {_num(r.top_eigenvalue)} | {_num(r.omega)} | "
                f"{_kb(r.size_bits)} ({_kb(r.float_size_bits)}) | {_mega(r.bops)} ({_mega(r.float_bops)}) |"
            )
        lines.append(
            f"| **total** | | {sum(r.params for r in self.rows)} | | | | | "
            f"{_kb(self.size_bits)} ({_kb(self.float_size_bits)}), {_times(self.float_size_bits, self.size_bits)} | "
            f"{_mega(self.bops)} ({_mega(self.float_bops)}), {_times(self.float_bops, self.bops)} |"
        )
        acts = "as the weights" if self.activation_bits is None else f"{self.activation_bits} bits"
        lines.append("")
        lines.append(f"Activations: {acts}. Size: weights at their bits, biases at 32 bits. BOPS per sample. "
                     f"Omega: the {self.metric} metric.")
        if self.frontier is not None:
            lines += ["", self.frontier.to_markdown()]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Bar plot of the bits per layer over the layers' average Hessian trace (log scale), beside the Pareto
        frontier with the plan marked if there is one; saved as PNG."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [r.name for r in self.rows]
        xs = range(len(names))
        width = max(6.0, 0.45 * len(names) + 2)
        if self.frontier is None:
            fig, ax = plt.subplots(figsize=(width, 4.0))
        else:
            fig, (ax, right) = plt.subplots(1, 2, figsize=(width + 5.5, 4.0), gridspec_kw={"width_ratios": [width, 5]})
        try:
            if self.frontier is not None:
                from lightning_hessian.plots import draw_pareto_frontier

                f = self.frontier
                draw_pareto_frontier(right, f.costs, f.objectives, (f.chosen_cost, f.chosen_objective), f.resource,
                                     self.metric)
            bits = [r.bits if r.bits is not None else FLOAT_BITS for r in self.rows]
            colors = ["tab:gray" if r.bits is None else plt.cm.viridis((r.bits - 2) / 6) for r in self.rows]
            ax.bar(xs, bits, color=colors)
            ax.set_ylabel("weight bits (float shown as 32)")
            ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
            traces = [r.avg_trace for r in self.rows]
            if all(t is not None and t > 0 for t in traces):
                twin = ax.twinx()
                twin.plot(list(xs), traces, "o-", color="tab:red")
                twin.set_yscale("log")
                twin.set_ylabel("Tr(H)/n", color="tab:red")
            ax.set_title(f"bits per layer: size {_times(self.float_size_bits, self.size_bits)} smaller, "
                         f"BOPS {_times(self.float_bops, self.bops)} fewer than float")
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path

    def save(self, folder: str | Path, stem: str = "hawq_report") -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.png`` into ``folder``; return both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        table = folder / f"{stem}.md"
        table.write_text(self.to_markdown() + "\n")
        return table, self.plot(folder / f"{stem}.png")


def bit_report(
    stats: Mapping[str, LayerStats],
    bits: Mapping[str, int],
    sensitivity: Sensitivity | None = None,
    activation_bits: int | None = None,
    metric: str = "trace",
    frontier: Frontier | None = None,
) -> BitReport:
    """Report for the layers of ``stats`` (from :func:`~lightning_hessian.quant.costs.layer_stats`).

    ``bits[layer]`` are the weight bits (layers absent stay float); ``sensitivity`` adds the Hessian
    columns (``Omega`` at the chosen bits by ``metric``, when it was measured); ``activation_bits`` as in
    :func:`~lightning_hessian.quant.costs.bops_costs` (``None``: the same width as the weights); ``frontier``
    (:func:`frontier_of`) adds the Pareto frontier to the text and the plot.
    """
    check_layer_bits(stats, bits)
    omega = sensitivity.omega(metric) if sensitivity is not None and metric in sensitivity.metrics else {}
    rows = []
    for name, s in stats.items():
        b = bits.get(name)
        wb, ab = (FLOAT_BITS, FLOAT_BITS) if b is None else (b, activation_bits or b)
        rows.append(LayerRow(
            name=name,
            kind=s.kind,
            params=s.params,
            bits=b,
            avg_trace=sensitivity.avg_trace.get(name) if sensitivity is not None else None,
            top_eigenvalue=sensitivity.top_eigenvalue.get(name) if sensitivity is not None else None,
            omega=omega[name].get(b) if name in omega and b is not None else None,
            size_bits=float(s.params * wb + s.bias * FLOAT_BITS),
            float_size_bits=float((s.params + s.bias) * FLOAT_BITS),
            bops=float(s.macs * wb * ab),
            float_bops=float(s.macs * FLOAT_BITS * FLOAT_BITS),
        ))
    return BitReport(tuple(rows), activation_bits, metric, frontier)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _times(float_value: float, value: float) -> str:
    """How many times smaller than float (``n/a`` when nothing was counted, e.g. no layer ran)."""
    return f"{float_value / value:.2f}x" if value else "n/a"


def _kb(size_bits: float) -> str:
    return f"{size_bits / 8 / 1024:.2f}"


def _mega(ops: float) -> str:
    return f"{ops / 1e6:.2f}"
