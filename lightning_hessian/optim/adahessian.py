"""AdaHessian (Yao et al., AAAI 2021): Adam whose second moment tracks the Hessian diagonal, not ``g**2``.

Each curvature step draws a Rademacher probe ``z`` and takes ``D = z * (H z)`` (Hutchinson), with ``H z``
obtained by differentiating the gradients a ``create_graph=True`` backward left behind. ``|D|`` is averaged
over each convolution kernel's spatial positions, and the update is

    m = b1 m + (1 - b1) g,        v = b2 v + (1 - b2) D_avg**2,
    p = p - lr * wd * p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)) ** (k / 2) + eps)

with ``k = hessian_power`` (``k = 1`` is the published method, ``k = 0`` drops curvature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_hessian.checks import check_positive_int
from lightning_hessian.distributed import is_distributed
from lightning_hessian.hessian.diagonal import hessian_diagonal
from lightning_hessian.seeds import mix_seed

_NO_GRAPH = (
    "AdaHessian needs the gradients' graph to estimate curvature: call `loss.backward(create_graph=True)` "
    "before `step()` (with Lightning, add `AdaHessianCallback()` to the Trainer's callbacks)"
)


class _GradientGraph:
    """The Hessian behind ``create_graph`` gradients as a flat :class:`LinearOperator` on the parameters.

    ``matmat`` retains the graph so several probes can reuse it; the optimizer frees it by detaching
    the gradients once the estimate is taken.
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]):
        self.params = params
        self.device, self.dtype = params[0].device, params[0].dtype
        self._numels = [p.numel() for p in params]
        self.dim = sum(self._numels)
        self._with_graph = [i for i, g in enumerate(grads) if g.requires_grad]
        if not self._with_graph:
            raise RuntimeError(_NO_GRAPH)
        self._outputs = [grads[i] for i in self._with_graph]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The rows ``H v_i`` for the rows ``v_i`` of ``V`` (shape ``(k, dim)``), one backward each."""
        return torch.stack([self._matvec(v) for v in V])

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        chunks = v.split(self._numels)
        hv = torch.autograd.grad(
            self._outputs,
            self.params,
            grad_outputs=[chunks[i].view_as(self.params[i]) for i in self._with_graph],
            retain_graph=True,
            allow_unused=True,
        )
        return torch.cat([torch.zeros_like(c) if h is None else h.reshape(-1) for c, h in zip(chunks, hv)])


class AdaHessian(torch.optim.Optimizer):
    """AdaHessian with Hutchinson curvature, kernel averaging, decoupled weight decay and DDP averaging.

    Args:
        params: parameters or parameter groups. A group may set ``average_dims`` (a tuple of dims) to
            average ``|D|`` over, e.g. ``(1,)`` for the rows of a linear weight; it overrides the default.
        lr, betas, eps: as in Adam (the published defaults: 0.15, (0.9, 0.999), 1e-4).
        weight_decay: decoupled (AdamW-style) decay, ``p -= lr * weight_decay * p``.
        hessian_power: exponent ``k`` in ``[0, 1]`` of the curvature denominator.
        update_each: recompute ``D`` every this many steps and reuse the last estimate in between
            (:attr:`hessian_due` says whether the next step needs the graph).
        n_samples: Rademacher probes per estimate.
        average_conv_kernel: by default average ``|D|`` over dims ``>= 2`` of 3-D/4-D/5-D weights
            (Conv1d/2d/3d kernels), as the paper prescribes.
        seed: seeds the probes; the probe of step ``t`` depends only on ``(seed, t)``, so every process
            draws the same one and resuming from a checkpoint is exact.

    Under ``torch.distributed`` (initialised, world size > 1) the step averages the gradients and the
    curvature estimates over the default process group itself (one all-reduce), so all ranks take the
    same step, equal to one process on the union of equal-sized shards. DDP's own gradient all-reduce
    does not support ``backward(create_graph=True)`` (PyTorch raises), so run the forward and backward
    inside ``ddp_model.no_sync()``; ``AdaHessianCallback`` does this for Lightning. A parameter one rank
    did not use counts a zero gradient there; one no rank used is not updated; a frozen one
    (``requires_grad=False``) never is. Parameters must share one device and dtype; with bf16 autocast
    the parameters and curvature stay float32.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = AdaHessian(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(16, 1, 10), torch.randint(0, 2, (16,))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
        ...     opt.step()
        >>> model[0].weight.grad.grad_fn is None  # the graph is released by the step
        True
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        average_conv_kernel: bool = True,
        seed: int = 0,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not 0.0 <= hessian_power <= 1.0:
            raise ValueError(f"hessian_power must be in [0, 1], got {hessian_power!r}")
        check_positive_int(update_each, "update_each")
        check_positive_int(n_samples, "n_samples")
        self.update_each = update_each
        self.n_samples = n_samples
        self.average_conv_kernel = average_conv_kernel
        self.seed = int(seed)
        self._steps = 0
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            average_dims=None,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        dims = group["average_dims"]
        if dims is None:
            return
        if isinstance(dims, int) or not all(isinstance(d, int) for d in dims):
            raise ValueError(f"average_dims must be a tuple of ints or None, got {dims!r}")
        for p in group["params"]:
            if any(not -p.dim() <= d < p.dim() for d in dims):
                raise ValueError(
                    f"average_dims={tuple(dims)} is out of range for a parameter of shape {tuple(p.shape)}; "
                    "put parameters of other shapes in their own group"
                )
        group["average_dims"] = tuple(dims)

    @property
    def hessian_due(self) -> bool:
        """Whether the next :meth:`step` estimates curvature, i.e. needs ``backward(create_graph=True)``."""
        return self._steps % self.update_each == 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["steps"] = self._steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._steps = int(state_dict.pop("steps", 0))
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update the parameters from their gradients (and, when due, their curvature); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = is_distributed() and dist.get_world_size() > 1
        # Frozen parameters are skipped whatever their .grad. The others all take part, so the probes'
        # layout (and every rank's list under DDP) does not depend on which ones this backward reached: a
        # parameter without .grad counts a zero gradient and is updated only if some rank used it.
        owned = [(p, group) for group in self.param_groups for p in group["params"] if p.requires_grad]
        params = [p for p, _ in owned]
        if not params:  # all frozen: nothing to do (every rank holds the same parameters, so none all-reduces)
            self._steps += 1
            return loss
        used = [p.grad is not None for p in params]
        if any(p.grad is not None and p.grad.is_sparse for p in params):
            raise RuntimeError("AdaHessian does not support sparse gradients")
        if distributed or any(used):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diagonals = self._curvature(params) if self.hessian_due else [None] * len(params)
            for p in params:
                p.grad = p.grad.detach()  # releases the graph (and the param -> grad -> graph cycle)
            if distributed:
                used = self._average_across_ranks(params, diagonals, used)
            for (p, group), d, u in zip(owned, diagonals, used):
                if u:
                    self._update(p, d, group)
                else:
                    p.grad = None
        self._steps += 1
        return loss

    def _curvature(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hutchinson ``D`` per parameter (before kernel averaging), shared probes across ranks."""
        if len({(p.device, p.dtype) for p in params}) > 1:
            raise ValueError(
                "AdaHessian needs all parameters on one device with one dtype; use one optimizer per device/dtype"
            )
        op = _GradientGraph(params, [p.grad for p in params])
        probe_seed = mix_seed(self.seed, self._steps)
        flat = hessian_diagonal(op, num_samples=self.n_samples, batch=self.n_samples, seed=probe_seed).diagonal
        return [d.view_as(p) for d, p in zip(flat.split([p.numel() for p in params]), params)]

    @staticmethod
    def _average_across_ranks(params: list[torch.Tensor], diagonals: Sequence[torch.Tensor | None],
                              used: list[bool]) -> list[bool]:
        """Average gradients and curvature over the default process group in one all-reduce; return which
        parameters some rank used."""
        tensors = [p.grad for p in params] + [d for d in diagonals if d is not None]
        flags = torch.tensor(used, dtype=params[0].grad.dtype, device=params[0].grad.device)
        flat = torch.cat([t.reshape(-1) for t in tensors] + [flags])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        *averages, flags = flat.split([t.numel() for t in tensors] + [len(used)])
        for t, avg in zip(tensors, averages):
            t.copy_(avg.view_as(t))
        return (flags > 0).tolist()

    def _kernel_average(self, d: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``|D|`` averaged over the group's ``average_dims`` or the conv kernel's spatial dims (kept as size 1)."""
        dims = group["average_dims"]
        if dims is None and self.average_conv_kernel and d.dim() in (3, 4, 5):
            dims = tuple(range(2, d.dim()))
        d = d.abs()
        return d.mean(dim=dims, keepdim=True) if dims else d

    def _update(self, p: torch.Tensor, d: torch.Tensor | None, group: dict[str, Any]) -> None:
        state = self.state[p]
        if d is not None:
            d = self._kernel_average(d, group)
            if self.update_each > 1:
                state["hessian_diag"] = d
        elif "hessian_diag" in state:
            d = state["hessian_diag"]
        else:
            return  # first gradient arrived between curvature steps: wait for the next estimate
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_hessian_diag_sq"] = torch.zeros_like(d)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_hd_sq = state["exp_avg"], state["exp_hessian_diag_sq"]
        exp_avg.lerp_(p.grad, 1 - beta1)
        exp_hd_sq.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (exp_hd_sq.sqrt() / math.sqrt(1 - beta2**t)).pow_(group["hessian_power"]).add_(group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))
