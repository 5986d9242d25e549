"""Shared pieces of the attacks: argument checks, the leave-no-trace context, norms and projections."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.checks import check_choice
from lightning_hessian.modes import training_mode

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``criterion(logits, y) -> scalar``: the loss an attack ascends (default cross-entropy)."""
Attack = Callable[..., Any]
"""``attack(model, x, y, **options) -> x_adv`` (typed loosely so that LightningCLI accepts any such callable)."""
NORMS = ("linf", "l2")


def check_eps(eps: float, name: str = "eps", allow_inf: bool = False) -> float:
    """Return ``eps`` as a float; ``ValueError`` naming ``name`` unless it is a positive (finite) number."""
    if isinstance(eps, bool) or not isinstance(eps, Real):  # numpy scalars too
        raise ValueError(f"{name} must be a positive number in input units, got {eps!r}")
    eps = float(eps)
    if not eps > 0 or (math.isinf(eps) and not allow_inf):
        bound = "a positive number (float('inf') for no bound)" if allow_inf else "a positive finite number"
        raise ValueError(f"{name} must be {bound} in input units, got {eps!r}")
    return eps


def check_norm(norm: str) -> str:
    """``ValueError`` unless ``norm`` is one of :data:`NORMS`."""
    check_choice(norm, "norm", NORMS)
    return norm


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` is a floating ``(N, ...)`` batch and ``y`` holds ``N`` integer labels."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape (N, ...), got {_describe(x)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},) (one label per sample), "
                         f"got {_describe(y)}")


Range = tuple[float | tuple[float, ...], float | tuple[float, ...]]


def check_range(clamp: object, name: str = "clamp") -> Range | None:
    """``clamp`` as ``(lo, hi)`` with ``lo < hi``: two numbers, or two per-channel sequences of one length (the
    channels are dim 1 of ``x``, e.g. the pixel range of standardised RGB data); ``ValueError`` naming ``name``."""
    if clamp is None:
        return None
    pair = [_bound(b) for b in clamp] if isinstance(clamp, Sequence) and not isinstance(clamp, str) else []
    lengths = {len(b) for b in pair if isinstance(b, tuple)}
    if len(pair) != 2 or None in pair or len(lengths) > 1 or 0 in lengths or not bool(
            (torch.tensor(pair[0]) < torch.tensor(pair[1])).all()):
        raise ValueError(f"{name} must be None or a pair (lo, hi) with lo < hi: two numbers, or two per-channel "
                         f"sequences of equal length, got {clamp!r}")
    return pair[0], pair[1]


def _bound(value: object) -> float | tuple[float, ...] | None:
    def number(v: object) -> bool:
        return isinstance(v, Real) and not isinstance(v, bool)

    if number(value):
        return float(value)
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str) and all(number(v) for v in value):
        return tuple(float(v) for v in value)
    return None


def check_clamp(clamp: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The valid-input range as two tensors that broadcast against ``x`` (per-channel bounds along dim 1),
    after checking that the clean batch lies inside it, up to a few units of rounding in ``x``'s dtype."""
    bounds = check_range(clamp)
    if bounds is None:
        return None
    lo, hi = (_bound_tensor(b, x) for b in bounds)
    slack = 4 * torch.finfo(x.dtype).eps * max(1.0, float(torch.maximum(lo.abs(), hi.abs()).max()))
    if x.numel() and (bool((x < lo - slack).any()) or bool((x > hi + slack).any())):
        raise ValueError(
            f"clamp={clamp!r} but x has values in [{x.min().item():.9g}, {x.max().item():.9g}] outside it: pass the "
            "data's valid range in the units of x (for standardised data, the standardised bounds)"
        )
    return lo, hi


def _bound_tensor(bound: float | tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(bound, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    if x.dim() < 2 or x.shape[1] != len(t):
        raise ValueError(f"clamp holds {len(t)} per-channel bounds but x of shape {tuple(x.shape)} has "
                         f"{x.shape[1] if x.dim() > 1 else 'no'} channels (dim 1)")
    return t.view(1, -1, *([1] * (x.dim() - 2)))


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
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Criterion | None
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


def into_range(x: torch.Tensor, clamp: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Clamp to the valid-input range from :func:`check_clamp` (identity when ``clamp`` is None)."""
    return x if clamp is None else torch.clamp(x, clamp[0], clamp[1])


def adversarial_result(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str,
                       clamp: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """What an attack returns: ``x_adv`` projected onto the ``eps``-ball around ``x`` in float64, rounded to
    ``x``'s dtype with no coordinate farther from ``x`` than its projected value (rounding ``x + delta``, by
    up to 0.4% of a value in bfloat16, never leaves the ball), clamped to the valid range and detached."""
    if not math.isinf(eps):
        x64 = x.double()
        delta = project(x_adv.double() - x64, eps, norm)
        rounded = (x64 + delta).to(x_adv.dtype)
        x_adv = torch.where((rounded.double() - x64).abs() > delta.abs(), torch.nextafter(rounded, x), rounded)
    return into_range(x_adv, clamp).detach()


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
