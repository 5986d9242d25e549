"""Lightning integration for AdaHessian: a callback that makes the backward keep the graph the optimizer needs."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_hessian.optim.adahessian import AdaHessian


class AdaHessianCallback(Callback):
    """Run :class:`AdaHessian` under Lightning with no change to the LightningModule beyond choosing it.

    AdaHessian differentiates the gradients, so the backward must use ``create_graph=True``. For the
    duration of ``fit`` this callback wraps the module's ``backward`` hook to pass
    ``create_graph=True`` whenever an AdaHessian optimizer will estimate curvature at its next step
    (see ``update_each``). Under DDP it also switches off DDP's own gradient all-reduce, which cannot
    carry the second-order graph (PyTorch raises on it): AdaHessian averages gradients and curvature
    across ranks itself, so every rank takes the same step as a single process on the union of the
    shards. Everything is restored when ``fit`` ends, also when it raises.

    Works with ``precision`` 32, 64 and ``"bf16-mixed"``. Not supported (fails fast at setup): fp16 loss
    scaling (``"16-mixed"``), which unscales the gradients but not the graph they carry, and manual
    optimization under DDP. Under DDP, ``gradient_clip_val`` clips each rank's local gradients before
    AdaHessian averages them.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_hessian.optim import AdaHessian, AdaHessianCallback
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(40, 10)
        ...
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self.layer(x), y)
        ...
        ...     def configure_optimizers(self):
        ...         return AdaHessian(self.parameters(), lr=0.15)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 40), torch.randint(0, 10, (64,)))
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[AdaHessianCallback()], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> trainer.global_step
        4
    """

    def __init__(self) -> None:
        self._module: pl.LightningModule | None = None
        self._previous_backward: Any = None
        self._ddp: DistributedDataParallel | None = None
        self._ddp_sync = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "AdaHessianCallback does not support fp16 loss scaling (precision='16-mixed'): the scaler "
                "unscales the gradients but not the graph they carry, so the curvature would come out "
                "multiplied by the loss scale. Use precision='bf16-mixed' or '32-true'."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [opt for opt in trainer.optimizers if isinstance(opt, AdaHessian)]
        if not optimizers:
            raise ValueError(
                "AdaHessianCallback found no AdaHessian optimizer: return one from configure_optimizers "
                "or remove the callback"
            )
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "AdaHessianCallback supports DDP with automatic optimization only; with manual "
                    "optimization run forward and backward inside `trainer.strategy.model.no_sync()`"
                )
            self._ddp, self._ddp_sync = model, model.require_backward_grad_sync
            model.require_backward_grad_sync = False
        self._module = pl_module
        self._previous_backward = pl_module.__dict__.get("backward")
        backward = pl_module.backward

        def backward_with_graph(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("create_graph", any(opt.hessian_due for opt in optimizers))
            with warnings.catch_warnings():
                # PyTorch warns of a param -> grad -> graph cycle; AdaHessian.step breaks it.
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                backward(loss, *args, **kwargs)

        pl_module.backward = backward_with_graph

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._sync_buffers()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._sync_buffers()

    def _sync_buffers(self) -> None:
        """DDP broadcasts rank 0's buffers (BatchNorm statistics) before a forward only after a backward that
        synced gradients; with that sync off for the whole fit, it would never again: ask for it every batch."""
        if self._ddp is not None:
            self._ddp.require_forward_param_sync = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()  # Lightning skips teardown when fit raises

    def _restore(self) -> None:
        if self._module is not None:
            if self._previous_backward is None:
                self._module.__dict__.pop("backward", None)
            else:
                self._module.backward = self._previous_backward
            self._module = self._previous_backward = None
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = self._ddp_sync
            self._ddp = None
