"""Budgeted probing: run a scheduled Hessian probe only while the probes stay within a share of training time.

``ProbeBudget`` keeps two clocks, training time and probing time, and at each scheduled probe says whether the
full probe (eigenvalues and whatever else was asked for: trace, per-layer values, density), the eigenvalues
alone (a shrunk probe), or nothing fits. A probe's cost is predicted from the last one of its kind (the
first from one timed product), so the probing time stays near ``max_overhead`` times the training time.
Full probes cost several times more, so eigenvalue-only probes may spend only half of the budget while full
ones can recur in the run (or its length is unknown), and leave room for one last full probe when only one
more fits; full probes may use whatever the eigenvalue-only ones leave.
"""

from __future__ import annotations

import math
import time
from typing import Any

now = time.perf_counter  # the clock (a test may replace it)

FULL, EIGEN = "full", "eigen"
PRODUCT = "product"  # seconds of one Hessian-vector product on the probe set (the estimates' unit)


class ProbeBudget:
    """Training and probing time, and the decision at each scheduled probe (``max_overhead=None``: every probe
    runs in full)."""

    def __init__(self, max_overhead: float | None):
        self.max_overhead = max_overhead
        self.train_seconds = 0.0
        self.probe_seconds = 0.0
        self.eigen_seconds = 0.0  # of which eigenvalue-only probes
        self.estimate: dict[str, float] = {}  # predicted seconds of the next full / eigen probe, of one product
        self.skipped = 0
        self.shrunk = 0
        self._clock: float | None = None

    def start(self) -> None:
        """Training (re)starts now."""
        self._clock = now()

    def tick(self) -> None:
        """Add the training time since the last call (or probe) to ``train_seconds``."""
        t = now()
        self.train_seconds += t - (self._clock if self._clock is not None else t)
        self._clock = t

    def decide(self, extras: bool, progress: float | None = None) -> str | None:
        """``"full"``, ``"eigen"`` (only the eigenvalues) or ``None`` (skip) for the probe due now.

        ``extras``: whether a full probe measures more than the eigenvalues; ``progress``: the fraction of the
        run done (``None`` if unknown), which tells whether a full probe can fit the whole run's budget.
        """
        if self.max_overhead is None:
            return FULL
        allowed = self.max_overhead * self.train_seconds
        eigen = self.estimate.get(EIGEN, math.inf)
        full = self.estimate.get(FULL, eigen if not extras else math.inf)
        if not extras:  # a probe is the eigenvalues: charged (and predicted) as "full"
            eigen = full
        if self.probe_seconds + full <= allowed:
            return FULL
        limit, half = allowed, extras
        if extras and progress:
            whole_run = self.max_overhead * self.train_seconds / progress
            half = self.probe_seconds + 2 * full <= whole_run  # full probes can recur: each kind gets half
            if not half and self.probe_seconds + full <= whole_run:  # room for one more: keep it for the end
                limit = min(allowed, whole_run - full)
        if self.probe_seconds + eigen <= limit and (not half or self.eigen_seconds + eigen <= allowed / 2):
            self.shrunk += extras
            return EIGEN
        self.skipped += 1
        return None

    def charge(self, seconds: float, kind: str | None) -> None:
        """Add a probe's (or a timing's, ``kind=None``) seconds; a probe's become the estimate for its kind."""
        self.probe_seconds += seconds
        self.eigen_seconds += seconds if kind == EIGEN else 0.0
        if kind is not None:
            self.estimate[kind] = seconds
        self._clock = now()

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "probe_seconds": self.probe_seconds,
                "eigen_seconds": self.eigen_seconds,
                "estimate": dict(self.estimate), "skipped": self.skipped, "shrunk": self.shrunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.probe_seconds = float(state.get("probe_seconds", 0.0))
        self.eigen_seconds = float(state.get("eigen_seconds", 0.0))
        self.estimate = {k: float(v) for k, v in state.get("estimate", {}).items()}
        self.skipped = int(state.get("skipped", 0))
        self.shrunk = int(state.get("shrunk", 0))
