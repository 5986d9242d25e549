"""Data-free calibration data (ZeroQ): inputs whose BatchNorm statistics match the model's own.

A trained network's BatchNorm layers remember the per-channel mean and variance of their inputs over the
training data. ZeroQ (Cai et al., CVPR 2020) turns that memory into data: starting from Gaussian noise, a
batch of inputs is optimised so that at every BatchNorm layer ``l`` the batch's per-channel mean and
standard deviation of the layer's input match the running mean ``mu_l`` and ``sigma_l = sqrt(running_var)``,

    ``L(x) = sum_l (||mu_l(x) - mu_l||^2 + ||sigma_l(x) - sigma_l||^2) / C_l  +  prior(x)``,

with ``C_l`` the layer's channels (so a wide layer does not outweigh a narrow one) and ``prior(x)`` the same
two terms for the input itself against an assumed input distribution (ZeroQ's input prior: standardised
inputs, mean 0 and standard deviation 1 per channel). Each batch is optimised on its own (Adam), so each
batch alone has the training data's statistics, which is what activation-range calibration and sensitivity
measurements see. The distilled data then stands in for training data: calibration, sensitivity, planning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_hessian.checks import check_number, check_positive_int
from lightning_hessian.modes import training_mode

_STD_EPS = 1e-8  # inside the square root of the batch variance: a finite gradient at zero spread


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers of ``model`` that hold running statistics (what :func:`distill_data` matches)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None}


def distill_data(
    model: nn.Module,
    input_shape: Sequence[int],
    num_samples: int,
    *,
    batch_size: int = 32,
    max_steps: int = 500,
    lr: float = 0.5,
    tol: float = 0.05,
    patience: int = 50,
    input_prior: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """``num_samples`` inputs of shape ``input_shape`` whose BatchNorm statistics match ``model``'s (ZeroQ).

    Args:
        model: a trained network with BatchNorm layers (``BatchNorm1d``/``2d`` after ``Conv1d``/``Conv2d``/
            ``Linear`` layers, any nesting); it is run in eval mode and left as found (modes, buffers,
            gradients, ``requires_grad``).
        input_shape: the shape of one input sample, e.g. ``(3, 32, 32)`` or ``(40,)``.
        num_samples: how many inputs to distil, in batches of ``batch_size`` (the last may be smaller), each
            batch optimised on its own from its own Gaussian start.
        max_steps: Adam steps per batch at most; ``lr`` its learning rate (halved whenever the loss has not
            improved for ``patience // 2`` steps).
        tol: stopping rule: a batch stops once every BatchNorm layer's statistics are within ``tol`` of its
            running statistics as :func:`batchnorm_mismatch` measures them (in running standard deviations;
            a real batch of 32 is typically 0.1-0.2 off at its worst layer, of 128 about 0.1), or once the
            loss has not improved by 0.1% in ``patience`` steps. The batch with the lowest loss seen is
            returned.
        input_prior: ``(mean, std)`` the inputs are pulled towards per channel (dimension 1 of a sample with
            more than one dimension), ZeroQ's standardised-input prior by default; ``None`` leaves the input
            free.
        seed: seed of the Gaussian starts (drawn on the CPU, so the result does not depend on ``device``;
            on CPU the whole result is deterministic, on CUDA as far as its kernels are).
        device: where to optimise; default the model's device (the model is moved there and back).
        progress: show a progress bar (tqdm) over the steps.

    Returns:
        A ``(num_samples, *input_shape)`` tensor on ``device`` in the model's floating dtype.

    Raises:
        ValueError: the model has no BatchNorm layer with running statistics (ZeroQ has nothing to match:
            calibrate on real data instead), a BatchNorm layer never ran on such an input, or malformed
            arguments.
    """
    shape = _check_shape(input_shape)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(max_steps, "max_steps")
    check_positive_int(patience, "patience")
    check_number(lr, "lr", 0, low_open=True)
    check_number(tol, "tol", 0)
    prior = None
    if input_prior is not None:
        mean, std = input_prior
        prior = (check_number(mean, "input_prior mean"), check_number(std, "input_prior std", 0, low_open=True))
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no BatchNorm layer with running statistics, so there is "
                         "nothing to distil data from (ZeroQ matches BatchNorm statistics); calibrate on real data "
                         "(a few training batches) instead")
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    if device is None:
        device = first.device if first is not None else "cpu"
    device = torch.device(device)
    starts = torch.randn((num_samples, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    bar = _progress_bar(len(sizes) * max_steps, progress)
    with _frozen(model, device), _captured_inputs(layers) as captured:
        out = [_distil_batch(model, layers, captured, start.to(device), prior, max_steps, lr, tol, patience, bar)
               for start in starts.split(sizes)]
    if bar is not None:
        bar.close()
    return torch.cat(out)


def batchnorm_mismatch(model: nn.Module, inputs: Tensor) -> dict[str, float]:
    """How far the per-channel statistics of ``inputs`` are from each BatchNorm layer's running statistics.

    For every layer: ``sqrt(mean_c[((mu_c(x) - mu_c) / s_c)^2 + (sigma_c(x) / s_c - 1)^2])`` with
    ``s_c = sqrt(running_var_c + eps)``, the root-mean-square over channels of the mean's and the standard
    deviation's errors in units of the running standard deviation (0: a perfect match; about 1 or more:
    unrelated data). Runs ``model`` in eval mode on ``inputs`` as one batch and leaves it as found.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no BatchNorm layer with running statistics")
    device = next(model.parameters()).device
    with _frozen(model, device), _captured_inputs(layers) as captured, torch.no_grad():
        model(inputs.to(device))
        out = {}
        for name, bn in _ran(layers, captured, tuple(inputs.shape[1:])).items():
            out[name] = float(_mismatch(bn, *_channel_stats(captured[name])))
    return out


def _distil_batch(model: nn.Module, layers: dict[str, _BatchNorm], captured: dict[str, Tensor], start: Tensor,
                  prior: tuple[float, float] | None, max_steps: int, lr: float, tol: float, patience: int,
                  bar: object | None) -> Tensor:
    """One batch from ``start``: Adam on the statistics loss until the stopping rule; the best batch seen."""
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    best_loss, best_x, since_best, since_decay = math.inf, start, 0, 0
    for step in range(max_steps):
        captured.clear()
        model(x)
        loss, worst = _statistics_loss(layers, captured, x, prior, tuple(start.shape[1:]))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"distill_data: the statistics loss became {value} at step {step}; lower lr")
        if value < best_loss * (1 - 1e-3):
            since_best = since_decay = 0
        else:
            since_best += 1
            since_decay += 1
        if value < best_loss or worst <= tol:
            best_loss, best_x = value, x.detach().clone()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{best_loss:.3g}", refresh=False)
        if worst <= tol or since_best >= patience:
            if bar is not None:
                bar.update(max_steps - step - 1)
            break
        if since_decay >= max(patience // 2, 1):
            for group in optimizer.param_groups:
                group["lr"] /= 2
            since_decay = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return best_x


def _statistics_loss(layers: dict[str, _BatchNorm], captured: dict[str, Tensor], x: Tensor,
                     prior: tuple[float, float] | None, shape: tuple[int, ...]) -> tuple[Tensor, float]:
    """The module docstring's ``L`` (each BatchNorm layer's mean and std errors, plus the input prior) and the
    worst layer's :func:`batchnorm_mismatch`."""
    terms, mismatches = [], []
    for name, bn in _ran(layers, captured, shape).items():
        mean, std = _channel_stats(captured[name])
        terms.append((mean - bn.running_mean).square().mean() + (std - bn.running_var.sqrt()).square().mean())
        mismatches.append(_mismatch(bn, mean.detach(), std.detach()))
    if prior is not None:
        mean, std = _channel_stats(x if x.dim() > 2 else x.unsqueeze(1))
        terms.append((mean - prior[0]).square().mean() + (std - prior[1]).square().mean())
    return torch.stack(terms).sum(), float(torch.stack(mismatches).max())


def _mismatch(bn: _BatchNorm, mean: Tensor, std: Tensor) -> Tensor:
    """RMS over channels of the mean's and the std's errors in units of the running std (``batchnorm_mismatch``;
    the std with the layer's ``eps``, as it normalises, so a dead channel does not divide by zero)."""
    sigma = (bn.running_var + bn.eps).sqrt()
    return (((mean - bn.running_mean) / sigma).square() + (std / sigma - 1).square()).mean().sqrt()


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dimension 1) mean and standard deviation over the batch and every other dimension."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, (var + _STD_EPS).sqrt()


def _ran(layers: dict[str, _BatchNorm], captured: dict[str, Tensor], shape: tuple[int, ...]) -> dict[str, _BatchNorm]:
    """``layers``, checked to have all seen an input in the forward that just ran."""
    missing = [name for name in layers if name not in captured]
    if missing:
        raise ValueError(f"BatchNorm layers {missing} did not run in the forward of an input of shape {shape}; "
                         "distill_data matches every BatchNorm layer of the model, so every one must run")
    return layers


@contextmanager
def _captured_inputs(layers: dict[str, _BatchNorm]) -> Iterator[dict[str, Tensor]]:
    """The latest input of each layer (by name), recorded by forward pre-hooks that are removed on exit."""
    captured: dict[str, Tensor] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            captured[name] = args[0]
        return hook

    handles = [bn.register_forward_pre_hook(record(name)) for name, bn in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _frozen(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` in eval mode on ``device`` with frozen parameters and grad enabled; everything restored on exit
    (each submodule's mode, every buffer, each parameter's ``.grad``, ``requires_grad`` and device)."""
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    grads = {name: p.grad for name, p in params.items()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    home = next(iter(params.values())).device if params else device
    try:
        model.to(device)
        for p in params.values():
            p.requires_grad_(False)
        with training_mode(model, False), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        model.to(home)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = grads[name]


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape:
        raise ValueError(f"input_shape must be the shape of one sample, e.g. (3, 32, 32), got {input_shape!r}")
    for size in input_shape:
        check_positive_int(size, f"input_shape {tuple(input_shape)}: every size")
    return tuple(int(s) for s in input_shape)


def _progress_bar(total: int, enabled: bool) -> object | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # a dependency of Lightning; only needed when asked for

    return tqdm(total=total, desc="distill_data", unit="step")
