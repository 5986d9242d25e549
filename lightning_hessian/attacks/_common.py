"""Shared pieces of the attacks: argument checks, the leave-no-trace context, norms and projections."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.modes import training_mode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")


def check_eps(eps: float, name: str = "eps", allow_inf: bool = False) -> float:
    """Return ``eps`` as a float; ``ValueError`` naming ``name`` unless it is a positive (finite) number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"{name} must be a positive number in input units, got {eps!r}")
    eps = float(eps)
    if not eps > 0 or (math.isinf(eps) and not allow_inf):
        bound = "a positive number (float('inf') for no bound)" if allow_inf else "a positive finite number"
        raise ValueError(f"{name} must be {bound} in input units, got {eps!r}")
    return eps


def check_norm(norm: str) -> str:
    """``ValueError`` unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` is a floating ``(N, ...)`` batch and ``y`` holds ``N`` integer labels."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape (N, ...), got {_describe(x)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},) (one label per sample), "
                         f"got {_describe(y)}")


def check_clamp(clamp: tuple[float, float] | None, x: torch.Tensor) -> tuple[float, float] | None:
    """Validate the valid-input range and that the clean batch lies inside it (else clamping would move it)."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not float(clamp[0]) < float(clamp[1]):
        raise ValueError(f"clamp must be None or a pair (lo, hi) with lo < hi, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if x.numel() and (x.min() < lo or x.max() > hi):
        raise ValueError(
            f"clamp={clamp!r} but x has values in [{x.min().item():.4g}, {x.max().item():.4g}]: pass the data's "
            f"valid range in the units of x (for standardised data, the standardised bounds)"
        )
    return lo, hi


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


@contextmanager
def attack_context(model: nn.Module) -> Iterator[None]:
    """Eval mode and gradients on for the attack, whatever the caller's grad mode.

    ``inference_mode(False)`` plus cloned inputs make attacks work inside Lightning's validation loop.
    """
    with training_mode(model, False), torch.inference_mode(False), torch.enable_grad():
        yield


def detached_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor with the same values; call inside :func:`attack_context`."""
    return t.detach().clone()


def input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None
) -> torch.Tensor:
    """Gradient of the attack loss w.r.t. ``x`` only (parameters' ``.grad`` untouched)."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    loss = F.cross_entropy(out, y, reduction="sum") if loss_fn is None else loss_fn(out, y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def per_sample_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """``(N,)`` L-inf or L2 norms of the flattened samples of ``t``."""
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def as_column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape an ``(N,)`` vector to broadcast against the ``(N, ...)`` tensor ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Nearest point of the ``norm``-ball of radius ``eps`` to each sample of ``delta``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = per_sample_norm(delta, "l2")
    factor = torch.where(n > eps, eps / n.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))
    return delta * as_column(factor, delta)


def into_range(x: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    """Clamp to the valid-input range (identity when ``clamp`` is None)."""
    return x if clamp is None else x.clamp(clamp[0], clamp[1])


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Unit-``norm`` direction of steepest ascent: ``sign(g)`` for L-inf, ``g / ||g||_2`` for L2."""
    if norm == "linf":
        return grad.sign()
    n = per_sample_norm(grad, "l2").clamp_min(torch.finfo(grad.dtype).tiny)
    return grad / as_column(n, grad)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted labels in eval mode without gradients, the model's mode restored."""
    with training_mode(model, False), torch.no_grad():
        return model(x).argmax(1)
