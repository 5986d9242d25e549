"""Matplotlib figures: eigenvalue/trace history, spectral density, batch schedules, the Pareto frontier of bit
allocations. Each ``plot_*`` returns the saved path."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@contextmanager
def new_figure(*args: Any, **kwargs: Any) -> Iterator[tuple[plt.Figure, Any]]:
    """``plt.subplots(*args, **kwargs)``, closed when the block ends, also when it raises (no figure piles up)."""
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out and save ``fig`` (creating folders); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_spectrum_history(history: Sequence[dict], path: str | Path) -> Path:
    """Top eigenvalues and trace (with one standard error) against the training step."""
    if not history:
        raise ValueError("plot_spectrum_history: the history is empty (no probe has run)")
    steps = [h["step"] for h in history]
    traces = [(s, h["trace"], h.get("trace_std_error") or 0.0)
              for s, h in zip(steps, history) if h.get("trace") is not None]
    with new_figure(1, 2 if traces else 1, figsize=(10 if traces else 5, 3.6), squeeze=False) as (fig, axes):
        ax = axes[0, 0]
        k = max(len(h.get("eigenvalues", [])) for h in history)
        for i in range(k):
            pts = [(s, h["eigenvalues"][i]) for s, h in zip(steps, history) if len(h.get("eigenvalues", [])) > i]
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"$\\lambda_{i + 1}$")
        ax.set(xlabel="step", ylabel="eigenvalue", title="Top Hessian eigenvalues")
        if k:
            ax.legend(fontsize=8)
        if traces:
            s, t, e = zip(*traces)
            axes[0, 1].errorbar(s, t, yerr=e, marker="o", ms=3, capsize=2)
            axes[0, 1].set(xlabel="step", ylabel="trace", title="Hessian trace (Hutchinson, ±1 s.e.)")
        return save_figure(fig, path)


def plot_spectral_density(grid: Sequence[float], density: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Smoothed spectral density on a log scale, as in the loss-landscape literature."""
    with new_figure(figsize=(5, 3.6)) as (fig, ax):
        ax.semilogy(grid, [max(d, 1e-12) for d in density])
        ax.set(xlabel="eigenvalue", ylabel="density", title=title or "Hessian spectral density (SLQ)")
        return save_figure(fig, path)


def plot_batch_schedule(history: Sequence[dict], path: str | Path) -> Path:
    """Batch size and learning rate against the epoch (and the eigenvalue that drove them, if measured)."""
    epochs = [h["epoch"] for h in history]
    eigs = [(h["epoch"], h["eigenvalue"]) for h in history if h.get("eigenvalue") is not None]
    with new_figure(1, 3 if eigs else 2, figsize=(12 if eigs else 8, 3.4), squeeze=False) as (fig, axes):
        axes[0, 0].step(epochs, [h["batch_size"] for h in history], where="post")
        axes[0, 0].set(xlabel="epoch", ylabel="global batch size", yscale="log", title="Batch size")
        axes[0, 1].plot(epochs, [h["lr"] for h in history])
        axes[0, 1].set(xlabel="epoch", ylabel="learning rate", yscale="log", title="Learning rate")
        if eigs:
            axes[0, 2].plot(*zip(*eigs), marker="o", ms=3, label="measured")
            bounds = [(h["epoch"], h["eigenvalue"]) for h in history
                      if h.get("eigenvalue") is not None and h.get("eigenvalue_lower_bound")]
            if bounds:  # the probe stopped once the value was known to exceed the growth threshold
                axes[0, 2].plot(*zip(*bounds), "o", ms=6, mfc="none", color="tab:orange", label="lower bound")
                axes[0, 2].legend(fontsize=7)
            scale = "log" if all(e > 0 for _, e in eigs) else "symlog"  # a Hessian can curve down
            axes[0, 2].set(xlabel="epoch", ylabel="top eigenvalue", yscale=scale, title="Hessian top eigenvalue")
        return save_figure(fig, path)


def draw_pareto_frontier(ax: Any, costs: Sequence[float], objectives: Sequence[float],
                         chosen: tuple[float, float] | None = None, resource: str = "size",
                         metric: str = "sensitivity") -> None:
    """The exact frontier as the staircase it is (the least summed sensitivity within each budget), its points,
    and the ``chosen`` ``(cost, summed sensitivity)`` marked, onto ``ax``."""
    ax.plot(costs, objectives, drawstyle="steps-post", color="tab:blue", lw=1, label="least sensitivity within budget")
    ax.plot(costs, objectives, "o", ms=3, color="tab:blue", label=f"Pareto frontier ({len(costs)} allocations)")
    if chosen is not None:
        ax.plot(*chosen, "*", ms=14, color="tab:red", label="chosen plan")
    if all(v > 0 for v in objectives) and (chosen is None or chosen[1] > 0):
        ax.set_yscale("log")
    label = {"size": "size (weight bits)", "bops": "BOPS per sample"}.get(resource, resource)
    ax.set(xlabel=label, ylabel=f"summed Omega ({metric})", title=f"Bit allocations: {resource} vs sensitivity")
    ax.legend(fontsize=8)


def plot_pareto_frontier(costs: Sequence[float], objectives: Sequence[float], path: str | Path,
                         chosen: tuple[float, float] | None = None, resource: str = "size",
                         metric: str = "sensitivity") -> Path:
    """:func:`draw_pareto_frontier` alone, saved as ``path`` (e.g. from ``pareto_frontier(..., "all")``)."""
    with new_figure(figsize=(5.5, 4)) as (fig, ax):
        draw_pareto_frontier(ax, costs, objectives, chosen, resource, metric)
        return save_figure(fig, path)
