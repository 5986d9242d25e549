"""Hutchinson estimate of the Hessian diagonal: ``diag(H) = E[z * (H z)]`` for Rademacher ``z``.

Works on any :class:`LinearOperator` (``dim``, ``dtype``, ``device``, ``matmat(V)``), such as
:class:`HessianOperator` or AdaHessian's gradient graph, so the same estimator serves analysis (with a
standard error and an optional stopping tolerance) and the AdaHessian optimizer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lightning_hessian.checks import check_positive_int
from lightning_hessian.hessian.operator import LinearOperator, working_dtype


class DiagonalEstimate(NamedTuple):
    """Hutchinson estimate of ``diag(H)`` (flat), its per-entry standard error, and the samples used.

    ``stderr`` is the sample standard deviation of ``z * (H z)`` over ``sqrt(num_samples)``; it is NaN
    when only one sample was drawn. Entries of a diagonal ``H`` are exact (``z_i^2 = 1``), so their
    error is zero.
    """

    diagonal: torch.Tensor
    stderr: torch.Tensor
    num_samples: int


def hessian_diagonal(
    op: LinearOperator,
    num_samples: int = 100,
    batch: int | None = None,
    seed: int = 0,
    rel_tol: float | None = None,
) -> DiagonalEstimate:
    """Estimate ``diag(H)`` of ``op`` from ``num_samples`` Rademacher probes, ``batch`` per operator call.

    Each probe ``z`` gives the unbiased sample ``z * (H z)``; the estimate is their mean. With
    ``rel_tol``, sampling stops early once ``||stderr|| <= rel_tol * ||diagonal||`` (checked after each
    batch, from two samples on), so ``num_samples`` is then an upper bound. The probes are drawn from a
    generator seeded with ``seed`` on the operator's device, so every process with the same seed draws
    the same probes (as distributed training needs).

    Example::

        >>> import torch
        >>> from lightning_hessian.hessian import DenseOperator  # or any object with dim, dtype, device, matmat
        >>> est = hessian_diagonal(DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0]))), num_samples=4)
        >>> est.diagonal
        tensor([1., 2., 3.])
    """
    check_positive_int(num_samples, "num_samples")
    batch = check_positive_int(min(num_samples, 16) if batch is None else batch, "batch")
    if rel_tol is not None and not rel_tol > 0:
        raise ValueError(f"rel_tol must be a positive float or None, got {rel_tol!r}")
    # hasattr, not isinstance(op, LinearOperator): a Protocol check costs ~10 us on every AdaHessian step
    if not all(hasattr(op, name) for name in ("dim", "dtype", "device", "matmat")):
        raise TypeError(
            f"op must expose `dim`, `dtype`, `device` and `matmat(V)`, such as HessianOperator; got {type(op).__name__}"
        )
    device, dtype = op.device, op.dtype
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    # Running mean and sum of squared deviations, merged batch by batch (Chan et al.), at least in float32.
    acc_dtype = working_dtype(dtype)
    mean = torch.zeros(op.dim, dtype=acc_dtype, device=device)
    m2 = torch.zeros_like(mean)
    count = 0
    while count < num_samples:
        k = min(batch, num_samples - count)
        z = torch.randint(0, 2, (k, op.dim), generator=generator, device=device, dtype=dtype).mul_(2).sub_(1)
        samples = (z * op.matmat(z)).to(acc_dtype)
        batch_mean = samples[0] if k == 1 else samples.mean(0)
        delta = batch_mean - mean
        total = count + k
        if k > 1:  # the batch's own spread (none for one sample: AdaHessian's every step)
            m2 += ((samples - batch_mean) ** 2).sum(0)
        m2 += delta**2 * (count * k / total)
        mean += delta * (k / total)
        count = total
        if rel_tol is not None and count >= 2 and _stderr(m2, count).norm() <= rel_tol * mean.norm():
            break
    return DiagonalEstimate(mean.to(dtype), _stderr(m2, count).to(dtype), count)


def _stderr(m2: torch.Tensor, count: int) -> torch.Tensor:
    """Standard error of the mean from the sum of squared deviations of ``count`` samples."""
    if count < 2:
        return torch.full_like(m2, math.nan)
    return (m2 / (count - 1) / count).sqrt()
