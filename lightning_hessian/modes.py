"""Train/eval mode for the length of a block, with every submodule's own flag restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """``model.train(train)`` inside the block; on exit each submodule gets its own ``training`` flag back.

    Restoring flags one by one (not ``model.train(old)``) keeps mixed modes, such as a BatchNorm frozen in
    eval inside a training model, whatever the block did to them.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
