"""K-FAC preconditioning of the gradients of any optimizer (pure torch; the Lightning callback wraps it).

Hooks on the model's ``Linear``, ``Conv1d`` and ``Conv2d`` layers capture, during the training step's own forward
and backward, each layer's inputs and output gradients; at ``step`` they become the running averages of the
Kronecker factors ``A`` (inputs) and ``G`` (output gradients) of :mod:`lightning_hessian.hessian.kfac`, with ``G``
the empirical Fisher of the per-sample losses, as the backward computes it. Then every layer's gradient ``[dW | db]``
is replaced by ``(G (x) A + damping I)^{-1} [dW | db]``, solved exactly on the Kronecker eigenvalues
(``dG_i dA_j + damping``, the convention of kfac-pytorch's eigen method), and the optimizer takes its step on the
preconditioned gradients (its weight decay, momentum and clipping apply on top).

Scale: ``A`` is the mean of ``a a^T`` over rows, ``G = N sum g g^T`` over the rows of one optimizer step, ``N`` its
samples (summed over gradient-accumulation micro-batches and divided by any loss scale), so ``G`` is the mean over
samples of ``dl_n/ds dl_n/ds^T`` when the training loss is the mean over the step's samples (Lightning divides each
micro-batch loss by ``accumulate_grad_batches``, which is that mean). Under ``torch.distributed`` the factors are
all-reduced with sample weights (one all-reduce per factor update) and each factor's eigendecomposition is computed
on one rank (assigned by cost, as KAISA's communication-optimal mode) and shared by one more all-reduce, so every
rank applies the same update as one process on the union of the ranks' batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_hessian.checks import check_choice, check_number, check_positive_int
from lightning_hessian.distributed import is_distributed
from lightning_hessian.hessian.kfac import (
    KFAC_APPROX,
    KFACLayer,
    KroneckerEigen,
    kfac_layers,
    symmetric_eigen,
)
from lightning_hessian.hessian.operator import working_dtype


class _LayerState:
    """One layer: its parameters, the factors captured since the last update, their running averages and eigen."""

    def __init__(self, name: str, module: nn.Module, weight: bool, bias: bool):
        self.name, self.layer = name, KFACLayer(module)
        self.weight, self.bias = weight, bias
        self.params = [p for p, keep in ((module.weight, weight), (getattr(module, "bias", None), bias)) if keep]
        self.dtype = working_dtype(module.weight.dtype)
        self.d_a = (self.layer.d_in if weight else 0) + bias
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.eigen: KroneckerEigen | None = None
        self.reset()

    def reset(self) -> None:
        self.A_sum: torch.Tensor | None = None
        self.G_sum: torch.Tensor | None = None
        self.rows = 0
        self.samples: dict[int, int] = {}  # pass id -> samples seen by this layer in it

    def capture(self, x: torch.Tensor, g: torch.Tensor, approx: str, pass_id: int) -> None:
        if self.A_sum is None:
            self.A_sum = torch.zeros(self.d_a, self.d_a, dtype=self.dtype, device=x.device)
            self.G_sum = torch.zeros(self.layer.out, self.layer.out, dtype=self.dtype, device=x.device)
        self.rows += self.layer.input_moment(x, approx, self.weight, self.bias, self.A_sum)
        self.layer.grad_moment(g, approx, self.G_sum)
        self.samples[pass_id] = max(self.samples.get(pass_id, 0), self.layer.samples(g))

    def gradient(self) -> torch.Tensor | None:
        """``[dW | db]`` as an ``(out, d_A)`` matrix, or ``None`` when a parameter has no gradient this step."""
        if any(p.grad is None for p in self.params):
            return None
        parts = []
        if self.weight:
            parts.append(self.params[0].grad.reshape(self.layer.out, -1))
        if self.bias:
            parts.append(self.params[-1].grad.reshape(self.layer.out, 1))
        return torch.cat(parts, 1).to(self.dtype)

    def write(self, M: torch.Tensor) -> None:
        if self.weight:
            self.params[0].grad.copy_(M[:, : self.layer.d_in].reshape(self.params[0].shape))
        if self.bias:
            self.params[-1].grad.copy_(M[:, -1])


class KFACPreconditioner:
    """K-FAC for any optimizer: call ``step`` after the backward (gradient accumulation included), before
    ``optimizer.step()``.

    Args:
        model: the network; hooks are registered on its supported layers with trainable parameters (``remove()``
            takes them off). ``nn.MultiheadAttention`` (its projections run inside a functional call no hook sees),
            grouped convolutions and layers of other types are skipped: ``skipped`` says which and why, and their
            gradients reach the optimizer unchanged.
        factor_update_steps: capture the factors and update their running averages every this many steps (the
            hooks do nothing on the other steps).
        inv_update_steps: recompute the eigendecompositions every this many steps (also when a layer has none).
        damping: ``lambda`` in ``(G (x) A + lambda I)^{-1}``, added to the Kronecker eigenvalues. It is relative to
            the per-sample Fisher (``G`` is a mean over samples, not divided by the batch size twice as
            kfac-pytorch's is, where the same number is a far larger damping): tune it like the learning rate.
            The defaults (damping 0.3, KL clip 0.01) are those of the MNIST-1D batch-size sweep
            (``benchmarks/kfac_batch_size.py``).
        factor_decay: running average ``F <- decay F + (1 - decay) F_new`` (the first capture is taken as is).
        kl_clip: scale the preconditioned gradients by ``min(1, sqrt(kl_clip / sum lr^2 <p, g>))``, the
            KL-clipping of Ba et al. 2017 (``lr`` of each parameter's group), or ``None`` to not clip.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-shared layers (see :mod:`~lightning_hessian.hessian.kfac`).
        skip_layers: module names (or name prefixes) to leave out.
        gated: capture only between ``open_window()`` and ``close_window()`` (the Lightning callback brackets the
            training step's backward with them, so other backward passes, e.g. an adversarial attack's, are not
            counted); otherwise every backward pass through the model between two steps counts.
        distributed, process_group: as for the operators (default: when a process group is initialised).

    Example::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from lightning_hessian.optim import KFACPreconditioner
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> precond = KFACPreconditioner(model, inv_update_steps=10, damping=0.3)
        >>> first = F.cross_entropy(model(x), y).item()
        >>> for _ in range(20):
        ...     optimizer.zero_grad()
        ...     F.cross_entropy(model(x), y).backward()
        ...     precond.step(optimizer)   # replaces each layer's gradient by its K-FAC preconditioned one
        ...     optimizer.step()
        >>> F.cross_entropy(model(x), y).item() < first
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        damping: float = 0.3,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-2,
        kfac_approx: str = "expand",
        skip_layers: Iterable[str] = (),
        gated: bool = False,
        distributed: bool | None = None,
        process_group: Any = None,
    ):
        self.factor_update_steps = check_positive_int(factor_update_steps, "factor_update_steps")
        self.inv_update_steps = check_positive_int(inv_update_steps, "inv_update_steps")
        self.damping = check_number(damping, "damping", low=0)
        self.factor_decay = check_number(factor_decay, "factor_decay", 0, 1, high_open=True)
        self.kl_clip = None if kl_clip is None else check_number(kl_clip, "kl_clip", low=0, low_open=True)
        check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)
        self.kfac_approx = kfac_approx
        if isinstance(skip_layers, str):
            raise TypeError(f"skip_layers must be a list of module names, got the string {skip_layers!r}")
        skip = tuple(skip_layers)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model, self.gated, self.process_group = model, gated, process_group
        self._distributed = distributed
        supported, self.skipped = kfac_layers(model)
        self.layers: dict[str, _LayerState] = {}
        for name, module in supported.items():
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            bias = getattr(module, "bias", None)
            self.layers[name] = _LayerState(name, module, module.weight.requires_grad,
                                            bias is not None and bias.requires_grad)
        if not self.layers:
            raise ValueError("KFACPreconditioner found no Linear, Conv1d or Conv2d layer with trainable parameters"
                             f"{f' (skipped: {self.skipped})' if self.skipped else ''}")
        self.steps = 0
        self._pass = 0
        self._window = False
        self._root_forwards = 0
        self._handles = [model.register_forward_pre_hook(self._root_hook)]
        self._handles += [state.layer.module.register_forward_hook(self._layer_hook(state))
                          for state in self.layers.values()]

    # --------------------------------------------------------------------------------------------- hooks
    @property
    def factors_due(self) -> bool:
        """Whether the coming step updates the factors (so this step's forward/backward are captured)."""
        return self.steps % self.factor_update_steps == 0

    def open_window(self) -> None:
        """Start capturing one backward pass (``gated`` mode)."""
        self._window = True
        self._pass += 1

    def close_window(self) -> None:
        self._window = False

    def _root_hook(self, module: nn.Module, args: tuple) -> None:
        if not self.gated and self.factors_due and torch.is_grad_enabled():
            self._pass += 1
            self._root_forwards += 1

    def _layer_hook(self, state: _LayerState) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not (self.factors_due and isinstance(out, torch.Tensor) and out.requires_grad):
                return
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                if self.gated and not self._window:
                    return
                # a model whose own forward is bypassed gives no pass count: every call is then its own pass
                pass_id = self._pass if self.gated or self._root_forwards else -len(state.samples) - 1
                state.capture(x, g.detach(), self.kfac_approx, pass_id)

            out.register_hook(on_grad)
        return hook

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---------------------------------------------------------------------------------------------- step
    def step(self, optimizer: torch.optim.Optimizer | None = None, *, grad_scale: float = 1.0) -> None:
        """Precondition the gradients in place (every rank must call it). With ``optimizer``, only the layers whose
        parameters it holds; KL-clipping reads its learning rates (without an optimizer, use ``kl_clip=None``).
        ``grad_scale``: the factor the loss was multiplied by (AMP loss scaling), which the captured output
        gradients carry."""
        if self.factors_due:
            self._update_factors(float(grad_scale))
        if self.steps % self.inv_update_steps == 0 or any(s.eigen is None and s.A is not None
                                                          for s in self.layers.values()):
            self._update_eigen()
        self._precondition(optimizer)
        self.steps += 1
        self._root_forwards = 0

    def _update_factors(self, grad_scale: float) -> None:
        # {layer: (A sum, its weight, G sum, its weight)}: A = A_sum / rows, G = N G_sum / grad_scale^2
        new: dict[str, tuple[torch.Tensor, float, torch.Tensor, float]] = {}
        for name, s in self.layers.items():
            if s.rows:
                n = float(sum(s.samples.values()))
                new[name] = (s.A_sum, 1 / s.rows, s.G_sum, n / grad_scale**2)
        if self.distributed:
            new = self._all_reduce_factors(new)
        for s in self.layers.values():
            s.reset()
        if not new:
            return
        check = sum(A.sum() * wa + G.sum() * wg for A, wa, G, wg in new.values())
        if not math.isfinite(float(check)):
            return  # an overflowing fp16 step (the scaler skips it too): no factor takes it in
        decay = self.factor_decay
        for name, (A, wa, G, wg) in new.items():
            s = self.layers[name]
            if s.A is None:
                s.A, s.G = A * wa, G * wg
            else:
                s.A.mul_(decay).add_(A, alpha=(1 - decay) * wa)
                s.G.mul_(decay).add_(G, alpha=(1 - decay) * wg)

    def _all_reduce_factors(self, new: dict[str, tuple[torch.Tensor, float, torch.Tensor, float]]
                            ) -> dict[str, tuple[torch.Tensor, float, torch.Tensor, float]]:
        """Sample-weighted mean of every layer's factors over the ranks, in one all-reduce."""
        device = next(iter(self.layers.values())).params[0].device
        dtype = torch.float64 if any(s.dtype == torch.float64 for s in self.layers.values()) else torch.float32
        parts = []
        for name, s in self.layers.items():
            if name in new:
                A, wa, G, wg = new[name]
                n = float(sum(s.samples.values()))
                parts += [(A * (wa * n)).reshape(-1), (G * (wg * n)).reshape(-1), A.new_tensor([n])]
            else:
                parts.append(torch.zeros(s.d_a**2 + s.layer.out**2 + 1, dtype=dtype, device=device))
        flat = torch.cat([p.to(dtype) for p in parts])
        dist.all_reduce(flat, group=self.process_group)
        out, at = {}, 0
        for name, s in self.layers.items():
            a, g = s.d_a**2, s.layer.out**2
            A, G, n = flat[at : at + a], flat[at + a : at + a + g], float(flat[at + a + g])
            at += a + g + 1
            if n > 0:
                out[name] = (A.reshape(s.d_a, s.d_a).to(s.dtype), 1 / n, G.reshape(s.layer.out, -1).to(s.dtype), 1 / n)
        return out

    def _update_eigen(self) -> None:
        ready = [s for s in self.layers.values() if s.A is not None]
        if not self.distributed:
            for s in ready:
                s.eigen = KroneckerEigen.of(s.A, s.G)
            return
        # each factor's eigendecomposition on one rank (greedy by cost n^3), shared by one all-reduce of a
        # buffer in which every other rank holds zeros
        world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        factors = [(s, which) for s in ready for which in ("A", "G")]
        load, owner = [0.0] * world, {}
        for s, which in sorted(factors, key=lambda f: -getattr(f[0], f[1]).shape[0]):
            r = min(range(world), key=lambda i: load[i])
            owner[(s.name, which)] = r
            load[r] += getattr(s, which).shape[0] ** 3
        parts = []
        for s, which in factors:
            factor = getattr(s, which)
            if owner[(s.name, which)] == rank:
                values, vectors = symmetric_eigen(factor)
                parts += [values, vectors.reshape(-1)]
            else:
                parts += [factor.new_zeros(factor.shape[0]), factor.new_zeros(factor.numel())]
        flat = torch.cat([p.to(torch.promote_types(p.dtype, torch.float32)) for p in parts])
        dist.all_reduce(flat, group=self.process_group)
        at, found = 0, {}
        for s, which in factors:
            n = getattr(s, which).shape[0]
            values, vectors = flat[at : at + n], flat[at + n : at + n + n * n].reshape(n, n)
            found[(s.name, which)] = (values.to(s.dtype), vectors.to(s.dtype))
            at += n + n * n
        for s in ready:
            dA, QA = found[(s.name, "A")]
            dG, QG = found[(s.name, "G")]
            s.eigen = KroneckerEigen(QA, QG, dG[:, None] * dA[None])

    def _precondition(self, optimizer: torch.optim.Optimizer | None) -> None:
        lrs: dict[int, float] = {}
        if optimizer is not None:
            lrs = {id(p): float(group.get("lr", math.nan)) for group in optimizer.param_groups for p in group["params"]}
        done = []
        for s in self.layers.values():
            if s.eigen is None or (optimizer is not None and not all(id(p) in lrs for p in s.params)):
                continue
            grad = s.gradient()
            if grad is not None:
                done.append((s, grad, s.eigen.solve(grad, self.damping)))
        scale = 1.0
        if self.kl_clip is not None and done:
            lr2 = [lrs.get(id(s.params[0]), math.nan) ** 2 for s, _, _ in done]
            if any(math.isnan(v) for v in lr2):
                raise ValueError("kl_clip needs the learning rate: pass the optimizer to step(), or kl_clip=None")
            vg = float(sum((p * g).sum() * v for (_, g, p), v in zip(done, lr2)))
            if vg > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / vg))
        for s, _, p in done:
            s.write(p.mul_(scale) if scale != 1.0 else p)

    # --------------------------------------------------------------------------------------------- state
    @property
    def distributed(self) -> bool:
        if self._distributed is None:
            return is_distributed()
        return self._distributed

    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python primitives only (``torch.load(weights_only=True)`` reads it); the factors captured
        since the last step are not kept (a checkpoint is taken between optimizer steps)."""
        layers = {}
        for name, s in self.layers.items():
            if s.A is None:
                continue
            entry = {"A": s.A.clone(), "G": s.G.clone()}
            if s.eigen is not None:
                entry |= {"QA": s.eigen.QA.clone(), "QG": s.eigen.QG.clone(), "values": s.eigen.values.clone()}
            layers[name] = entry
        return {"steps": self.steps, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["layers"]) - set(self.layers))
        if unknown:
            raise ValueError(f"KFACPreconditioner state holds layers {unknown} this model's preconditioner does not")
        self.steps = int(state["steps"])
        for name, s in self.layers.items():
            s.reset()
            entry = state["layers"].get(name)
            if entry is None:
                s.A = s.G = s.eigen = None
                continue
            device = s.params[0].device
            s.A, s.G = entry["A"].to(device), entry["G"].to(device)
            s.eigen = (KroneckerEigen(entry["QA"].to(device), entry["QG"].to(device), entry["values"].to(device))
                       if "QA" in entry else None)

    def __repr__(self) -> str:
        return (f"KFACPreconditioner({len(self.layers)} layers, skipped {len(self.skipped)}, steps={self.steps}, "
                f"damping={self.damping}, factor_update_steps={self.factor_update_steps}, "
                f"inv_update_steps={self.inv_update_steps})")


def warn_skipped(skipped: dict[str, str], who: str) -> None:
    """One warning naming the layers a K-FAC user leaves unpreconditioned, and why.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_skipped({"attn": "nn.MultiheadAttention"}, "KFACCallback")
    >>> str(caught[0].message)
    'KFACCallback leaves 1 layer(s) with trainable parameters unpreconditioned (attn: nn.MultiheadAttention)'
    """
    if skipped:
        listed = "; ".join(f"{name or '<model>'}: {why}" for name, why in list(skipped.items())[:6])
        warnings.warn(f"{who} leaves {len(skipped)} layer(s) with trainable parameters unpreconditioned ({listed}"
                      f"{' ...' if len(skipped) > 6 else ''})", UserWarning, stacklevel=3)
