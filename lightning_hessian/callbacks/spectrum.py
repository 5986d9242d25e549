"""HessianSpectrumCallback: the loss Hessian's top eigenvalues, trace and density during training."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_hessian.callbacks.no_trace import leave_no_trace
from lightning_hessian.callbacks.probe import (
    LossFn,
    check_loss,
    draw_probe_indices,
    prepare_batch,
    probe_batches,
    resolve_loss_fn,
    train_dataset_of,
)
from lightning_hessian.checks import check_number, check_positive_int
from lightning_hessian.hessian import (
    Batches,
    HessianOperator,
    hutchinson_trace,
    per_layer_top_eigenvalue,
    per_layer_trace,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.hessian.blocks import block_slices

TRACE_METHODS = ("krylov", "hutch++", "hutchinson")
DEFAULT_PROBE_SIZE = 1024


class HessianSpectrumCallback(Callback):
    """Log the loss Hessian's top-k eigenvalues, trace and (optionally) density and per-layer values.

    The Hessian is taken on a fixed probe set (``probe_size`` training samples drawn once with ``seed``, by
    default 1,024 or the whole training set if smaller, or the given ``probe_data`` batches: raw loader batches,
    which get the precision conversion and batch hooks as training batches do; ``compute()`` called on its own
    takes them as they are), so the curve over training follows the model, not sampling noise. It runs every
    ``every_n_epochs`` epochs (or every ``every_n_steps`` optimizer steps), in eval mode by default
    (``mode="train"`` uses batch statistics), and leaves the model exactly as it found it. Under
    DDP each rank takes its share of the probe set and the Hessian-vector products are all-reduced, so the
    values equal a single process's on the whole probe set (in eval mode; with ``mode="train"`` BatchNorm
    normalises each rank's probe batches by their own statistics, as DDP training does without SyncBatchNorm).

    The trace reuses the eigenvalue run by default (``trace_method="krylov"``): Lanczos goes on to at least
    ``krylov_steps`` Hessian-vector products, the trace on that Krylov basis is known exactly, and Hutchinson
    probes estimate only the rest, which holds little of the variance; a probe costs about half of
    top-1 + Hutch++ at the same target (``benchmarks/spectrum_overhead.py``). ``"hutch++"`` and
    ``"hutchinson"`` estimate the trace on its own.

    ``max_overhead`` caps the callback's cost: a scheduled probe runs only if the time spent probing, plus
    the last probe's time again, stays within that fraction of the time spent training (the first probe
    always runs: its cost is not known before), so a run's overhead stays near the cap. A probe
    on a 1,024-sample set costs some tens of Hessian-vector products, so on a small data set probing every
    epoch can cost more than the epoch itself.

    The loss is ``loss_fn(module, batch)`` if given, else the module's ``hessian_loss(batch)``, else
    cross-entropy on ``(x, y)`` batches. History is kept in the checkpoint; plots (history, density) are
    written to ``<default_root_dir>/hessian/`` and to TensorBoard when that logger is used.

    Example::

        from lightning_hessian import HessianSpectrumCallback
        trainer = Trainer(callbacks=[HessianSpectrumCallback(top_k=3, per_layer=True)])
        trainer.fit(model, datamodule=dm)   # logs hessian/eig_1..3, hessian/trace, hessian/<layer>/...
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
        probe_batch_size: int = 1024,
        probe_data: list[Any] | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        mode: str = "eval",
        params: list[str] | None = None,
        eig_tol: float = 1e-3,
        trace_rel_tol: float = 0.05,
        trace_max_samples: int = 200,
        trace_min_samples: int = 10,
        trace_method: str = "krylov",
        krylov_steps: int = 20,
        max_overhead: float | None = None,
        plot: bool = True,
    ):
        for name, value in (("top_k", top_k), ("every_n_epochs", every_n_epochs),
                            ("probe_batch_size", probe_batch_size), ("trace_max_samples", trace_max_samples),
                            ("trace_min_samples", trace_min_samples), ("krylov_steps", krylov_steps)):
            check_positive_int(value, name)
        if probe_size is not None:
            check_positive_int(probe_size, "probe_size")
        if every_n_steps is not None:
            check_positive_int(every_n_steps, "every_n_steps")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if trace_method not in TRACE_METHODS:
            raise ValueError(f"trace_method must be one of {TRACE_METHODS}, got {trace_method!r}")
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
        self.history: list[dict[str, Any]] = []
        self.skipped = 0  # scheduled probes skipped to stay within max_overhead
        self._probe_seconds = 0.0  # time spent probing / training (minus probes) so far, for max_overhead
        self._train_seconds = 0.0
        self._clock: float | None = None
        self._last_step = 0  # the optimizer step last probed by every_n_steps (step 0 is never probed)
        self._batches: list[Any] | None = None
        self._loss: LossFn | None = None
        self._owner = type(self).__name__  # named in loss errors (AdaptiveBatchSizeCallback's probe names its own)
        self._warm_start: torch.Tensor | None = None
        self._last_density: dict[str, list[float]] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            top_k=self.top_k, every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps,
            probe_size=self.probe_size or DEFAULT_PROBE_SIZE, mode=self.mode, params=repr(self.params),
            seed=self.seed, per_layer=self.per_layer, probe_data=self.probe_data is not None,
            loss_fn=_callable_name(self.loss_fn), trace=self.trace, density=self.density,
            trace_method=self.trace_method, eig_tol=self.eig_tol, krylov_steps=self.krylov_steps,
            probe_batch_size=self.probe_batch_size,
        )

    # ---- hooks -------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loss = resolve_loss_fn(pl_module, self.loss_fn, self._owner)
        op = HessianOperator(pl_module, self._loss, [], params=self.params)  # raises if nothing is selected
        if self.top_k > op.dim:
            raise ValueError(f"top_k={self.top_k} exceeds the {op.dim} selected parameters; lower top_k")
        if self.per_layer:
            try:
                block_slices(op, None)
            except ValueError as err:
                raise ValueError(f"per_layer=True: {err}; select whole layers in params (e.g. 'net.0', not "
                                 "'*.weight') or set per_layer=False") from None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_data is not None:
            batches = list(self.probe_data)[trainer.global_rank :: trainer.world_size]
        else:
            dataset, collate_fn = train_dataset_of(trainer)
            size = self.probe_size if self.probe_size is not None else min(DEFAULT_PROBE_SIZE, len(dataset))
            indices = draw_probe_indices(len(dataset), size, self.seed)
            batches = probe_batches(dataset, indices, self.probe_batch_size, collate_fn,
                                    trainer.global_rank, trainer.world_size, self.seed)
        self._batches = Batches(prepare_batch(trainer, b) for b in batches)
        if self._batches:  # a rank may hold no probe batch (fewer given batches than ranks)
            with leave_no_trace(pl_module, self.mode):
                check_loss(self._loss, pl_module, self._batches, self._owner)
        self._clock = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # per optimizer step, not micro-batch (two optimizers: it moves by 2)
        if self.every_n_steps and step // self.every_n_steps > self._last_step // self.every_n_steps:
            self._last_step = step
            self._probe_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._probe_and_log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.skipped:
            rank_zero_info(f"HessianSpectrumCallback: {self.skipped} scheduled probe(s) skipped to keep within "
                           f"max_overhead={self.max_overhead} ({self._probe_seconds:.1f} s probing, "
                           f"{self._train_seconds:.1f} s training)")
        if self.plot and self.history and trainer.is_global_zero:
            try:
                self.write_plots(trainer)
            except Exception as err:  # the history is kept (state_dict); only the picture is lost
                rank_zero_warn(f"HessianSpectrumCallback: writing the plots failed ({err!r})")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "skipped": self.skipped, "probe_seconds": self._probe_seconds,
                "train_seconds": self._train_seconds, "warm_start": self._warm_start, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.skipped = state_dict.get("skipped", 0)
        self._probe_seconds = state_dict.get("probe_seconds", 0.0)
        self._train_seconds = state_dict.get("train_seconds", 0.0)
        self._warm_start = state_dict.get("warm_start")
        self._last_step = state_dict.get("last_step", 0)

    # ---- work --------------------------------------------------------------------------------------------

    def compute(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """One measurement on the probe set (the callback's hooks call this).

        On its own, outside a Trainer, it needs ``probe_data``: batches already on the module's device.
        """
        if self._batches is None:
            if self.probe_data is None:
                raise ValueError("compute() outside a running Trainer needs probe_data= (the batches to probe)")
            self._batches = Batches(self.probe_data)
        if self._loss is None:
            self._loss = resolve_loss_fn(pl_module, self.loss_fn, self._owner)
            with leave_no_trace(pl_module, self.mode):
                check_loss(self._loss, pl_module, self._batches, self._owner)
        record: dict[str, Any] = {}
        sampling = dict(rel_tol=self.trace_rel_tol, min_samples=self.trace_min_samples,
                        max_samples=max(self.trace_max_samples, self.trace_min_samples),
                        batch=min(16, self.trace_min_samples))  # the whole model's trace and the per-layer ones
        with leave_no_trace(pl_module, self.mode):
            op = HessianOperator(pl_module, self._loss, self._batches, params=self.params)
            krylov = self.trace and self.trace_method == "krylov"
            warm = self._warm_start
            if warm is not None and warm.shape[-1] != op.dim:  # e.g. a checkpoint of another parameter set
                warm = None
            eig = top_eigenvalues(op, k=self.top_k, tol=self.eig_tol, v0=warm, seed=self.seed,
                                  min_iter=min(self.krylov_steps, op.dim) if krylov else 0, return_basis=krylov)
            self._warm_start = eig.eigenvectors.detach()
            record["eigenvalues"] = [float(v) for v in eig.eigenvalues]
            record["hvps"] = eig.num_hvps
            if self.trace:
                basis, basis_trace = None, None
                if krylov:  # the first krylov_steps vectors: the same subspace however long the run went
                    steps = min(self.krylov_steps, eig.basis.shape[0])
                    basis, basis_trace = eig.basis[:steps], float(eig.basis_projection[:steps, :steps].trace())
                tr = hutchinson_trace(
                    op, **sampling, seed=self.seed + len(self.history),
                    method="hutchinson" if krylov else self.trace_method, basis=basis, basis_trace=basis_trace,
                )
                record["trace"], record["trace_std_error"] = float(tr.estimate), float(tr.std_error)
                record["hvps"] += tr.num_hvps
            if self.per_layer:
                eigs = per_layer_top_eigenvalue(op, tol=self.eig_tol, seed=self.seed)
                record["layer_eigenvalue"] = {name: float(r.eigenvalues[0]) for name, r in eigs.items()}
                if self.trace:
                    traces = per_layer_trace(op, **sampling, seed=self.seed)
                    record["layer_trace"] = {name: float(t.estimate) for name, t in traces.items()}
            if self.density:
                dens = spectral_density(op, seed=self.seed)
                self._last_density = {"grid": dens.grid.tolist(), "density": dens.density.tolist()}
        return record

    def _within_budget(self, trainer: pl.Trainer) -> bool:
        """Account the training time since the last probe; say whether ``max_overhead`` allows a probe now
        (rank 0 decides: every rank must take part in the all-reduced products, or none)."""
        now = time.perf_counter()
        self._train_seconds += now - (self._clock if self._clock is not None else now)
        self._clock = now
        if self.max_overhead is None:
            return True
        last = self.history[-1]["seconds"] if self.history else 0.0  # the next probe should cost about as much
        budget = self.max_overhead * self._train_seconds
        within = trainer.strategy.broadcast(self._probe_seconds + last <= budget, src=0)
        self.skipped += not within
        return within

    def _probe_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches is None or not self._within_budget(trainer):
            return
        start = time.perf_counter()
        try:
            record = self.compute(pl_module)
        except Exception as err:  # a diagnostic never ends a training run
            rank_zero_warn(f"HessianSpectrumCallback: probe at step {trainer.global_step} failed ({err!r}); "
                           "training continues")
            return
        finally:
            self._probe_seconds += time.perf_counter() - start
            self._clock = time.perf_counter()
        values = [*record["eigenvalues"], record.get("trace", 0.0)]
        if not all(math.isfinite(v) for v in values):
            rank_zero_warn(f"HessianSpectrumCallback: non-finite Hessian values at step {trainer.global_step} "
                           f"({values}); not logged, training continues")
            return
        record.update(step=trainer.global_step, epoch=trainer.current_epoch, seconds=time.perf_counter() - start)
        self.history.append(record)
        if self.every_n_steps is None:
            pl_module.log_dict(self._metrics(record), on_step=False, on_epoch=True, sync_dist=False)
        else:  # straight to the loggers: self.log on a step is thinned out by the Trainer's log_every_n_steps
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(record), step=trainer.global_step)

    @staticmethod
    def _metrics(record: dict[str, Any]) -> dict[str, float]:
        metrics = {f"hessian/eig_{i + 1}": v for i, v in enumerate(record["eigenvalues"])}
        if "trace" in record:
            metrics["hessian/trace"] = record["trace"]
            metrics["hessian/trace_std_error"] = record["trace_std_error"]
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
