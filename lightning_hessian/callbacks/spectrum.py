"""HessianSpectrumCallback: the loss Hessian's top eigenvalues, trace and density during training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hessian.callbacks import budget
from lightning_hessian.callbacks.budget import EIGEN, FULL, PRODUCT, ProbeBudget
from lightning_hessian.callbacks.hessian_probe import DEFAULT_PROBE_SIZE, HessianProbe
from lightning_hessian.checks import check_choice, check_number, check_positive_int
from lightning_hessian.hessian.operator import LossFn, NonFiniteError
from lightning_hessian.hessian.summary import TRACE_METHODS, SpectrumOptions, record_summary

DEFAULT_MAX_OVERHEAD = 0.03
MIN_AUTO_PROBE = 32  # the smallest probe set the budget may choose
WARM_PRODUCTS = 4  # products a warm-started top-1 probe takes (plus the graph)
COLD_PRODUCTS = 16  # products of a first (cold) top-1 probe, for its predicted cost
TARGET_PROBES = 10  # the probe set is sized for about this many probes over a run of known length
TIMING_FORWARDS = 16  # timing a product (two graphs, four products on 32 and 8 samples) costs about this many
# forward passes on 32 samples: what the loss check at train start took; a product on them, at least one


class HessianSpectrumCallback(Callback):
    """Log the loss Hessian's top-k eigenvalues, trace and (optionally) density and per-layer values, within a
    budget of the training time.

    **What the defaults do.** The top eigenvalue (and the trace, when affordable) of the loss Hessian on a fixed
    probe set of training samples, in eval mode (``mode="train"`` uses batch statistics), leaving the model
    exactly as found, at no more than ``max_overhead`` (3%) of the training time:

    - A scheduled probe (every epoch; ``every_n_epochs`` / ``every_n_steps``) runs only if the probing time,
      with this probe's predicted cost, stays within 3% of the training time so far; otherwise it is skipped
      and a later one runs when the budget allows. So a short run, or a model whose Hessian-vector products
      are dear (a transformer, a ResNet on a CPU), may see few probes or none (said at the end of training).
    - The loss is checked on 32 probe samples at train start (one forward pass, the callback's only work before
      the first scheduled probe). At the first scheduled probe whose budget pays for it (priced at 16 such
      forward passes, and only where the whole run's budget would also pay for a first probe on 32 samples, a
      product priced at one), one Hessian-vector product is timed on 32 and on 8 samples (its fixed cost apart
      from its cost per sample; all of it counts in the budget).
      That sizes the probe set (a power of two from 32 to 1,024 samples, never more than the training set: the
      largest whose first, cold top-1 probe fits the budget of about a tenth of the run, so ~10 probes) and
      predicts the probe.
      The set is kept for the whole run and in the checkpoint: the curve follows the model, not the sample.
    - Probes after the first start Lanczos from the last eigenvectors and stop at a 1% residual
      (``eig_tol``, so the eigenvalue is within 1% of the probe set's), a handful of products for top-1.
    - The trace costs several times more (at least ``krylov_steps`` + ``trace_min_samples`` products): it is
      measured at the probes the budget pays for in full, at most as many probes as the budget still allows,
      and left out of the others; those eigenvalue-only probes keep to half the budget while full ones can
      recur in the run, so the trace still comes round.
    - Each probe logs ``hessian/hvps`` and ``hessian/probe_seconds`` with its values; the first skipped or
      shrunk probe is said once, and the counts at the end of training.

    ``max_overhead=None`` restores the unbudgeted schedule: a full probe at every scheduled point on
    ``probe_size`` samples (default 1,024 or the whole training set if smaller).

    The probe set is ``probe_size`` training samples drawn once with ``seed`` (a smaller automatic size takes a
    subset of the same draw), or the given ``probe_data`` batches (raw loader batches, which get the precision
    conversion and batch hooks as training batches do; ``compute()`` called on its own takes them as they are),
    collated in batches of ``probe_batch_size`` (default: the training loader's batch size, or a multiple while a
    batch's graph stays within 64 MiB, so a product holds about one training step's graph per batch at most);
    a probe keeps the graphs of at most 4 training batches (or 64 MiB, if more) between its products and rebuilds
    the rest, so its memory stays a small multiple of a training step's.
    Under DDP each rank takes its share of the probe set and the Hessian-vector products are all-reduced, so
    the values equal a single process's on the whole probe set (in eval mode; with ``mode="train"`` BatchNorm
    normalises each rank's probe batches by their own statistics, as DDP training does without
    SyncBatchNorm); rank 0's timing and budget decisions are broadcast.

    The trace reuses the eigenvalue run by default (``trace_method="krylov"``): Lanczos goes on to at least
    ``krylov_steps`` Hessian-vector products, the trace on that Krylov basis is known exactly, and Hutchinson
    probes estimate only the rest. A trace that stops at ``trace_max_samples`` short of ``trace_rel_tol`` warns.
    A probe on a NaN or infinite loss warns "the loss is NaN at this probe" and training goes on.

    The loss is ``loss_fn(module, batch)`` if given, else the module's ``hessian_loss(batch)``, else
    ``cross_entropy(module(x), y)`` on ``(x, y)`` batches where that is the module's loss (integer labels, logits
    for them; anything else stops the fit before its first step with one line naming ``loss_fn=``). The
    callback's set-up (the loss check, the timed product, collating the probe set) counts in its budget.
    History is kept in the checkpoint and each probe's values go to the Trainer's loggers; ``plot=True`` also
    draws the history and last density at the end of training (``<default_root_dir>/hessian/``, and TensorBoard
    when that logger is used; about 0.2 s, off by default). The measurement is
    ``hessian.summary.measure_spectrum``, the one ``analyze_model`` and ``AdaptiveBatchSizeCallback`` use.

    Args:
        top_k: eigenvalues logged per probe (``hessian/eig_1`` .. ``eig_k``, counted with multiplicity).
        trace: measure the trace (``hessian/trace``) when the budget pays for it.
        density: also the spectral density (stochastic Lanczos quadrature), kept in the history and plotted.
        per_layer: also each layer's top eigenvalue and trace (``hessian/<layer>/...``).
        every_n_epochs, every_n_steps: the probe schedule (steps take precedence when given).
        probe_size: samples in the probe set (None: sized automatically, see above).
        probe_batch_size: samples per probe batch (None: see above).
        probe_data: explicit probe batches instead of a draw from the training set.
        seed: the probe-set draw and the random vectors of the estimators.
        loss_fn: ``loss_fn(module, batch) -> scalar`` (None: the module's ``hessian_loss``, else cross-entropy
            where that is the module's loss).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"`` (batch statistics).
        params: parameter names to restrict the Hessian to (None: all that require grad).
        eig_tol: relative residual at which Lanczos stops.
        trace_rel_tol, trace_min_samples, trace_max_samples: the Hutchinson stopping rule for the trace.
        trace_method: ``"krylov"`` (reuse the eigenvalue run's Krylov basis), ``"hutch++"`` or ``"hutchinson"``.
        krylov_steps: Hessian-vector products the Krylov trace runs at least.
        max_overhead: the budget, as a share of training time (None: no budget, a full probe at every point).
        plot: draw the history and last density at the end of training.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_hessian import ClassificationModule, HessianSpectrumCallback
        >>> _ = torch.manual_seed(0)
        >>> data = DataLoader(TensorDataset(torch.randn(256, 40), torch.randint(0, 10, (256,))), batch_size=32)
        >>> spectrum = HessianSpectrumCallback(top_k=2, max_overhead=None, probe_size=128)  # every epoch, no budget
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[spectrum], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ClassificationModule(torch.nn.Linear(40, 10)), data)
        >>> len(spectrum.history), sorted(k for k in trainer.callback_metrics if k.startswith("hessian/eig"))
        (2, ['hessian/eig_1', 'hessian/eig_2'])
    """

    def __init__(
        self,
        top_k: int = 1,
        trace: bool = True,
        density: bool = False,
        per_layer: bool = False,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        probe_data: list[Any] | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        mode: str = "eval",
        params: list[str] | None = None,
        eig_tol: float = 1e-2,
        trace_rel_tol: float = 0.05,
        trace_max_samples: int = 200,
        trace_min_samples: int = 10,
        trace_method: str = "krylov",
        krylov_steps: int = 20,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        plot: bool = False,
    ):
        for name, value in (("top_k", top_k), ("every_n_epochs", every_n_epochs),
                            ("trace_max_samples", trace_max_samples), ("trace_min_samples", trace_min_samples),
                            ("krylov_steps", krylov_steps)):
            check_positive_int(value, name)
        for name, value in (("probe_size", probe_size), ("every_n_steps", every_n_steps),
                            ("probe_batch_size", probe_batch_size)):
            if value is not None:
                check_positive_int(value, name)
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        check_choice(trace_method, "trace_method", TRACE_METHODS)
        if max_overhead is not None:  # a fraction of the training time
            check_number(max_overhead, "max_overhead", 0, low_open=True)
        check_number(trace_rel_tol, "trace_rel_tol", 0, 1, low_open=True, high_open=True)
        check_number(eig_tol, "eig_tol", 0, low_open=True)  # the eigenvalues' relative residual target
        if probe_data is not None:
            probe_data = list(probe_data)
            if not probe_data:
                raise ValueError("probe_data holds no batches: pass batches, or None to draw probe_size samples")
        self.top_k, self.trace, self.density, self.per_layer = top_k, trace, density, per_layer
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.probe_size, self.probe_batch_size, self.probe_data = probe_size, probe_batch_size, probe_data
        self.seed, self.loss_fn, self.mode, self.params = seed, loss_fn, mode, params
        self.eig_tol, self.trace_rel_tol, self.trace_max_samples = eig_tol, trace_rel_tol, trace_max_samples
        self.trace_min_samples, self.trace_method, self.krylov_steps = trace_min_samples, trace_method, krylov_steps
        self.max_overhead = max_overhead
        self.plot = plot
        self.options = SpectrumOptions(
            top_k=top_k, tol=eig_tol, trace=trace, trace_method=trace_method, krylov_steps=krylov_steps,
            trace_rel_tol=trace_rel_tol, trace_min_samples=trace_min_samples,
            trace_max_samples=max(trace_max_samples, trace_min_samples), per_layer=per_layer, density=density,
            seed=seed,
        )
        self.history: list[dict[str, Any]] = []
        self._probe = HessianProbe(self.options, probe_size, probe_batch_size, probe_data, seed, loss_fn, mode, params,
                                   owner=type(self).__name__)
        self._budget = ProbeBudget(max_overhead)
        self._last_step = 0  # the optimizer step last probed by every_n_steps (step 0 is never probed)
        self._said: set[str] = set()  # one-time messages already given
        self._last_density: dict[str, list[float]] | None = None
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning formats it at every hook call (800 steps: ~4,800 times); computed once per fit
        if self._state_key is None:
            self._state_key = self._key()
        return self._state_key

    def _key(self) -> str:
        return self._generate_state_key(
            top_k=self.top_k, every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps,
            probe_size=self.probe_size or DEFAULT_PROBE_SIZE, mode=self.mode, params=repr(self.params),
            seed=self.seed, per_layer=self.per_layer, probe_data=self.probe_data is not None,
            loss_fn=_callable_name(self.loss_fn), trace=self.trace, density=self.density,
            trace_method=self.trace_method, eig_tol=self.eig_tol, krylov_steps=self.krylov_steps,
            probe_batch_size=self.probe_batch_size or DEFAULT_PROBE_SIZE,
        )

    @property
    def skipped(self) -> int:
        """Scheduled probes skipped to stay within ``max_overhead``."""
        return self._budget.skipped

    @property
    def shrunk(self) -> int:
        """Scheduled probes that measured the eigenvalues only, to stay within ``max_overhead``."""
        return self._budget.shrunk

    # ---- hooks -------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._state_key = None  # the arguments as they are at this fit
        self._probe.setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # under a budget the probe set is collated when a probe first runs (none may fit a short run)
        start = budget.now()
        self._probe.on_train_start(trainer, pl_module, build=self.max_overhead is None)
        self._budget.start()
        self._budget.charge(budget.now() - start, None)  # the set-up is the callback's cost too

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # per optimizer step, not micro-batch (two optimizers: it moves by 2)
        if self.every_n_steps and step // self.every_n_steps > self._last_step // self.every_n_steps:
            self._last_step = step
            self._probe_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._probe_and_log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        spent, trained = self._budget.probe_seconds, self._budget.train_seconds
        if self.max_overhead is not None and (self.skipped or self.shrunk):
            share = f"{100 * spent / trained:.1f}%" if trained > 0 else "n/a"
            message = (f"HessianSpectrumCallback: {len(self.history)} probe(s) ran ({self.shrunk} without the "
                       f"trace/per-layer/density), {self.skipped} scheduled probe(s) skipped to stay within "
                       f"max_overhead={self.max_overhead} ({spent:.1f} s probing, {trained:.1f} s training: {share})")
            if self.history:
                rank_zero_info(message)
            else:
                rank_zero_warn(message + "; probe less often or fewer samples (probe_size=), raise max_overhead, "
                               "or max_overhead=None to probe at every scheduled point")
        if self.plot and self.history and trainer.is_global_zero:
            try:
                self.write_plots(trainer)
            except Exception as err:  # the history is kept (state_dict); only the picture is lost
                rank_zero_warn(f"HessianSpectrumCallback: writing the plots failed ({err!r})")

    def state_dict(self) -> dict[str, Any]:
        probe = self._probe.state_dict()
        return {"history": self.history, "last_step": self._last_step, "warm_start": probe["warm_start"],
                "draws": probe["draws"], "probe_size": probe["size"], **self._budget.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._last_step = state_dict.get("last_step", 0)
        self._probe.load_state_dict({"warm_start": state_dict.get("warm_start"), "draws": state_dict.get("draws", 0),
                                     "size": state_dict.get("probe_size")})
        self._budget.load_state_dict(state_dict)

    # ---- work --------------------------------------------------------------------------------------------

    def compute(self, pl_module: pl.LightningModule, extras: bool = True,
                trace_max_samples: int | None = None) -> dict[str, Any]:
        """One measurement on the probe set (the callback's hooks call this); ``extras=False`` measures the
        eigenvalues only, ``trace_max_samples`` lowers the trace's cap for this one.

        On its own, outside a Trainer, it needs ``probe_data``: batches already on the module's device.
        """
        record = self._probe.measure(pl_module, extras=extras, trace_max_samples=trace_max_samples)
        if record.density is not None:
            self._last_density = {"grid": record.density.grid.tolist(), "density": record.density.density.tolist()}
        return record_summary(record)

    def _auto_size(self) -> bool:
        """Whether the probe set's size is chosen from a timed product (the budget is on and no size is given)."""
        return self.max_overhead is not None and self.probe_size is None and self.probe_data is None

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first budgeted probe: time one product on a few samples, choose the probe set's size from
        it (when automatic) and predict the first probes' cost (rank 0's timing, on every rank)."""
        start = budget.now()
        timing = self._probe.time_product(pl_module)  # measured once, charged here
        timing = trainer.strategy.broadcast(dict(timing), src=0)
        cold_products = COLD_PRODUCTS * self._products_factor()
        if self._probe.batches is None and self._probe.size is None:
            size = self._probe.max_size()
            if self._auto_size():  # the first (cold) probe within the budget of the interval between ~10 probes
                intervals = self._intervals(trainer)
                spacing = max(1.0, intervals / TARGET_PROBES) if intervals else 1.0
                allowance = self.max_overhead * self._budget.train_seconds * spacing
                size = self._probe.affordable_size(allowance, cold_products, trainer.world_size, MIN_AUTO_PROBE,
                                                   timing)
            self._probe.size = trainer.strategy.broadcast(size, src=0)
        local = self._local_samples(trainer)
        cold = self._probe.predict(local, cold_products, timing)
        extra = self.krylov_steps + self.trace_min_samples if self.trace else 0
        extra += 10 * COLD_PRODUCTS if self.per_layer else 0
        extra += self.options.density_runs * self.options.density_steps if self.density else 0
        per_product = self._probe.predict(local, 1, timing) - self._probe.predict(local, 0, timing)
        self._budget.estimate = {EIGEN: cold, FULL: cold + extra * per_product,
                                 PRODUCT: self._probe.predict(local, COLD_PRODUCTS, timing) / COLD_PRODUCTS}
        self._budget.charge(budget.now() - start, None)
        if self._auto_size():
            rank_zero_info(f"HessianSpectrumCallback: probe set of {self._probe.size} samples (one Hessian-vector "
                           f"product on them ~{1e3 * per_product:.0f} ms), within max_overhead="
                           f"{self.max_overhead} of the training time")

    def _timing_fits(self, trainer: pl.Trainer) -> bool:
        """Whether the budget so far pays for timing a product, and the whole run's budget (when the Trainer knows
        where the run ends) for the timing and a first, cold probe on the fewest samples as well: priced at
        ``TIMING_FORWARDS`` times the loss check's forward pass, and a product at one. A fit too short for any
        probe never pays for the timing either."""
        forward = self._probe.check_seconds
        spent, trained = self._budget.probe_seconds, self._budget.train_seconds
        if TIMING_FORWARDS * forward > self.max_overhead * trained - spent:
            return False
        progress = self._progress(trainer)
        cold = COLD_PRODUCTS * self._products_factor()
        return not progress or (TIMING_FORWARDS + cold) * forward <= self.max_overhead * trained / progress - spent

    def _local_samples(self, trainer: pl.Trainer) -> float:
        """This rank's share of the probe set (known before it is collated)."""
        if self._probe.batches is not None:
            return self._probe.local_samples
        size = self._probe.size or min(MIN_AUTO_PROBE, self._probe.max_size())
        return size / trainer.world_size

    def _trace_cap(self) -> int | None:
        """The most trace probes the budget pays for now, beyond the eigenvalue run a full probe makes (at least
        ``krylov_steps`` products): a first trace that needs many more probes than predicted would otherwise take
        the callback past its budget."""
        if self.max_overhead is None or PRODUCT not in self._budget.estimate:
            return None
        allowed = self.max_overhead * self._budget.train_seconds - self._budget.probe_seconds
        products = allowed / max(self._budget.estimate[PRODUCT], 1e-12)
        eigen = max(self.krylov_steps if self.trace_method == "krylov" else 0, WARM_PRODUCTS + 2)
        return int(max(products - eigen, 0))

    def _products_factor(self) -> float:
        """More products for several eigenvalues (and the search for repeated ones)."""
        return 1.0 if self.top_k == 1 else 1.0 + 0.75 * self.top_k

    def _intervals(self, trainer: pl.Trainer) -> float | None:
        """How many scheduled probes the run has, when the Trainer knows where it ends (at the first one)."""
        progress = self._progress(trainer)
        return 1 / progress if progress else None

    def _progress(self, trainer: pl.Trainer) -> float | None:
        """The fraction of the run done, when the Trainer knows where it ends."""
        done = []
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            done.append((trainer.current_epoch + 1) / trainer.max_epochs)
        if trainer.max_steps > 0:
            done.append(trainer.global_step / trainer.max_steps)
        return max(done) if done else None

    def _probe_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._budget.tick()
        if self.max_overhead is not None and not self._budget.estimate:
            if not trainer.strategy.broadcast(self._timing_fits(trainer), src=0):
                self._budget.skipped += 1
                self._say_skip(trainer)
                return
            try:
                self._prepare(trainer, pl_module)
            except Exception as err:  # a diagnostic never ends a training run
                self._budget.start()
                rank_zero_warn(f"HessianSpectrumCallback: timing a product failed ({_reason(err)}); no probe now, "
                               "training continues")
                return
        # rank 0 decides: every rank must take part in the all-reduced products, or none
        kind = trainer.strategy.broadcast(self._budget.decide(self.options.extras, self._progress(trainer)), src=0)
        if kind is None:
            self._say_skip(trainer)
            return
        extras = kind == FULL and self.options.extras
        if self.options.extras and not extras:
            self._say_once("shrink", f"HessianSpectrumCallback: the probe at step {trainer.global_step} measures the "
                           f"eigenvalues only: the trace/per-layer/density part would take the callback past "
                           f"max_overhead={self.max_overhead} (it runs at the probes the budget can pay for)")
        start = budget.now()
        try:
            if self._probe.batches is None:
                self._probe.build(trainer, self._probe.size)
            cap = self._trace_cap() if extras and self.trace else None
            entry = self.compute(pl_module, extras=extras, trace_max_samples=cap)
        except Exception as err:  # a diagnostic never ends a training run
            self._budget.charge(budget.now() - start, None)
            rank_zero_warn(f"HessianSpectrumCallback: probe at step {trainer.global_step} failed ({_reason(err)}); "
                           "training continues")
            return
        self._budget.charge(budget.now() - start, kind if self.options.extras else FULL)
        self._budget.estimate[PRODUCT] = (budget.now() - start) / max(entry["hvps"], 1)
        if not all(math.isfinite(v) for v in [*entry["eigenvalues"], entry.get("trace", 0.0)]):
            rank_zero_warn(f"HessianSpectrumCallback: non-finite Hessian values at step {trainer.global_step} "
                           f"({entry['eigenvalues']}, trace {entry.get('trace')}); not logged, training continues")
            return
        if "trace" in entry and not entry["trace_converged"]:
            se = abs(entry["trace_std_error"] / entry["trace"]) if entry["trace"] else math.inf
            if entry["trace_samples"] >= self.options.trace_max_samples:
                self._say_once("trace", f"HessianSpectrumCallback: the trace stopped at trace_max_samples="
                               f"{self.options.trace_max_samples} probes short of trace_rel_tol={self.trace_rel_tol} "
                               f"(standard error {100 * se:.1f}% of the estimate at step {trainer.global_step}); "
                               "raise trace_max_samples or trace_rel_tol", warn=True)
            else:
                self._say_once("trace budget", f"HessianSpectrumCallback: the trace at step {trainer.global_step} "
                               f"stopped at {entry['trace_samples']} probes, what max_overhead={self.max_overhead} "
                               f"paid for, short of trace_rel_tol={self.trace_rel_tol} (standard error "
                               f"{100 * se:.1f}% of the estimate, logged as hessian/trace_std_error)")
        entry.update(step=trainer.global_step, epoch=trainer.current_epoch)
        self.history.append(entry)
        if self.every_n_steps is None:
            pl_module.log_dict(self._metrics(entry), on_step=False, on_epoch=True, sync_dist=False)
        else:  # straight to the loggers: self.log on a step is thinned out by the Trainer's log_every_n_steps
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(entry), step=trainer.global_step)

    def _say_skip(self, trainer: pl.Trainer) -> None:
        self._say_once("skip", f"HessianSpectrumCallback: the probe at step {trainer.global_step} is skipped, which "
                       f"would take the callback past max_overhead={self.max_overhead} of the training time (later "
                       "probes run when the budget allows; the count is given at the end)")

    def _say_once(self, key: str, message: str, warn: bool = False) -> None:
        if key not in self._said:
            self._said.add(key)
            (rank_zero_warn if warn else rank_zero_info)(message)

    @staticmethod
    def _metrics(record: dict[str, Any]) -> dict[str, float]:
        metrics = {f"hessian/eig_{i + 1}": v for i, v in enumerate(record["eigenvalues"])}
        if "trace" in record:
            metrics["hessian/trace"] = record["trace"]
            metrics["hessian/trace_std_error"] = record["trace_std_error"]
        metrics["hessian/hvps"] = float(record["hvps"])
        metrics["hessian/probe_seconds"] = record["seconds"]
        for name, v in record.get("layer_eigenvalue", {}).items():
            metrics[f"hessian/{name}/eig_1"] = v
        for name, v in record.get("layer_trace", {}).items():
            metrics[f"hessian/{name}/trace"] = v
        return metrics

    def write_plots(self, trainer: pl.Trainer) -> list[Path]:
        """Write the history (and last density) plots; return their paths."""
        from lightning_hessian.plots import plot_spectral_density, plot_spectrum_history

        out = Path(trainer.default_root_dir) / "hessian"
        paths = [plot_spectrum_history(self.history, out / "spectrum_history.png")]
        if self._last_density is not None:
            paths.append(plot_spectral_density(self._last_density["grid"], self._last_density["density"],
                                               out / "spectral_density.png"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                import matplotlib.image

                for path in paths:
                    image = torch.from_numpy(matplotlib.image.imread(path)[..., :3]).permute(2, 0, 1)
                    logger.experiment.add_image(f"hessian/{path.stem}", image, trainer.global_step)
        return paths


def _callable_name(fn: Any) -> str:
    """A name for ``fn`` that is the same in every process (no memory address): a function's qualified name,
    a partial's function's, else the type's."""
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__qualname__", type(fn).__qualname__)


def _reason(err: Exception) -> str:
    """A failure in one line: the message alone for a non-finite loss, else the exception's repr."""
    return str(err) if isinstance(err, NonFiniteError) else repr(err)
