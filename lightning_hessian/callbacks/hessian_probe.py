"""A fixed probe set, the loss on it and the one spectrum measurement: what the Hessian callbacks share.

``HessianSpectrumCallback`` logs its measurements and ``AdaptiveBatchSizeCallback`` decides on their top
eigenvalue; both go through ``HessianProbe.measure`` (``hessian.summary.measure_spectrum`` in the module's
chosen mode, warm-started from the last probe's eigenvectors), so the same options on the same probe set give
the numbers ``analyze_model`` gives.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_hessian.callbacks import budget
from lightning_hessian.checks import check_positive_int
from lightning_hessian.hessian import Batches, HessianOperator
from lightning_hessian.hessian.blocks import block_slices
from lightning_hessian.hessian.operator import DEFAULT_CACHE_BYTES, LossFn, sample_count
from lightning_hessian.hessian.summary import SpectrumOptions, SpectrumRecord, measure_spectrum
from lightning_hessian.no_trace import leave_no_trace
from lightning_hessian.probe_set import (
    check_loss,
    cross_entropy_loss,
    draw_probe_indices,
    prepare_batch,
    probe_batches,
    resolve_loss_fn,
    train_dataset_of,
)

DEFAULT_PROBE_SIZE = 1024
TIMING_SAMPLES = 32  # samples one product is timed on, to size a probe before the first one
SMALL_TIMING_SAMPLES = 8  # and a second, smaller timing: a product's fixed cost apart from its cost per sample
MIN_SLOPE = 0.1  # the cost per sample is taken as at least this share of the larger timing's average (noise)
CHUNK_BYTES = 2**26  # a probe batch's graph may hold this much (one training batch's, if that is more)
CACHE_STEPS = 4  # a measurement caches the graphs of this many training batches (or CHUNK_BYTES, if more)
WARM_PRODUCTS = 6  # products of a warm-started top-1 measurement with its graph (ABS's at eig_tol 5%: 3-6)


class HessianProbe:
    """The Hessian of the loss on a fixed set of training samples, measured on demand.

    The probe set is ``probe_size`` samples drawn once with ``seed`` (default: 1,024, or the whole training set if
    smaller; ``size=`` of ``build`` may choose fewer, a prefix of the same draw), collated in batches of
    ``probe_batch_size`` (default: the training loader's, so a product holds about one training step's graph per
    batch, or a multiple of it while a batch's graph stays within 64 MiB), or the given ``probe_data`` batches; a
    measurement caches the graphs of ``CACHE_STEPS`` training batches (``cache_bytes``). With ``max_overhead`` (and
    neither ``probe_size`` nor ``probe_data``) the size is chosen at the first measurement instead: the largest
    power of two from ``min_size`` to 1,024 whose measurement, predicted from one timed product, costs that share of
    the training time so far. Under DDP each rank takes its share and the products are all-reduced. The loss is
    checked before training (``check_loss``), and errors name ``owner``. ``fixed_cost``: the timed product is timed
    on fewer samples too, which tells its fixed cost from its cost per sample (the budget's cost model needs it;
    ABS's average-cost rule does not).
    """

    def __init__(
        self,
        options: SpectrumOptions,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        probe_data: list[Any] | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        mode: str = "eval",
        params: list[str] | None = None,
        max_overhead: float | None = None,
        min_size: int = 256,
        owner: str = "HessianProbe",
        fixed_cost: bool = True,
    ):
        for name, value in (("probe_size", probe_size), ("probe_batch_size", probe_batch_size)):
            if value is not None:
                check_positive_int(value, name)
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if probe_data is not None:
            probe_data = list(probe_data)
            if not probe_data:
                raise ValueError("probe_data holds no batches: pass batches, or None to draw probe_size samples")
        self.options, self.probe_size, self.probe_batch_size = options, probe_size, probe_batch_size
        self.probe_data, self.seed, self.loss_fn, self.mode, self.params = probe_data, seed, loss_fn, mode, params
        self.max_overhead, self.min_size, self.owner = max_overhead, min_size, owner
        self.fixed_cost = fixed_cost
        self._started = 0.0  # when training started (the automatic size is a share of the time since)
        self.batches: Batches | None = None
        self.size: int | None = None  # samples in the probe set once built (all ranks together)
        self.local_samples = 0  # this rank's share of them
        self.timing: dict[str, float] | None = None  # one timed product (``time_product``)
        self.check_seconds = 0.0  # the loss check at train start: one forward pass on the first probe batch
        self.warm_start: torch.Tensor | None = None
        self.draws = 0  # measurements made (successive traces draw fresh probes)
        self._loss: LossFn | None = None
        self._source: tuple[Any, Any, int] | None = None  # (dataset, collate_fn, training batch size)
        self._timing: Any = None  # a small prepared batch to time a product on
        self._small: Any = None  # a smaller one (a prefix of the same draw), for the fixed part of the cost

    # ---- set-up ------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> None:
        """Resolve the loss and check the parameter selection (fails before training, naming the argument)."""
        self._loss = resolve_loss_fn(pl_module, self.loss_fn, self.owner)
        op = HessianOperator(pl_module, self._loss, [], params=self.params)  # raises if nothing is selected
        if self.options.top_k > op.dim:
            raise ValueError(f"top_k={self.options.top_k} exceeds the {op.dim} selected parameters; lower top_k")
        if self.options.per_layer:
            try:
                block_slices(op, None)
            except ValueError as err:
                raise ValueError(f"per_layer=True: {err}; select whole layers in params (e.g. 'net.0', not "
                                 "'*.weight') or set per_layer=False") from None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, build: bool = True) -> None:
        """Find the samples to probe and check the loss on a few of them; build the probe set now (``build``)
        or later, at a size chosen then (``build(trainer, size)``)."""
        if self.probe_data is not None:
            self.batches = Batches(prepare_batch(trainer, b)
                                   for b in self.probe_data[trainer.global_rank :: trainer.world_size])
            self._timing = self.batches[0] if self.batches else None  # a rank may hold none (fewer than ranks)
        else:
            dataset, collate_fn = train_dataset_of(trainer)
            loader = trainer.train_dataloader
            batch_size = getattr(loader, "batch_size", None) if isinstance(loader, DataLoader) else None
            self._source = (dataset, collate_fn, batch_size)
            if self.probe_size is not None:
                draw_probe_indices(len(dataset), self.probe_size, self.seed)  # fails early if too large
            timing = self._collate(trainer, min(TIMING_SAMPLES, self.max_size()), TIMING_SAMPLES)
            self._timing = timing[0] if timing else None
            if self.fixed_cost:
                small = self._collate(trainer, min(SMALL_TIMING_SAMPLES, self.max_size()), SMALL_TIMING_SAMPLES)
                self._small = small[0] if small else None
        if self._timing is not None:  # the given batches, or the first samples of the probe set
            start = budget.now()
            with leave_no_trace(pl_module, self.mode):
                check_loss(self._loss, pl_module, self.batches or [self._timing], self.owner)
            self.check_seconds = budget.now() - start
        self._started = budget.now()
        if build and not self._sized_at_first_measure():
            if self.probe_data is None and self.probe_batch_size is None:
                self.time_product(pl_module)  # how large a probe batch may be (its graph's size)
            self.build(trainer, self.size)

    def _sized_at_first_measure(self) -> bool:
        return self.max_overhead is not None and self.probe_size is None and self.probe_data is None and not self.size

    def _size_and_build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the probe set at the largest size (a power of two from ``min_size`` to ``max_size()``) whose probe,
        predicted from one timed product, costs ``max_overhead`` of the training time so far (rank 0's choice)."""
        timing = self.time_product(pl_module)
        # priced at the timing batch's average cost per sample, which overstates a small model's product on a larger
        # set: ABS's probes grow dearer as its growing batches make epochs cheaper, and its figures use this rule
        average = dict(timing)
        for key in ("graph", "product"):
            fixed, per_sample = _fixed_and_per_sample(timing[key], timing["samples"])
            average.update({f"{key}_fixed": fixed, f"{key}_per_sample": per_sample})
        allowance = self.max_overhead * (budget.now() - self._started)
        size = self.affordable_size(allowance, WARM_PRODUCTS, trainer.world_size, self.min_size, average)
        self.build(trainer, trainer.strategy.broadcast(size, src=0))

    def max_size(self) -> int:
        """The most samples the probe set may hold: ``probe_size``, else 1,024 or the whole training set (not for
        ``probe_data``, which is probed as given)."""
        dataset = self._source[0]
        return self.probe_size if self.probe_size is not None else min(DEFAULT_PROBE_SIZE, len(dataset))

    def build(self, trainer: pl.Trainer, size: int | None = None) -> None:
        """Collate this rank's share of the probe set: ``size`` samples (default ``max_size()``); ``probe_data``
        is probed as given."""
        if self.probe_data is None:
            self.size = size if size is not None else self.max_size()
            batch_size = self.probe_batch_size or self.chunk_size()
            self.batches = Batches(self._collate(trainer, self.size, batch_size))
            if self._loss is cross_entropy_loss and self.batches:  # every probe label in range, not just the first's
                with leave_no_trace(trainer.lightning_module, self.mode):
                    check_loss(self._loss, trainer.lightning_module, self.batches, self.owner, say=False)
        self.local_samples = sum(sample_count(b) for b in self.batches)

    def _collate(self, trainer: pl.Trainer, size: int, batch_size: int) -> list[Any]:
        """This rank's share of ``size`` probe samples (the first ``size`` of one seeded permutation: a smaller
        probe set is a subset of a larger one), prepared as training batches are."""
        dataset, collate_fn, _ = self._source
        indices = draw_probe_indices(len(dataset), size, self.seed)
        batches = probe_batches(dataset, indices, batch_size, collate_fn, trainer.global_rank, trainer.world_size,
                                self.seed)
        return [prepare_batch(trainer, b) for b in batches]

    # ---- measuring ---------------------------------------------------------------------------------------

    def time_product(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Time building the first-order graph and one product on a few probe samples (and on fewer, for a drawn
        probe set), and size the graph: what a probe's cost and its batches' size are chosen from before the first
        probe (measured once, kept).

        Returns ``{"graph", "product", "seconds"}`` (seconds on the timing batch; ``seconds`` all the timing
        took), ``"samples"``, ``"bytes"`` (what the graph holds for backward), and the cost model ``predict``
        uses: ``"graph_fixed"``, ``"graph_per_sample"``, ``"product_fixed"``, ``"product_per_sample"``."""
        if self.timing is None:
            start = budget.now()
            with leave_no_trace(pl_module, self.mode):
                graph, product, size = self._time_on(pl_module, self._timing)
                # every rank times the smaller batch too (the products are all-reduced), with or without its share
                timed = self._source is not None and self.fixed_cost
                small = self._time_on(pl_module, self._small) if timed else None
            n = 0 if self._timing is None else sample_count(self._timing)
            n_small = 0 if self._small is None else sample_count(self._small)
            self.timing = {"graph": graph, "product": product, "seconds": budget.now() - start, "samples": n,
                           "bytes": size}
            for i, (key, big) in enumerate((("graph", graph), ("product", product))):
                fixed, per_sample = _fixed_and_per_sample(big, n, None if small is None else small[i], n_small)
                self.timing.update({f"{key}_fixed": fixed, f"{key}_per_sample": per_sample})
        return self.timing

    def _time_on(self, pl_module: pl.LightningModule, batch: Any) -> tuple[float, float, int]:
        """(graph seconds, product seconds, bytes the graph holds) of one product on ``batch`` (``None``: this rank
        holds none but takes part)."""
        op = HessianOperator(pl_module, self._loss, Batches([] if batch is None else [batch]), params=self.params,
                             cache_bytes=None)
        v = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
        v[0] = 1
        start = budget.now()
        op.matvec(v)
        built = budget.now()
        op.matvec(v)
        product = budget.now() - built
        return max(built - start - product, 0.0), product, op.cached_bytes

    def predict(self, local_samples: float, products: float, timing: dict[str, float] | None = None) -> float:
        """Seconds of a measurement of ``products`` products on ``local_samples`` of this rank's probe samples, from
        ``timing`` (default: this rank's ``time_product``): each probe batch's graph is built once, and again at
        every later product for the batches past ``cache_bytes()``."""
        t = timing if timing is not None else self.timing
        if self.batches is not None:
            batches = max(len(self.batches), 1)
        else:
            batches = max(math.ceil(local_samples / self.chunk_size()), 1)
        per_batch = local_samples / batches
        graph = t["graph_fixed"] + per_batch * t["graph_per_sample"]
        product = t["product_fixed"] + per_batch * t["product_per_sample"]
        batch_bytes = per_batch * t["bytes"] / max(t["samples"], 1)
        cached = min(batches, int(self.cache_bytes(t) // batch_bytes)) if batch_bytes > 0 else batches
        return batches * graph + products * batches * product + max(products - 1, 0) * (batches - cached) * graph

    def cache_bytes(self, timing: dict[str, float] | None = None) -> int:
        """What a measurement's cached graphs may hold: ``CACHE_STEPS`` training batches' graphs, or ``CHUNK_BYTES``
        if more (a small model's whole probe set), so a probe's memory stays a small multiple of a training
        step's; the operator's default where no graph was timed (a rank without probe samples)."""
        t = timing if timing is not None else self.timing
        if t is None or not t["samples"]:
            return DEFAULT_CACHE_BYTES
        step = (self._source[2] if self._source is not None and self._source[2] else t["samples"])
        return max(CHUNK_BYTES, int(CACHE_STEPS * step * t["bytes"] / t["samples"]))

    def affordable_size(self, seconds: float, products: float, world: int, min_size: int,
                        timing: dict[str, float] | None = None) -> int:
        """The largest probe set, a power of two from ``min_size`` or ``max_size()``, shared by ``world`` ranks, on
        which a measurement of ``products`` products is predicted to take at most ``seconds`` (else ``min_size``)."""
        largest = self.max_size()
        size = min(min_size, largest)
        while size * 2 <= largest and self.predict(size * 2 / world, products, timing) <= seconds:
            size *= 2
        if size < largest and self.predict(largest / world, products, timing) <= seconds:
            size = largest
        return size

    def chunk_size(self) -> int:
        """Samples per probe batch when ``probe_batch_size`` is not given: the training batch size, doubled while
        a batch's graph stays within ``CHUNK_BYTES`` (a small model's probe set goes in one batch, a large one's
        in training-sized ones: a product never holds much more than a training step)."""
        base = self._source[2] or TIMING_SAMPLES
        if self.timing is None or not self.timing["samples"]:
            return base
        per_sample = self.timing["bytes"] / self.timing["samples"]
        chunk = base
        while chunk * 2 <= self.max_size() and chunk * 2 * per_sample <= CHUNK_BYTES:
            chunk *= 2
        return chunk

    def measure(self, pl_module: pl.LightningModule, extras: bool = True,
                trace_max_samples: int | None = None, stop_above: float | None = None) -> SpectrumRecord:
        """Measure on the probe set (``extras=False``: the eigenvalues only; ``trace_max_samples`` lowers the
        trace's sample cap for this measurement; ``stop_above`` as in ``measure_spectrum``), warm-started from the
        last measurement's eigenvectors, and keep this one's for the next."""
        if self.batches is None and self._source is not None:  # sized now, from the training time so far
            self._size_and_build(pl_module.trainer, pl_module)
        if self.batches is None:
            if self.probe_data is None:
                raise ValueError("compute() outside a running Trainer needs probe_data= (the batches to probe)")
            self.batches = Batches(self.probe_data)
        if self._loss is None:
            self._loss = resolve_loss_fn(pl_module, self.loss_fn, self.owner)
            with leave_no_trace(pl_module, self.mode):
                check_loss(self._loss, pl_module, self.batches, self.owner)
        if self.timing is None:  # what the graph cache may hold is sized from one timed product (once)
            if self._timing is None and self.batches:
                self._timing = self.batches[0]
            self.time_product(pl_module)
        options = self.options if extras else replace(self.options, trace=False, per_layer=False, density=False)
        if trace_max_samples is not None and options.trace:
            cap = max(min(trace_max_samples, options.trace_max_samples), options.trace_min_samples, 2)
            options = replace(options, trace_max_samples=cap)
        with leave_no_trace(pl_module, self.mode):
            op = HessianOperator(pl_module, self._loss, self.batches, params=self.params,
                                 cache_bytes=self.cache_bytes())
            record = measure_spectrum(op, options, warm_start=self.warm_start, draw=self.draws, stop_above=stop_above)
        eig = record.eigen  # a run stopped early starts the next one a power step further on (ABS's early stop)
        self.warm_start = (eig.eigenvectors if eig.converged else eig.stepped_vectors).detach()
        self.draws += 1
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"warm_start": self.warm_start, "draws": self.draws, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warm_start = state.get("warm_start")
        self.draws = int(state.get("draws", 0))
        self.size = state.get("size")


def _fixed_and_per_sample(big: float, n: int, small: float | None = None, n_small: int = 0) -> tuple[float, float]:
    """A product's cost as ``fixed + per_sample * samples`` from its seconds on ``n`` and on ``n_small`` samples;
    the per-sample part stays at least ``MIN_SLOPE`` of the average on ``n`` (timing noise must not make a large
    probe set look free). One timing only: all of it per sample."""
    if small is None or not 0 < n_small < n:
        return 0.0, big / max(n, 1)
    per_sample = max((big - small) / (n - n_small), MIN_SLOPE * big / n)
    return max(big - per_sample * n, 0.0), per_sample
