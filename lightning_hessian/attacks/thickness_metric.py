"""BoundaryThickness: the boundary thickness as a torchmetrics ``Metric`` (accumulated over batches, DDP-reduced)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn
from torchmetrics import Metric

from lightning_hessian.attacks._common import Range, check_eps, check_range, predict
from lightning_hessian.attacks.thickness import boundary_thickness, check_band
from lightning_hessian.checks import check_positive_int


class ThicknessStats(NamedTuple):
    """Mean thickness over every sample seen, its standard error (nan below two samples) and the share of
    attacks that reached their target class (0-dim tensors)."""

    mean: torch.Tensor
    std_error: torch.Tensor
    reached: torch.Tensor


class BoundaryThickness(Metric):
    """Boundary thickness (:func:`~lightning_hessian.attacks.boundary_thickness`) accumulated over batches.

    ``update(model, x)`` measures around the model's predicted classes at ``x`` (the paper's definition),
    ``update(model, x, y)`` around the classes ``y`` (e.g. the labels). The states are sums (thickness, its
    square, attacks that reached their target, samples) reduced by torchmetrics' sync, so under DDP
    ``compute()`` on every rank equals one process on the union of the ranks' samples (every rank must call
    it). Targets not given to ``update`` are drawn from a generator seeded with ``seed`` at construction, which
    ``reset()`` does not rewind.

    Example::

        metric = BoundaryThickness(eps=2.0, clamp=(0.0, 1.0))
        for x, _ in loader:
            metric.update(model, x)
        mean, std_error, reached = metric.compute()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        eps: float,
        *,
        alpha: float = 0.0,
        beta: float = 0.75,
        steps: int = 20,
        step_size: float | None = None,
        num_points: int = 128,
        clamp: Range | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        """Args as for :func:`~lightning_hessian.attacks.boundary_thickness`; ``kwargs`` go to ``Metric``."""
        super().__init__(**kwargs)
        self.eps = check_eps(eps)
        self.alpha, self.beta = check_band(alpha, beta)
        self.steps = check_positive_int(steps, "steps")
        self.step_size = None if step_size is None else check_eps(step_size, "step_size")
        self.num_points = check_positive_int(num_points, "num_points")
        self.clamp = check_range(clamp)
        self.generator = torch.Generator().manual_seed(seed)
        for name in ("total", "total_sq", "reached", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> None:
        """Add the thickness of ``model`` around the samples ``x`` of classes ``y`` (None: the model's predictions),
        towards ``targets`` if given (else drawn among the other classes)."""
        if y is None:
            y = predict(model, x)
        result = boundary_thickness(
            model, x, y, self.eps, alpha=self.alpha, beta=self.beta, targets=targets, steps=self.steps,
            step_size=self.step_size, num_points=self.num_points, clamp=self.clamp, generator=self.generator,
        )
        values = result.per_sample.to(self.total.device, torch.float64)
        self.total += values.sum()
        self.total_sq += values.square().sum()
        self.reached += result.reached.sum().to(self.reached.device)
        self.count += values.numel()

    def compute(self) -> ThicknessStats:
        n = self.count
        mean = self.total / n
        variance = (self.total_sq - n * mean.square()).clamp_min(0) / (n - 1)
        std_error = (variance / n).sqrt() if n > 1 else mean.new_tensor(math.nan)
        return ThicknessStats(mean, std_error, self.reached / n)
