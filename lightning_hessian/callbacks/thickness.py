"""BoundaryThicknessCallback: the model's boundary thickness on a fixed probe set, logged during training."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hessian.attacks._common import Range, check_range
from lightning_hessian.attacks.thickness_metric import BoundaryThickness
from lightning_hessian.callbacks.no_trace import leave_no_trace
from lightning_hessian.callbacks.probe import draw_probe_indices, prepare_batch, probe_batches, train_dataset_of
from lightning_hessian.checks import check_positive_int

DEFAULT_PROBE_SIZE = 256
CLASSES = ("predicted", "labels")


class BoundaryThicknessCallback(Callback):
    """Log the boundary thickness (Yang et al., NeurIPS 2020) every ``every_n_epochs`` training epochs.

    Measured with :class:`~lightning_hessian.attacks.BoundaryThickness` on a fixed probe set: ``probe_size``
    training samples (default 256, or the whole training set if smaller) drawn once with ``seed``, as the Hessian
    probe set is, each with a target offset drawn once with ``seed`` too, so that successive values differ only
    by what training changed. The class ``i`` of a sample is the model's prediction (``classes="predicted"``, the
    paper's definition, which does not make inaccurate models look thick) or its label (``classes="labels"``); its
    target is ``j = (i + offset) % K``. For each sample and its target, a targeted L2 PGD
    (``steps`` steps within radius ``eps``, input units) finds ``x'``, and the thickness is the length of the
    segment from ``x`` to ``x'`` on which ``alpha < p_i - p_j < beta`` (the paper's 0 and 0.75). ``clamp="auto"``
    keeps the attack inside ``trainer.datamodule.input_range`` when there is one.

    Logged at the end of every ``every_n_epochs``-th training epoch (so also in runs that do not validate):
    ``robust/boundary_thickness``, its standard error over the probe samples ``robust/boundary_thickness_std_error``,
    ``robust/boundary_thickness_reached`` (the share of attacks that reached their target class: a low share means
    ``eps`` is too small for the segments to cross the boundary) and the measurement's cost in seconds,
    ``robust/boundary_thickness_seconds``. The values are also kept in ``history`` (saved in checkpoints).
    Under DDP each rank measures its share of the probe set and the sums are reduced through torchmetrics, so
    the values equal one process's on the whole probe set. The model is measured in eval mode and left as it
    was (modes, BatchNorm statistics, RNG states, gradients); a failed measurement warns and training goes on.

    Cost: ``steps`` forward and backward passes plus ``num_points`` forward passes per probe sample, about
    ``(steps + num_points / 3) * probe_size`` training samples' worth: every few epochs on a large data set.

    Example::

        from lightning_hessian.callbacks.thickness import BoundaryThicknessCallback
        Trainer(max_epochs=30, callbacks=[BoundaryThicknessCallback(eps=4.0, every_n_epochs=5)]).fit(model, dm)
    """

    def __init__(
        self,
        eps: float = 4.0,
        every_n_epochs: int = 5,
        probe_size: int | None = None,
        probe_batch_size: int = 256,
        alpha: float = 0.0,
        beta: float = 0.75,
        steps: int = 20,
        step_size: float | None = None,
        num_points: int = 128,
        clamp: str | Range | None = "auto",
        classes: str = "predicted",
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        seed: int = 0,
    ):
        """
        Args:
            eps: L2 radius of the targeted PGD, in input units; the thickness of a sample is at most ``eps``.
            every_n_epochs: measure after every ``every_n_epochs``-th training epoch.
            probe_size: training samples in the probe set; None: 256, or the whole training set if smaller.
            probe_batch_size: probe samples per forward/backward pass.
            alpha, beta: the band ``alpha < p_i - p_j < beta``.
            steps, step_size: PGD steps and step length (default ``2.5 * eps / steps``).
            num_points: midpoint-rule cells along each segment.
            clamp: valid input range ``(lo, hi)`` (numbers, or per-channel sequences), None for none, or
                ``"auto"`` (the datamodule's ``input_range``).
            classes: ``"predicted"`` (the class ``i`` of a sample is the model's prediction) or ``"labels"``.
            input_key, target_key: where inputs and int labels sit in a batch (index or dict key; default 0 and 1,
                or ``"x"`` and ``"y"`` for dicts).
            seed: seeds the probe set and its target classes.
        """
        self._metric = BoundaryThickness(eps, alpha=alpha, beta=beta, steps=steps, step_size=step_size,
                                         num_points=num_points, clamp=None if clamp == "auto" else clamp)
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.probe_size = None if probe_size is None else check_positive_int(probe_size, "probe_size")
        self.probe_batch_size = check_positive_int(probe_batch_size, "probe_batch_size")
        for name, key in (("input_key", input_key), ("target_key", target_key)):
            if key is not None and (isinstance(key, bool) or not isinstance(key, (int, str))):
                raise TypeError(f"{name} must be an int (tuple/list position), a str (dict key) or None, got {key!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if classes not in CLASSES:
            raise ValueError(f"classes must be one of {CLASSES}, got {classes!r}")
        self.classes = classes
        self.clamp, self.input_key, self.target_key, self.seed = clamp, input_key, target_key, seed
        self.history: list[dict[str, Any]] = []
        self._probe: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this rank's (x, y, target offsets)
        self._num_classes = 0

    @property
    def state_key(self) -> str:
        m = self._metric
        return self._generate_state_key(eps=m.eps, alpha=m.alpha, beta=m.beta, probe_size=self.probe_size,
                                        classes=self.classes, seed=self.seed)

    # ---- hooks -------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.clamp != "auto":
            return
        found = getattr(trainer.datamodule, "input_range", None)
        if found is None:
            rank_zero_info("BoundaryThicknessCallback: clamp='auto' found no `input_range` on the datamodule; the "
                           "attack is not clamped (pass clamp=(lo, hi) to bound it)")
        self._metric.clamp = None if found is None else check_range(
            found, "datamodule.input_range (read for clamp='auto'; else pass clamp=)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset, collate_fn = train_dataset_of(trainer)
        size = self.probe_size if self.probe_size is not None else min(DEFAULT_PROBE_SIZE, len(dataset))
        indices = draw_probe_indices(len(dataset), size, self.seed)
        batches = [self._inputs_and_labels(prepare_batch(trainer, b)) for b in probe_batches(
            dataset, indices, self.probe_batch_size, collate_fn, trainer.global_rank, trainer.world_size, self.seed)]
        self._metric.to(pl_module.device)
        self._probe = []
        if not batches:  # a rank may hold no probe sample (fewer samples than ranks)
            return
        try:
            with leave_no_trace(pl_module, "eval"), torch.no_grad():
                logits = pl_module(batches[0][0][:1])
        except NotImplementedError:
            raise ValueError("BoundaryThicknessCallback measures pl_module(x): give the LightningModule a forward(x) "
                             "that returns logits") from None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError("BoundaryThicknessCallback: pl_module(x) must return logits of shape (N, classes >= 2), "
                             f"got {type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
        self._num_classes = logits.shape[1]
        # one target offset per probe sample, drawn for the whole set so that any split over ranks gives the same
        offsets = torch.randint(1, self._num_classes, (size,), generator=torch.Generator().manual_seed(self.seed))
        offsets = offsets[trainer.global_rank :: trainer.world_size].split([len(y) for _, y in batches])
        self._probe = [(x, y, offset.to(y.device)) for (x, y), offset in zip(batches, offsets)]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure_and_log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    # ---- work --------------------------------------------------------------------------------------------

    def _measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank measures its share, then all take part in the reductions (also after a failure)."""
        start = time.perf_counter()
        self._metric.reset()
        failed = 0.0
        try:
            with leave_no_trace(pl_module, "eval"):
                for x, y, offset in self._probe:
                    if self.classes == "predicted":
                        with torch.no_grad():
                            y = pl_module(x).argmax(1)
                    self._metric.update(pl_module, x, y, (y + offset) % self._num_classes)
        except Exception as err:  # a diagnostic never ends a training run
            failed = 1.0
            rank_zero_warn(f"BoundaryThicknessCallback: the measurement at epoch {trainer.current_epoch} failed "
                           f"({err!r}); training continues")
        failed = float(trainer.strategy.reduce(torch.tensor(failed, device=pl_module.device), reduce_op="sum"))
        stats = self._metric.compute()
        if failed:
            return
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "thickness": float(stats.mean),
                  "std_error": float(stats.std_error), "reached": float(stats.reached),
                  "seconds": time.perf_counter() - start}
        self.history.append(record)
        if record["reached"] < 0.5:
            rank_zero_warn(f"BoundaryThicknessCallback: only {record['reached']:.0%} of the attacks reached their "
                           f"target class within eps={self._metric.eps:g}, so most segments end before the boundary "
                           "and the thickness is cut short: raise eps")
        pl_module.log_dict({"robust/boundary_thickness": record["thickness"],
                            "robust/boundary_thickness_std_error": record["std_error"],
                            "robust/boundary_thickness_reached": record["reached"],
                            "robust/boundary_thickness_seconds": record["seconds"]},
                           on_step=False, on_epoch=True, sync_dist=False)

    def _inputs_and_labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and int64 labels of a probe batch, or a ValueError naming the key argument to fix."""
        default = ("x", "y") if isinstance(batch, Mapping) else (0, 1)
        keys = (default[0] if self.input_key is None else self.input_key,
                default[1] if self.target_key is None else self.target_key)
        try:
            x, y = batch[keys[0]], batch[keys[1]]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"BoundaryThicknessCallback found no inputs at input_key={keys[0]!r} or no labels at "
                             f"target_key={keys[1]!r} in a {type(batch).__name__} batch: set them to where they "
                             "are") from None
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and isinstance(y, torch.Tensor)
                and not y.is_floating_point() and y.dim() == 1 and len(y) == len(x)):
            raise ValueError(f"BoundaryThicknessCallback needs float inputs (N, ...) at input_key={keys[0]!r} and "
                             f"integer labels (N,) at target_key={keys[1]!r}: set the keys to where they are")
        return x, y.long()
