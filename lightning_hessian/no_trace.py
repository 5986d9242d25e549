"""Run a diagnostic on a module and leave no trace: modes, buffers, RNG, grads and flags come back."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from lightning_hessian.modes import training_mode


@contextmanager
def leave_no_trace(module: nn.Module, mode: str = "eval") -> Iterator[None]:
    """Put ``module`` in ``mode`` ("eval" or "train") with grad enabled; restore everything on exit.

    Restored: each submodule's ``training`` flag, every buffer (BatchNorm running statistics and counters),
    the torch / CUDA / NumPy / Python RNG states, each parameter's ``.grad`` and ``requires_grad``.
    Works when the caller is under ``torch.inference_mode()`` (Lightning's evaluation default).
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    params = dict(module.named_parameters())
    grads = {name: p.grad for name, p in params.items()}
    flags = {name: p.requires_grad for name, p in params.items()}
    rng = (
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        np.random.get_state(),
        random.getstate(),
    )
    try:
        for p in params.values():
            p.grad = None  # the diagnostic's own gradients must not accumulate into the caller's
        with training_mode(module, mode == "train"), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        for name, p in params.items():
            p.grad = grads[name]
            p.requires_grad_(flags[name])
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        np.random.set_state(rng[2])
        random.setstate(rng[3])
