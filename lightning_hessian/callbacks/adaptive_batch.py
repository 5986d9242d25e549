"""AdaptiveBatchSizeCallback: ABS / ABSA (grow the batch as the Hessian flattens) and the FB, GG baselines.

The schedules' rules are policy objects in ``lightning_hessian.batch_schedules``; this callback measures what they
decide on and realises their decisions in the Trainer (loader or accumulation, LR, warmup, cap, checkpoint)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.nn.parallel import DistributedDataParallel

from lightning_hessian.batch_schedules import BatchSchedule, batch_schedule
from lightning_hessian.callbacks.allreduce_clock import AllReduceClock
from lightning_hessian.callbacks.hessian_probe import HessianProbe
from lightning_hessian.checks import check_choice, check_number, check_positive_int
from lightning_hessian.hessian.operator import LossFn
from lightning_hessian.hessian.summary import SpectrumOptions

PROBE_OVERHEAD = 0.02  # an automatically sized probe costs about this share of the first epoch (later, faster
# epochs at larger batches make the run's share higher)
MODES = ("dataloader", "accumulate")
TIMINGS = ("hessian_seconds", "resize_seconds", "communication_seconds", "train_seconds", "compute_seconds")


class AdaptiveBatchSizeCallback(Callback):
    """Adaptive batch size from the Hessian's top eigenvalue (ABS), with adversarial training (ABSA).

    ``schedule="adaptive"`` (``"abs"``): after every epoch the top eigenvalue of the (eval-mode) loss Hessian is
    measured on a fixed probe set. The first epoch's value is the reference; when the eigenvalue has fallen to
    ``reference / decay_ratio`` the global batch grows by ``factor`` and the reference is reset; after
    ``duration`` epochs at one batch size (the first ``duration`` epochs too, as in the authors' code) it grows
    anyway. The learning rate is multiplied by the same factor (optionally warmed up over ``warmup_epochs``)
    wherever the optimizer and its schedulers keep it (group ``lr``/``initial_lr``/``max_lr``/``min_lr``,
    ``base_lrs`` and ``max_lrs``, nested schedulers too), so the user's own scheduler still applies on top.
    Growth stops at ``max_batch_size``, and probing with it.
    The probe set is ``probe_size`` training samples (a map-style dataset; collated in batches of
    ``probe_batch_size``, by default the training loader's), or the given ``probe_data``; the eigenvalue is
    ``hessian.summary.measure_spectrum``'s, warm-started from the last epoch's eigenvector. By default
    (``probe_size=None``) the probe set's size is chosen at the first epoch's end: the largest power of two from
    128 to 1,024 samples (or the training set) whose probe, predicted from one timed Hessian-vector product,
    costs 2% of that epoch; it is kept for the run (and in the checkpoint). ``eig_tol`` (5%) bounds the relative
    residual of the eigenpair, so the value is within 5% of an eigenvalue, the top one unless the top two lie
    about that close (then it may be the second): ample for a rule that waits for the eigenvalue to halve. Once
    the reference is set, a probe stops as soon as the eigenvalue is known to exceed ``reference / decay_ratio``
    (a Ritz value is a lower bound of the top eigenvalue): that probe's decision is then the exact value's, and
    the history and the log mark the value as that lower bound (``eigenvalue_lower_bound``,
    ``abs/eigenvalue_lower_bound``); the history also counts each probe's products (``probe_hvps``).
    With ``adversarial=True`` (ABSA) an ``AdversarialAugmentCallback`` replaces a fraction of every batch
    (``adversarial_fraction``, halved at each growth, 0 at the cap and in the second half of training):
    the one in the Trainer's callbacks if there is one (choose attack and ``eps`` there), else FGSM at its
    default ``eps``.

    Baselines in the same callback: ``"fixed_large_batch"`` (``"fb"``) trains at ``max_batch_size`` from the start
    with the LR scaled linearly and a ``fb_warmup_epochs`` warmup (Goyal et al.); ``"gradual_growth"`` (``"gg"``)
    multiplies the batch instead of decaying the LR wherever the scheduler decays it (Smith et al.), by the power
    of ``factor`` nearest the decay (the LR keeps the rest); ``"baseline"`` (``"bl"``) changes nothing. Each rule
    is a policy object in ``lightning_hessian.batch_schedules`` (``Adaptive``, ``FixedLargeBatch``,
    ``GradualGrowth``, ``Baseline``), which may be passed instead of its name, or subclassed. Warmups scale only
    the LR the optimizer steps with: the schedulers never see it. A ``ReduceLROnPlateau`` decay, which Lightning
    applies after the epoch's callbacks, is undone before the next epoch's first step; in ``mode="dataloader"``
    its larger batch then arrives an epoch later.

    ``mode="dataloader"`` changes the per-device ``batch_size`` of the datamodule (or module) and reloads
    the train dataloader when it changes (only then: a run whose batch never grows draws the same batches as
    one without the callback); before training, a dry reload checks that ``train_dataloader()`` follows the
    attribute (a datamodule that turns it into a per-device size once in ``setup()`` does not).
    ``mode="accumulate"`` raises ``trainer.accumulate_grad_batches``. Either way the global batch is per-device
    batch x devices x nodes x accumulation, and every rank takes rank 0's decision. Batch sizes are
    ``base * factor**n <= max_batch_size``. The history and the logged ``abs/batch_size``, ``abs/lr`` and
    ``abs/adversarial_fraction`` of an epoch are the values that epoch trained with (a decision at its end shows
    in the next epoch's).

    The callback also times the run (cumulative seconds, logged at every epoch's end and kept in ``timings``):
    ``abs/hessian_seconds`` the probes (setting up the probe set, the timed product that sizes it, the
    Hessian-vector products and their all-reduces); ``abs/resize_seconds``
    the batch-size changes (rebuilding the train loader, setting the accumulation, scaling the LR);
    ``abs/communication_seconds`` the gradient all-reduces under DDP (timed by a communication hook from the
    moment a bucket's gradients are ready to the moment its reduced values are, so it includes waiting for the
    slowest rank; 0 on one process, not logged under other multi-process strategies); ``abs/train_seconds``
    the wall time since training started; ``abs/compute_seconds`` the rest of it (forward, backward, optimizer,
    data loading, validation, other callbacks). All are rank 0's; none adds a synchronisation per step.

    Args:
        max_batch_size: the global batch's cap (and FB's batch).
        schedule: ``"adaptive"``, ``"fixed_large_batch"``, ``"gradual_growth"`` or ``"baseline"`` (or the seed
            paper's ``"abs"``, ``"fb"``, ``"gg"``, ``"bl"``; see above), or a ``BatchSchedule`` object, which
            carries its own ``factor``, ``decay_ratio``, ``duration`` and warmup (leave those four None then).
        factor: the growth factor of the batch (and of the learning rate); None: 2.
        decay_ratio: ABS grows when the top eigenvalue has fallen to ``reference / decay_ratio``; None: 2.
        duration: ABS grows anyway after this many epochs at one batch size; None: 10.
        mode: ``"dataloader"`` (change the loader's batch size) or ``"accumulate"`` (gradient accumulation).
        warmup_epochs: warm the scaled learning rate up over this many epochs after each growth (not GG's, which
            gives back an LR the scheduler took).
        fb_warmup_epochs: FB's warmup of the linearly scaled learning rate; None: 5.
        adversarial: ABSA: adversarial examples in training (see above).
        adversarial_fraction: ABSA's starting share of each batch replaced by adversarial examples.
        probe_size: samples in the probe set (None: sized automatically at the first epoch's end).
        probe_batch_size: samples per probe batch (None: the training loader's batch size).
        probe_data: explicit probe batches instead of a draw from the training set.
        seed: the probe-set draw and the eigenvalue solver's start.
        loss_fn: ``loss_fn(module, batch) -> scalar`` (None: the module's ``hessian_loss``, else cross-entropy
            where that is the module's loss).
        eig_tol: relative residual at which the eigenvalue solver stops.
        plot: draw the batch-size and eigenvalue history at the end of training.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_hessian import AdaptiveBatchSizeCallback, ClassificationModule
        >>> from lightning_hessian.models import MNIST1DMLP
        >>> class Data(pl.LightningDataModule):  # the batch size is an attribute the callback changes
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.batch_size, self.data = 32, torch.utils.data.TensorDataset(
        ...             torch.randn(512, 40), torch.randint(0, 10, (512,)))
        ...     def train_dataloader(self):
        ...         return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size)
        >>> _ = torch.manual_seed(0)
        >>> abs_ = AdaptiveBatchSizeCallback(max_batch_size=128, duration=1, plot=False)
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[abs_], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ClassificationModule(MNIST1DMLP(hidden=16)), datamodule=Data())
        >>> [entry["batch_size"] for entry in abs_.history], abs_.batch_size  # trained with; the next epoch's
        ([32, 64, 128], 128)
    """

    def __init__(
        self,
        max_batch_size: int,
        schedule: str | BatchSchedule = "adaptive",
        factor: int | None = None,
        decay_ratio: float | None = None,
        duration: int | None = None,
        mode: str = "dataloader",
        warmup_epochs: float = 0.0,
        fb_warmup_epochs: float | None = None,
        adversarial: bool = False,
        adversarial_fraction: float = 0.2,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        probe_data: Iterable[Any] | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        eig_tol: float = 5e-2,
        plot: bool = True,
    ):
        check_positive_int(max_batch_size, "max_batch_size")
        parameters = {"factor": factor, "decay_ratio": decay_ratio, "duration": duration,
                      "fb_warmup_epochs": fb_warmup_epochs}
        if isinstance(schedule, BatchSchedule):
            given = [name for name, value in parameters.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: a schedule object carries its own parameters; set them on "
                                 f"{type(schedule).__name__}(...) and leave these None")
        else:
            defaults = {"factor": 2, "decay_ratio": 2.0, "duration": 10, "fb_warmup_epochs": 5.0}
            schedule = batch_schedule(schedule, **{k: defaults[k] if v is None else v for k, v in parameters.items()})
        check_choice(mode, "mode", MODES)
        adversarial_fraction = check_number(adversarial_fraction, "adversarial_fraction", 0, 1)
        warmup_epochs = check_number(warmup_epochs, "warmup_epochs", 0)
        if adversarial and not schedule.probes:
            raise ValueError(f"adversarial=True (ABSA) goes with schedule='adaptive' ('abs'), not {schedule.name!r}")
        self.max_batch_size, self.schedule, self.factor = max_batch_size, schedule, schedule.factor
        self.mode, self.warmup_epochs = mode, warmup_epochs
        self.adversarial = adversarial
        self.plot = plot
        check_number(eig_tol, "eig_tol", 0, low_open=True)
        # the top eigenvalue through the one measurement (hessian.summary), warm-started from the last epoch's
        self._probe = HessianProbe(SpectrumOptions(top_k=1, tol=eig_tol, trace=False, seed=seed), probe_size,
                                   probe_batch_size, probe_data, seed, loss_fn, max_overhead=PROBE_OVERHEAD,
                                   min_size=128, owner=type(self).__name__, fixed_cost=False)
        # schedule state (all of it in state_dict, with the schedule's own)
        self.base_batch_size: int | None = None
        self.batch_size: int | None = None
        self.adversarial_fraction = adversarial_fraction if adversarial else 0.0
        self.warmup: dict[str, float] | None = None
        self.timings = dict.fromkeys(TIMINGS, 0.0)  # cumulative seconds (see the class docstring)
        self.history: list[dict[str, Any]] = []
        self._adversary: Any = None
        # (epoch, the first group's LR, the global batch, the adversarial fraction) the epoch trains with, for history
        self._epoch_start: tuple[int, float, int, float] | None = None
        self._decision_lr: float | None = None  # that LR after the last decision on it: a drop since is a decay
        self._warm_ratio: float | None = None  # the warmup's LR multiplier for this batch's optimizer step
        self._group_lrs: list[float] = []  # the LRs the warmup scaled, put back after the step
        self._hooks: list[Any] = []
        self._reloaded = False  # a batch-size change awaits the next epoch's dataloader
        self._configured: tuple[Any, int] | None = None  # (holder, batch_size) or (trainer, accumulation) to restore
        self._reload_every: int | None = None  # the Trainer's reload_dataloaders_every_n_epochs, restored after fit
        self._clock: AllReduceClock | None = None  # times DDP's gradient all-reduces (None: not measured)
        self._wrapped_hook: tuple[Any, Any] | None = None  # (DDPStrategy, the user's comm hook it had), restored
        self._timed_loop: Any = None  # the fit loop whose setup_data is timed, restored after fit
        self._started: tuple[float, float] | None = None  # (perf_counter at train start, train_seconds before)
        self._communication_before = 0.0  # communication_seconds of the run before this fit (a resumed one)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule.alias, max_batch_size=self.max_batch_size)

    # ---- set-up ------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.schedule.probes:
            self._probe.setup(trainer, pl_module, stage)
        if self.mode == "dataloader":
            if not trainer.fit_loop._data_source.is_module():
                raise ValueError("AdaptiveBatchSizeCallback: mode='dataloader' rebuilds the train loader from "
                                 "train_dataloader() with a larger batch_size, which a DataLoader passed to fit() "
                                 "cannot do: give fit() a datamodule (or a module with train_dataloader()), or use "
                                 "mode='accumulate'")
            self._batch_holder(trainer, pl_module)  # fails early if there is none
            self._reload_every = trainer.reload_dataloaders_every_n_epochs
        if self.adversarial:
            self._adversary = self._find_or_add_adversary(trainer, pl_module, stage)
        self._clock = None
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and getattr(strategy, "_ddp_comm_hook", None) is not None:
            # the user's communication hook, which Lightning registers after setup: time it rather than replace it
            self._clock = AllReduceClock()
            self._wrapped_hook = (strategy, strategy._ddp_comm_hook)
            strategy._ddp_comm_hook = self._clock.wrap(strategy._ddp_comm_hook)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "dataloader" and self.schedule.grows:
            self._check_loader_follows(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_clocks(trainer)
        if len(trainer.optimizers) != 1:
            raise ValueError(f"AdaptiveBatchSizeCallback scales one optimizer's LR; found {len(trainer.optimizers)} "
                             "(ABS needs a single-optimizer module)")
        if self.mode == "dataloader":
            self._check_loader_reads(trainer, pl_module)
        per_device = self._per_device_batch(trainer, pl_module)
        accumulate = trainer.accumulate_grad_batches
        current = per_device * trainer.world_size * accumulate
        self._configured = ((self._batch_holder(trainer, pl_module)[0], per_device) if self.mode == "dataloader"
                            else (trainer, accumulate))
        if self.batch_size is None:  # a fresh run (a resumed one has its schedule from the checkpoint)
            self.base_batch_size = self.batch_size = current
            if self.max_batch_size < current:
                raise ValueError(
                    f"max_batch_size={self.max_batch_size} is below the starting global batch {current} "
                    f"(= batch_size {per_device} x {trainer.world_size} devices x {accumulate} accumulation)"
                )
            self._grow(trainer, pl_module, self.schedule.start(current, self.max_batch_size))  # fb: to the cap
            if self.schedule.start_warmup_epochs is not None:
                self.warmup = {"start_epoch": 0.0, "epochs": self.schedule.start_warmup_epochs,
                               "from_ratio": current / self.batch_size}
        else:
            if current != self.base_batch_size:
                rank_zero_warn(f"AdaptiveBatchSizeCallback: the resumed schedule starts from the checkpoint's batch "
                               f"{self.base_batch_size} (now at {self.batch_size}), not the configured {current}")
            self._realise(trainer, pl_module)
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        dataset_size = len(dataset) if isinstance(dataset, Sized) else None
        if dataset_size is not None and self._largest_reachable() > dataset_size:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} exceeds the {dataset_size} training samples: lower "
                "max_batch_size"
            )
        if self.schedule.probes and not self._capped():
            start = time.perf_counter()
            self._probe.on_train_start(trainer, pl_module)  # finds the probe samples, checks the loss on them
            self.timings["hessian_seconds"] += time.perf_counter() - start
        if self._adversary is not None:
            self._adversary.fraction = self.adversarial_fraction
        optimizer = trainer.optimizers[0]
        if self._decision_lr is None:  # fresh, or a checkpoint without it
            self._decision_lr = optimizer.param_groups[0]["lr"]
        self._hooks = [optimizer.register_step_pre_hook(self._warm), optimizer.register_step_post_hook(self._unwarm)]

    def _start_clocks(self, trainer: pl.Trainer) -> None:
        """Start the run's timers: the train wall time, the loader rebuilds after a growth (inside the fit loop's
        ``setup_data``) and, under DDP, the gradient all-reduces (a communication hook)."""
        self._started = (time.perf_counter(), self.timings["train_seconds"])
        self._communication_before = self.timings["communication_seconds"]
        loop = trainer.fit_loop
        untimed = loop.setup_data

        def setup_data() -> None:
            if not self._reloaded:
                return untimed()
            start = time.perf_counter()
            untimed()
            self.timings["resize_seconds"] += time.perf_counter() - start

        loop.setup_data, self._timed_loop = setup_data, loop
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            clock = self._clock or AllReduceClock()
            try:
                model.register_comm_hook(model.process_group, clock.wrap())
                self._clock = clock
            except RuntimeError:  # a hook is registered already: ours (wrapped in setup), or one we cannot time
                if self._wrapped_hook is None:
                    self._clock = None
                    rank_zero_warn("AdaptiveBatchSizeCallback: the DDP model has a communication hook already; "
                                   "abs/communication_seconds is not measured (it counts in abs/compute_seconds)")
        elif trainer.world_size > 1:
            rank_zero_warn(f"AdaptiveBatchSizeCallback: communication is timed under DDP only, not under "
                           f"{type(trainer.strategy).__name__}; abs/communication_seconds is not logged (it counts "
                           "in abs/compute_seconds)")

    def _time_so_far(self) -> dict[str, float]:
        """The cumulative timings now (the all-reduce clock is read here: on CUDA one synchronisation)."""
        if self._started is not None:
            start, before = self._started
            self.timings["train_seconds"] = before + time.perf_counter() - start
        if self._clock is not None:
            self.timings["communication_seconds"] = self._communication_before + self._clock.seconds()
        parts = ("hessian_seconds", "resize_seconds", "communication_seconds")
        self.timings["compute_seconds"] = self.timings["train_seconds"] - sum(self.timings[k] for k in parts)
        return self.timings

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(trainer)  # Lightning skips teardown when fit raises

    def _restore(self, trainer: pl.Trainer) -> None:
        """Leave no trace after fit: the LRs an interrupted warmup step scaled (a checkpoint taken on the
        exception must not keep them), the optimizer hooks, the configured batch size or accumulation
        (a datamodule fitted again, or resumed, starts from its own value), the Trainer's dataloader reloads,
        the timed ``setup_data`` and a wrapped communication hook. The timings are final here."""
        if self._started is not None:
            self._time_so_far()
            self._started = None
        if self._timed_loop is not None:
            del self._timed_loop.setup_data  # the loop's own method again
            self._timed_loop = None
        if self._wrapped_hook is not None:
            strategy, hook = self._wrapped_hook
            strategy._ddp_comm_hook = hook
            self._wrapped_hook = None
        self._clock = None
        if self._reload_every is not None:
            trainer.reload_dataloaders_every_n_epochs = self._reload_every
            self._reload_every = None
        if self._group_lrs and trainer.optimizers:
            self._unwarm(trainer.optimizers[0])
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._configured is not None:
            owner, value = self._configured
            setattr(owner, "batch_size" if self.mode == "dataloader" else "accumulate_grad_batches", value)
            self._configured = None

    # ---- per batch: LR warmup, inside the optimizer step (schedulers only ever see the full LR) ---------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._warm_ratio = None
        if not self.warmup:
            return
        progress = trainer.current_epoch + idx / max(trainer.num_training_batches, 1) - self.warmup["start_epoch"]
        if progress >= self.warmup["epochs"]:
            self.warmup = None
            return
        start = self.warmup["from_ratio"]
        self._warm_ratio = start + (1 - start) * progress / self.warmup["epochs"]

    def _warm(self, optimizer: Any, *args: Any) -> None:
        if self._warm_ratio is not None:
            self._group_lrs = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] *= self._warm_ratio

    def _unwarm(self, optimizer: Any, *args: Any) -> None:
        for g, lr in zip(optimizer.param_groups, self._group_lrs):
            g["lr"] = lr
        self._group_lrs = []

    # ---- per epoch: the schedule -------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reloaded:  # the loader was just rebuilt for a new batch size: it must have taken it
            start = time.perf_counter()
            self._reloaded = False
            self._check_loader_reads(trainer, pl_module)
            self.timings["resize_seconds"] += time.perf_counter() - start
        batch = self.batch_size  # what this epoch's loader was built with
        if self.schedule.follows_lr_decay:  # a plateau scheduler's decay, applied after the last epoch's callbacks
            self._follow_lr_decay(trainer, pl_module)
        if self.mode == "accumulate":  # a growth here applies to this epoch already; a loader waits for the next
            batch = self.batch_size
        if self._epoch_start is None or self._epoch_start[0] != trainer.current_epoch:  # kept when resumed mid-epoch
            self._epoch_start = (trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"], batch,
                                 self.adversarial_fraction)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe, growth = {"eigenvalue": None, "eigenvalue_lower_bound": False, "probe_hvps": 0}, 1
        if self.schedule.probes and not self._capped():
            start = time.perf_counter()
            probe = self._top_eigenvalue(pl_module)
            self.timings["hessian_seconds"] += time.perf_counter() - start
            growth = self.schedule.decide(eigenvalue=probe["eigenvalue"])
            growth = self._grow(trainer, pl_module, trainer.strategy.broadcast(growth, src=0))
        elif self.schedule.follows_lr_decay:
            growth = self._follow_lr_decay(trainer, pl_module)
        if self.adversarial:
            self._update_adversarial_fraction(trainer, grew=growth > 1)
        _, lr, batch, fraction = self._epoch_start  # what this epoch trained with: the decision shows from the next
        record = {"epoch": trainer.current_epoch, "batch_size": batch, "lr": lr, **probe,
                  "adversarial_fraction": fraction}
        self.history.append(record)
        metrics = {"abs/batch_size": float(batch), "abs/lr": lr, "abs/adversarial_fraction": fraction}
        if probe["eigenvalue"] is not None:
            metrics["abs/eigenvalue"] = probe["eigenvalue"]
            metrics["abs/eigenvalue_lower_bound"] = float(probe["eigenvalue_lower_bound"])
        measured = self._clock is not None or trainer.world_size == 1
        metrics.update({f"abs/{k}": v for k, v in self._time_so_far().items()
                        if measured or k != "communication_seconds"})
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._time_so_far()  # final for whoever reads ``timings`` now
        if self.plot and self.history and trainer.is_global_zero:
            from lightning_hessian.plots import plot_batch_schedule

            try:
                plot_batch_schedule(self.history, Path(trainer.default_root_dir) / "hessian" / "batch_schedule.png")
            except Exception as err:  # the history is kept (state_dict); only the picture is lost
                rank_zero_warn(f"AdaptiveBatchSizeCallback: writing the plot failed ({err!r})")

    # ---- decisions ---------------------------------------------------------------------------------------

    def _follow_lr_decay(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Give the schedule the scheduler's LR decay since its last decision; its growth (within the cap) scales the
        LR back up by as much (gg: the batch grows in place of that much of the decay)."""
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        growth = self.schedule.decide(lr_decay=self._decision_lr / lr if lr > 0 else 1.0)
        growth = self._grow(trainer, pl_module, trainer.strategy.broadcast(growth, src=0))
        self._decision_lr = trainer.optimizers[0].param_groups[0]["lr"]
        return growth

    def _top_eigenvalue(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The top eigenvalue (``None`` if the probe failed), whether it is only a lower bound (the probe stops once
        the value is known to lie where the schedule's decision no longer depends on it: ``decided_above``), and the
        products the probe made."""
        above = self.schedule.decided_above()
        try:
            record = self._probe.measure(pl_module, stop_above=above)
        except Exception as err:  # never end the run over a probe: keep the schedule as it is
            rank_zero_warn(f"AdaptiveBatchSizeCallback: Hessian probe failed ({err!r}); batch size unchanged")
            return {"eigenvalue": None, "eigenvalue_lower_bound": False, "probe_hvps": 0}
        value = record.eigenvalues[0]
        finite = math.isfinite(value)
        return {"eigenvalue": value if finite else None, "probe_hvps": int(record.hvps),
                "eigenvalue_lower_bound": finite and above is not None and not record.eigen.converged and value > above}

    def _update_adversarial_fraction(self, trainer: pl.Trainer, grew: bool) -> None:
        if grew:
            self.adversarial_fraction /= 2
        if self._capped() or self._past_half(trainer):
            self.adversarial_fraction = 0.0
        self._adversary.fraction = self.adversarial_fraction

    @staticmethod
    def _past_half(trainer: pl.Trainer) -> bool:
        """Whether training is half done at this epoch's end, by ``max_epochs`` or ``max_steps`` (whichever ends
        it first; never for an unbounded run)."""
        done = []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            done.append((trainer.current_epoch + 1) / trainer.max_epochs)
        if trainer.max_steps > 0:
            done.append(trainer.global_step / trainer.max_steps)
        return bool(done) and max(done) >= 0.5

    # ---- realising a batch size --------------------------------------------------------------------------

    def _grow(self, trainer: pl.Trainer, pl_module: pl.LightningModule, growth: int) -> int:
        """Grow the batch and scale the LR by ``growth`` (capped); return the growth made."""
        growth = min(growth, self._largest_reachable() // self.batch_size)
        if growth <= 1:
            return 1
        start = time.perf_counter()
        self.batch_size *= growth
        self.schedule.grew()
        self._realise(trainer, pl_module)
        self._scale_lr(trainer, growth)  # gg: undoes the scheduler's decay
        self.timings["resize_seconds"] += time.perf_counter() - start
        if not self.schedule.follows_lr_decay and self.warmup_epochs > 0:  # gg restores an LR: nothing to warm
            self.warmup = {"start_epoch": trainer.current_epoch + 1.0, "epochs": self.warmup_epochs,
                           "from_ratio": 1 / growth}
        return growth

    def _realise(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the per-device batch (or the accumulation) that makes the global batch ``batch_size`` from the
        next epoch on (absolute, so a holder already changed by an earlier fit does not compound)."""
        accumulate = self.mode == "accumulate"
        per_step = trainer.world_size * (self._per_device_batch(trainer, pl_module) if accumulate
                                         else trainer.accumulate_grad_batches)
        if self.batch_size % per_step:
            layout = "per-device batch x devices" if accumulate else "devices x accumulation"
            raise ValueError(f"AdaptiveBatchSizeCallback: the global batch {self.batch_size} is not a multiple of "
                             f"{per_step} ({layout}); resume a checkpoint on a layout that divides it")
        if accumulate:
            trainer.accumulate_grad_batches = self.batch_size // per_step
        else:
            self._batch_holder(trainer, pl_module)[0].batch_size = self.batch_size // per_step
            # reload the train dataloader at the next epoch start (also when called from on_train_start,
            # after Lightning already built this epoch's loader), and never else unless the user asked for it
            if not trainer.reload_dataloaders_every_n_epochs:
                trainer.reload_dataloaders_every_n_epochs = sys.maxsize
            trainer.fit_loop._last_train_dl_reload_epoch = float("-inf")
            self._reloaded = True

    @staticmethod
    def _scale_lr(trainer: pl.Trainer, growth: float) -> None:
        """Multiply the LR wherever it is kept: the groups (OneCycleLR keeps its range there), the schedulers'
        base LRs, maxima (CyclicLR) and floors (cosine annealing, ReduceLROnPlateau), and those of schedulers
        nested in SequentialLR / ChainedScheduler."""
        groups = trainer.optimizers[0].param_groups
        for g in groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in g:
                    g[key] *= growth
        pending = [config.scheduler for config in trainer.lr_scheduler_configs]
        while pending:
            scheduler = pending.pop()
            pending.extend(getattr(scheduler, "_schedulers", []))
            for attr in ("base_lrs", "max_lrs", "min_lrs"):  # min_lrs: ReduceLROnPlateau's floors
                if hasattr(scheduler, attr):
                    setattr(scheduler, attr, [lr * growth for lr in getattr(scheduler, attr)])
            if isinstance(getattr(scheduler, "eta_min", None), (int, float)):  # the cosine schedules' floor
                scheduler.eta_min *= growth
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [g["lr"] for g in groups]

    def _largest_reachable(self) -> int:
        return self.schedule.largest(self.base_batch_size, self.max_batch_size)

    def _capped(self) -> bool:
        return self.batch_size is not None and self.batch_size * self.factor > self.max_batch_size

    @staticmethod
    def _batch_holder(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, str]:
        """The object whose ``batch_size`` the train dataloader reads, and its name: the datamodule when there is
        one (or its ``hparams``), else the LightningModule (or its ``hparams``)."""
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        name = type(source).__name__
        for holder, label in ((source, name), (getattr(source, "hparams", None), f"{name}.hparams")):
            if holder is not None and isinstance(getattr(holder, "batch_size", None), int):
                return holder, label
        raise ValueError(
            f"AdaptiveBatchSizeCallback: mode='dataloader' needs an integer `batch_size` attribute (or "
            f"hparams.batch_size) on the {name} whose train_dataloader() reads it; add one, or use mode='accumulate'"
        )

    def _check_loader_follows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A dry reload before training: build the train loader once with the holder's ``batch_size`` at what a first
        growth sets, then put it back; fail now, not at that growth, if the loader did not take it (e.g. a
        datamodule that turns ``batch_size`` into a per-device size once in ``setup()``)."""
        holder, name = self._batch_holder(trainer, pl_module)
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        configured = holder.batch_size
        holder.batch_size = trial = configured * self.factor
        try:
            with isolate_rng():  # building a loader may draw (a random split): not from training's stream
                loader = source.train_dataloader()
        finally:
            holder.batch_size = configured
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        elif isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        loaded = getattr(loader, "batch_size", None)
        if loaded != trial:
            raise ValueError(
                f"AdaptiveBatchSizeCallback: mode='dataloader' grows {name}.batch_size, but "
                f"{type(source).__name__}.train_dataloader() does not follow it (with {name}.batch_size={trial} it "
                f"built a loader of batch_size={loaded}; a per-device size set once in setup()?): build the loader "
                f"from {name}.batch_size, or use mode='accumulate'"
            )

    def _check_loader_reads(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail if the train DataLoader's batch size is not the holder's (it does not read the one we change)."""
        holder, name = self._batch_holder(trainer, pl_module)
        loaded = getattr(trainer.train_dataloader, "batch_size", None)
        if loaded is not None and loaded != holder.batch_size:
            raise ValueError(
                f"mode='dataloader' sets {name}.batch_size (now {holder.batch_size}), but the train "
                f"DataLoader has batch_size={loaded}: its train_dataloader() does not read that attribute. Build the "
                "loader from it, or use mode='accumulate'"
            )

    def _per_device_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.mode == "dataloader":
            return self._batch_holder(trainer, pl_module)[0].batch_size
        loader = trainer.train_dataloader
        if loader is None or getattr(loader, "batch_size", None) is None:
            raise ValueError("mode='accumulate' needs a train DataLoader with a fixed batch_size")
        return loader.batch_size

    def _find_or_add_adversary(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback

        for callback in trainer.callbacks:
            if isinstance(callback, AdversarialAugmentCallback):
                return callback
        adversary = AdversarialAugmentCallback(attack="fgsm", fraction=self.adversarial_fraction)
        trainer.callbacks.append(adversary)
        adversary.setup(trainer, pl_module, stage)
        return adversary

    # ---- checkpoint --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_batch_size": self.base_batch_size, "batch_size": self.batch_size, **self.schedule.state_dict(),
            "adversarial_fraction": self.adversarial_fraction, "warmup": self.warmup,
            "timings": dict(self.timings), "history": self.history, "probe": self._probe.state_dict(),
            "decision_lr": self._decision_lr,
            "epoch_start": None if self._epoch_start is None else list(self._epoch_start),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.schedule.load_state_dict({key: state.pop(key) for key in self.schedule.state_dict() if key in state})
        for key in ("reference", "epochs_since_growth"):  # abs's, in checkpoints from before the schedule objects
            state.pop(key, None)
        if "probe" in state:  # the probe's warm start: a resumed run's eigenvalues equal an uninterrupted one's
            self._probe.load_state_dict(state.pop("probe"))
        self._decision_lr = state.pop("decision_lr", None)
        state.pop("epoch_lr", None)  # a checkpoint from before epoch_start: this epoch's values are read again
        timings = state.pop("timings", {"hessian_seconds": state.pop("probe_seconds", 0.0)})  # older: the probes'
        self.timings = {key: float(timings.get(key, 0.0)) for key in TIMINGS}
        start = state.pop("epoch_start", None)
        self._epoch_start = None if start is None else (int(start[0]), float(start[1]), int(start[2]), float(start[3]))
        for key, value in state.items():
            setattr(self, key, value)
