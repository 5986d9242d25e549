"""Lightning integration of K-FAC: precondition the gradients of whatever optimizer the module returns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from lightning_hessian.checks import check_choice, check_number, check_positive_int
from lightning_hessian.hessian.kfac import KFAC_APPROX
from lightning_hessian.optim.kfac import KFACPreconditioner, warn_skipped


class KFACCallback(Callback):
    """K-FAC preconditioning for an unchanged LightningModule and optimizer (SGD, Adam, ...).

    The factors are captured by hooks during the training step's own forward and backward (no extra pass); in
    ``on_before_optimizer_step`` (after AMP unscaling and DDP's gradient all-reduce, before gradient clipping and
    the optimizer) each ``Linear``/``Conv1d``/``Conv2d`` layer's gradient becomes
    ``(G (x) A + damping I)^{-1} grad``, solved on the Kronecker eigenvalues (damping added to ``dG_i dA_j``, as
    kfac-pytorch's eigen method). See :class:`~lightning_hessian.optim.kfac.KFACPreconditioner` for the arguments
    and the scaling of the factors.

    - Gradient accumulation (``accumulate_grad_batches``, also when ABS's ``mode="accumulate"`` changes it): the
      factors of one optimizer step cover all its micro-batches, equal to one step on their union.
    - DDP: factors all-reduced with sample weights, eigendecompositions split over the ranks and shared; every
      rank applies the update one process would on the union of the ranks' batches.
    - AMP: fp16 loss scaling is divided out of the factors; a step whose gradients overflow updates no factor.
    - Manual optimization works (``manual_backward`` and ``optimizer.step()`` call the same hooks), with one
      optimizer; several optimizers are refused at fit start.
    - Layers left unpreconditioned, named in a warning at setup: ``nn.MultiheadAttention`` (its projections run
      inside ``F.multi_head_attention_forward``, out of reach of module hooks; attention built from ``nn.Linear``
      layers is preconditioned layer by layer), grouped convolutions, and parameters of other layer types
      (normalisation, embeddings): their gradients reach the optimizer unchanged.
    - Checkpoint and resume: ``state_dict`` holds the step count, the running factors and their
      eigendecompositions (tensors and ints), so a resumed run takes the same steps as an uninterrupted one.
    - Cost: K-FAC is an optimizer, not a probe: at factor/inverse intervals 1/10 a step costs about 2.4x (MNIST-1D
      CNN) to 3.8x (ResNet-20) a plain SGD step on CPU, at 10/100 about 1.2x (``benchmarks/kfac.py``: half to
      nine tenths of kfac-pytorch's overhead at the same intervals). Raise ``factor_update_steps`` to pay less.

    Args:
        factor_update_steps: capture the factors and update their running averages every this many optimizer steps.
        inv_update_steps: recompute the eigendecompositions every this many optimizer steps.
        damping: ``lambda`` in ``(G (x) A + lambda I)^{-1}``, relative to the per-sample Fisher (tune it like the
            learning rate; see ``KFACPreconditioner``).
        factor_decay: running average ``F <- decay F + (1 - decay) F_new``, in ``[0, 1)``.
        kl_clip: KL-clipping of the preconditioned gradients (Ba et al. 2017), or None to not clip.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-shared layers.
        skip_layers: module names (or name prefixes) to leave unpreconditioned.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_hessian.optim import KFACCallback
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
        ...         return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 40), torch.randint(0, 10, (64,)))
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[KFACCallback(inv_update_steps=5)], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> trainer.global_step
        4
    """

    def __init__(
        self,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        damping: float = 0.3,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-2,
        kfac_approx: str = "expand",
        skip_layers: Iterable[str] = (),
    ) -> None:
        check_positive_int(factor_update_steps, "factor_update_steps")
        check_positive_int(inv_update_steps, "inv_update_steps")
        check_number(damping, "damping", low=0)
        check_number(factor_decay, "factor_decay", 0, 1, high_open=True)
        if kl_clip is not None:
            check_number(kl_clip, "kl_clip", low=0, low_open=True)
        check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)
        if isinstance(skip_layers, str):
            raise TypeError(f"skip_layers must be a list of module names, got the string {skip_layers!r}")
        self.options = {"factor_update_steps": factor_update_steps, "inv_update_steps": inv_update_steps,
                        "damping": damping, "factor_decay": factor_decay, "kl_clip": kl_clip,
                        "kfac_approx": kfac_approx, "skip_layers": tuple(skip_layers)}
        self.preconditioner: KFACPreconditioner | None = None  # kept after fit (hooks removed) for inspection
        self._pending: dict[str, Any] | None = None  # a state restored before setup built the preconditioner
        self._hooked = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.preconditioner = KFACPreconditioner(pl_module, gated=True, **self.options)  # a new fit starts afresh
        self._hooked = True
        rank_zero_only(warn_skipped)(self.preconditioner.skipped, "KFACCallback")
        if self._pending is not None:
            self.preconditioner.load_state_dict(self._pending)
            self._pending = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"KFACCallback preconditions one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}: return one, or leave the callback out")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._hooked:
            self.preconditioner.open_window()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hooked:
            self.preconditioner.close_window()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._hooked:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.preconditioner.step(optimizer, grad_scale=scale)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()  # Lightning skips teardown when fit raises

    def _release(self) -> None:
        """Take the hooks off the module (the preconditioner stays readable)."""
        if self._hooked:
            self.preconditioner.remove()
            self._hooked = False

    def state_dict(self) -> dict[str, Any]:
        return self.preconditioner.state_dict() if self.preconditioner is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._hooked:
            self.preconditioner.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)
