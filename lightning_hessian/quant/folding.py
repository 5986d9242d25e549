"""BatchNorm folding for deployment: training runs with BatchNorm unfolded; ``fold_batchnorm`` then folds the
frozen statistics into the conv or linear layer whose every output the BatchNorm alone consumes (found by
running the model once and counting each output's users, functional code included)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_hessian.modes import training_mode
from lightning_hessian.quant.swap import BATCHNORMS, set_module

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)  # layers whose output channels a BatchNorm can fold into


class _UseCounter(TorchFunctionMode):
    """Counts the uses of recorded layer outputs: by leaf modules (pre-hooks) and by functional code.

    Ops inside a leaf module's (or quantized layer's) forward belong to it; any other op that takes a recorded output
    and returns a tensor (``y + z``, ``y.view(...)``; not ``y.shape``) is one more, functional, consumer.
    """

    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while a leaf module or a quantized layer runs
        self.producer: dict[int, str] = {}  # id(output) -> layer name
        self.users: dict[int, list[str]] = {}  # id(output) -> consumers, one entry per use
        self.keep: list[Tensor] = []  # hold the outputs so their ids stay unique

    def use(self, consumer: str, args: Any) -> None:
        for a in tree_leaves(args):
            if isinstance(a, Tensor) and id(a) in self.producer:
                self.users[id(a)].append(consumer)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.depth and any(isinstance(o, Tensor) for o in tree_leaves(out)):
            self.use("<functional>", (args, kwargs))
        return out


def _conv_bn_pairs(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """BatchNorm name -> the conv/linear whose every output it alone consumes, normalising its channel axis."""
    counter, bn_inputs = _UseCounter(), {}

    def pre_hook(name):
        def hook(module, args, kwargs):
            if not counter.depth:  # a module inside a quantized layer belongs to the layer
                counter.use(name, (args, kwargs))
            if isinstance(module, BATCHNORMS):
                bn_inputs.setdefault(name, []).append(counter.producer.get(id(args[0]) if args else None))
            counter.depth += 1
        return hook

    def post_hook(name):
        def hook(module, args, out):
            counter.depth -= 1
            # the channel axis is dim 1: a batched conv output, or a Linear output of shape (N, features)
            if isinstance(module, _FOLDABLE) and out.dim() == (2 if isinstance(module, nn.Linear) else
                                                             module.weight.dim()):
                counter.keep.append(out)
                counter.producer[id(out)], counter.users[id(out)] = name, []
        return hook

    handles = []
    for name, m in model.named_modules():
        if not list(m.children()) or isinstance(m, _FOLDABLE):
            handles.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook(name), always_call=True))
    try:
        with training_mode(model, False), torch.no_grad(), counter:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    outputs: dict[str, list[list[str]]] = {}
    for i, layer in counter.producer.items():
        outputs.setdefault(layer, []).append(counter.users[i])
    # every call of the BN reads an output of one layer, and every output of that layer is read by the BN alone
    return {bn: layers[0] for bn, layers in bn_inputs.items()
            if layers[0] is not None and set(layers) == {layers[0]}
            and all(users == [bn] for users in outputs[layers[0]])}


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module, bn_name: str) -> None:
    if bn.running_mean is None:
        raise ValueError(f"BatchNorm {bn_name!r} has no running statistics (track_running_stats=False) to fold")
    if bn.num_features != layer.weight.shape[0]:
        raise ValueError(f"BatchNorm {bn_name!r} has {bn.num_features} features but its layer has "
                         f"{layer.weight.shape[0]} output channels")
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    bias = torch.zeros_like(factor) if layer.bias is None else layer.bias.double()
    bias = (bias - bn.running_mean.double()) * factor
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    w = layer.weight
    w.copy_((w.double() * factor.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(w.dtype))
    else:
        layer.bias.copy_(bias.to(w.dtype))


def fold_batchnorm(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """Fold each BatchNorm's frozen statistics into the conv/linear feeding it; replace it by ``nn.Identity``.

    Works on float and quantized models, in place. The pairs are found by running ``example_input``
    once (eval mode, no state changed): a BatchNorm is folded when it alone consumes every output of a
    Conv1d/Conv2d/Linear (no other module or functional op reads it, no other call of the layer goes
    elsewhere) and normalises the layer's channels (a Linear output of shape ``(N, features)``).
    Create optimizers after folding (a bias-free conv gains a new bias parameter). Returns
    ``{batchnorm name: layer name}``; BatchNorms that could not be folded are warned about.
    """
    pairs = _conv_bn_pairs(model, example_input)
    modules = dict(model.named_modules())
    for bn_name, layer_name in pairs.items():
        _fold(modules[layer_name], modules[bn_name], bn_name)
        set_module(model, bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    if left:
        warnings.warn(f"fold_batchnorm: BatchNorm layers {left} are not the only consumer of a conv/linear "
                      "layer's outputs along its channels and stay unfolded (they block integer conversion)",
                      UserWarning, stacklevel=2)
    return pairs
