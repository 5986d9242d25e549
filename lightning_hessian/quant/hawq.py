"""``HAWQModule``: Hessian-aware mixed-precision quantization-aware fine-tuning of any LightningModule.

HAWQ (V1-V3) in one Lightning wrapper: measure each layer's Hessian sensitivity on a fixed probe set,
choose per-layer bit widths by the exact multiple-choice knapsack under size/BOPS budgets, swap in
quantized layers, and fine-tune with the wrapped module's own steps (optionally distilling from the float
model). The swap happens in ``configure_model``, so under DDP every rank quantizes its copy before the
model is wrapped; the bit configuration travels in the checkpoint as plain Python values, so
``trainer.test(HAWQModule(float_module), ckpt_path=...)`` rebuilds the same quantized network.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn
from torchmetrics import Metric

from lightning_hessian.distributed import is_distributed
from lightning_hessian.hessian import Batches
from lightning_hessian.modes import training_mode
from lightning_hessian.no_trace import leave_no_trace
from lightning_hessian.probe_set import (
    LossFn,
    check_loss,
    defines_forward,
    draw_probe_indices,
    first_line,
    prepare_batch,
    probe_batches,
    resolve_loss_fn,
    train_dataset_of,
)
from lightning_hessian.quant.allocation import InfeasibleBudgetError, allocate_bits, pareto_frontier
from lightning_hessian.quant.attention import unpack_attention
from lightning_hessian.quant.costs import LayerStats, bops_costs, budget_between, layer_stats, size_costs
from lightning_hessian.quant.distill import batchnorm_layers, distill_data
from lightning_hessian.quant.hawq_options import (
    FLAT_KEYS,
    FineTuneOptions,
    ProbeOptions,
    QuantizationOptions,
    SensitivityOptions,
    check_combination,
    merge_options,
)
from lightning_hessian.quant.layers import calibrate as calibrate_ranges
from lightning_hessian.quant.quantizers import (
    FOLLOW,
    ActivationQuantizer,
    validate_act_bits,
    validate_bits,
)
from lightning_hessian.quant.report import BitReport, Frontier, bit_report, frontier_of
from lightning_hessian.quant.sensitivity import Sensitivity, layer_sensitivity
from lightning_hessian.quant.swap import quantizable_layers, quantize_model, resolve_groups

# The wrapped module's hooks that run unchanged inside a HAWQModule (logging to this run). Only those it overrides are
# bound, so Lightning's is_overridden checks (which loops run, which data hooks apply) answer as for the module itself.
_DELEGATED_HOOKS = (
    "prepare_data", "setup", "teardown", "configure_callbacks",
    "train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader",
    "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
    "validation_step", "test_step", "predict_step",
    "on_fit_end", "on_train_start", "on_train_end", "on_validation_end", "on_test_end", "on_predict_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_validation_epoch_start", "on_validation_epoch_end",
    "on_test_epoch_start", "on_test_epoch_end", "on_predict_epoch_start", "on_predict_epoch_end",
    "on_train_batch_start", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
    "on_validation_model_zero_grad", "on_validation_model_eval", "on_validation_model_train",
    "on_test_model_eval", "on_test_model_train", "on_predict_model_eval",
    "on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "configure_gradient_clipping", "optimizer_step", "optimizer_zero_grad", "lr_scheduler_step",
)
_FOLLOW_CODE = -1  # act_bits="follow" in the hawq_bits buffer (0 there means "not quantized")


class _HAWQ:
    """What ``HAWQModule`` does, on the ``LightningModule`` of either Lightning package (see ``HAWQModule``)."""

    def __init__(
        self,
        module: LightningModule | str | os.PathLike,
        module_class: type[LightningModule] | Callable[[str], LightningModule] | None = None,
        *,
        probe: ProbeOptions | None = None,
        sensitivity: SensitivityOptions | None = None,
        quantization: QuantizationOptions | None = None,
        finetune: FineTuneOptions | None = None,
        bits: int | Mapping[str, int] | None = None,
        budgets: Mapping[str, float] | None = None,
        bit_choices: Sequence[int] | None = None,
        act_bits: int | str | None = None,
        ties: Iterable[Iterable[str]] | None = None,
        metric: str | None = None,
        probe_data: Iterable[Any] | None = None,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        seed: int | None = None,
        trace_rel_tol: float | None = None,
        max_samples: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        loss_fn: LossFn | None = None,
        example_input: Any = None,
        momentum: float | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        distill_weight: float | None = None,
        temperature: float | None = None,
        solver: str | None = None,
        report_dir: str | os.PathLike | None = None,
        calibration: str | None = None,
        input_shape: Sequence[int] | None = None,
        distill: Mapping[str, Any] | None = None,
        groups: Any = None,
    ):
        flat = {name: value for name, value in locals().items() if name in FLAT_KEYS}
        options = merge_options(flat, {"probe": probe, "sensitivity": sensitivity, "quantization": quantization,
                                       "finetune": finetune})
        p, s, q, f = (options[name] for name in ("probe", "sensitivity", "quantization", "finetune"))
        check_combination(s, q)
        super().__init__()
        module = unpack_attention(_load_module(module, module_class))  # a copy if it holds nn.MultiheadAttention
        self.layers = quantizable_layers(module)
        if not self.layers:
            raise ValueError(
                f"module {type(module).__name__} has no quantizable layer (nn.Conv1d, nn.Conv2d, nn.Linear or "
                "nn.Embedding): nothing to quantize"
            )
        self.weight_groups, per_channel = resolve_groups(
            q.groups, {name: module.get_submodule(name).weight for name in self.layers})
        if per_channel:
            rank_zero_warn(f"HAWQModule: groups={q.groups!r} does not tile {sorted(per_channel)}, which keep "
                           "per-channel scales")
        self.fixed_bits = None if q.bits is None else self._check_bits(q.bits)
        self.budgets, self.bit_choices, self.act_bits = q.budgets, q.bit_choices, q.act_bits
        self.ties = self._check_ties(q.ties)
        if f.distill_weight > 0 and not defines_forward(module):
            raise ValueError(f"distill_weight > 0 distils the logits of {type(module).__name__}.forward, which it does "
                             "not define: pass distill_weight=0")
        if f.distill_weight > 0 and not module.automatic_optimization:
            raise ValueError("distill_weight > 0 adds the distillation term to the loss training_step returns, but "
                             f"{type(module).__name__} optimizes manually (automatic_optimization=False): pass "
                             "distill_weight=0")
        if p.calibration == "distilled" and not batchnorm_layers(module):
            raise ValueError(f"calibration='distilled' distils inputs from BatchNorm statistics, but "
                             f"{type(module).__name__} has no BatchNorm layer with running statistics; use "
                             "calibration='data' (probe_data= or the training data)")
        self.metric, self.seed, self.solver, self.momentum = s.metric, p.seed, q.solver, q.momentum
        self.probe_data, self.probe_size, self.probe_batch_size = p.probe_data, p.probe_size, p.probe_batch_size
        self.trace_rel_tol, self.max_samples = s.trace_rel_tol, s.max_samples
        self.cache_dir, self.report_dir = s.cache_dir, q.report_dir
        self.loss_fn, self.example_input, self.optimizer_factory = p.loss_fn, p.example_input, f.optimizer
        self.distill_weight, self.temperature = f.distill_weight, f.temperature
        self.calibration, self.input_shape, self.distill_options = p.calibration, p.input_shape, p.distill
        self.save_hyperparameters({
            "bits": q.bits, "budgets": self.budgets, "bit_choices": self.bit_choices, "act_bits": self.act_bits,
            "ties": [list(g) for g in self.ties], "metric": self.metric, "probe_size": self.probe_size,
            "probe_batch_size": self.probe_batch_size, "seed": self.seed, "trace_rel_tol": self.trace_rel_tol,
            "max_samples": self.max_samples, "momentum": self.momentum, "distill_weight": self.distill_weight,
            "temperature": self.temperature, "solver": self.solver,
            "groups": {name: {"rows": g.rows, "columns": g.columns} for name, g in self.weight_groups.items()},
        })
        self.module = module
        for hook in _DELEGATED_HOOKS:  # the wrapped module's own hooks, unless a subclass of this one has its own
            if is_overridden(hook, module, _lightning_base(module)) and not is_overridden(hook, self,
                                                                                          _lightning_base(self)):
                delegate = partial(self._delegate, hook)
                # the wrapped hook's parameters (e.g. a step without batch_idx) behind a "self", which Lightning's
                # signature check skips as it does for a method
                own = inspect.signature(getattr(module, hook)).parameters.values()
                this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
                delegate.__signature__ = inspect.Signature([this, *own])
                setattr(self, hook, delegate)
        object.__setattr__(self, "float_module", module)  # what every quantization copies: not a submodule, not saved
        # Weight bits per layer (0: float) and the activation bits (-1: "follow"), so a state dict rebuilds its
        # own network.
        self.register_buffer("hawq_bits", torch.zeros(len(self.layers) + 1, dtype=torch.int64))
        self.weight_bits: dict[str, int] | None = None
        self.sensitivity: Sensitivity | None = None
        self.stats: dict[str, LayerStats] | None = None
        self._quantized_with: tuple | None = None
        self._reported: dict[str, int] | None = None  # the bits the written report shows
        self._teacher: nn.Module | None = None  # the distillation teacher (not a submodule: not trained or saved)
        self._distilled: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------------ checks
    def _check_bits(self, bits: int | Mapping[str, int]) -> int | dict[str, int]:
        if not isinstance(bits, Mapping):
            return validate_bits(bits, "bits")
        unknown = [name for name in bits if name not in self.layers]
        if unknown:
            raise ValueError(f"bits names unknown layers {unknown}; the quantizable layers are {self.layers}")
        return {name: validate_bits(b, f"bits[{name!r}]") for name, b in bits.items()}

    def _check_ties(self, ties: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        for group in ties:
            unknown = [name for name in group if name not in self.layers]
            if unknown:
                raise ValueError(f"ties: unknown layer names {unknown}; the quantizable layers are {self.layers}")
        return ties

    # ---------------------------------------------------------------------------------------- planning
    def measure_sensitivity(self, batches: Any) -> Sensitivity:
        """Hessian sensitivity of the float module's quantizable layers on ``batches`` (eval mode)."""
        model = self.float_module
        loss = resolve_loss_fn(model, self.loss_fn, "HAWQModule")
        batches = batches if isinstance(batches, Sequence) else Batches(batches)
        with leave_no_trace(model, "eval"):
            if batches:  # under DDP a rank may hold none (it still joins the products)
                check_loss(loss, model, batches, "HAWQModule")
            self.sensitivity = layer_sensitivity(
                model, loss, batches, self.layers, self.bit_choices, metrics=(self.metric,),
                rel_tol=self.trace_rel_tol, max_samples=self.max_samples, act_momentum=self.momentum, seed=self.seed,
                cache_dir=self.cache_dir, groups=self.weight_groups,
            )
        if self.metric == "qbert" and len(batches) < 2:
            rank_zero_warn("HAWQModule: metric='qbert' takes the spread of each layer's top eigenvalue over the probe "
                           f"batches, but there is {len(batches)}: its std is 0; pass probe_batch_size < probe_size")
        omega = self.sensitivity.omega(self.metric)
        if all(value == 0 for table in omega.values() for value in table.values()):
            raise ValueError(f"HAWQModule: every layer's Hessian sensitivity ({self.metric}) is 0 on the probe set: "
                             "the loss does not change with the quantizable layers' weights (detached, or constant?), "
                             "so it cannot rank them; pass a loss_fn that the layers compute")
        negative = sorted({name for name, table in omega.items() for value in table.values() if value < 0})
        if negative:
            rank_zero_warn(f"HAWQModule: negative Hessian sensitivity ({self.metric}) for layers {negative}: the "
                           "module is not at a minimum of the loss (train it further), so it is not meaningful")
        note = self._not_converged()
        if note is not None:
            rank_zero_warn(f"HAWQModule: {note}; the plan rests on noisy sensitivities")
        return self.sensitivity

    def measure_costs(self, example_input: Any) -> dict[str, dict[str, dict[int, float]]]:
        """``{"size": bits, "bops": per-sample bit operations}`` tables of the layers for ``bit_choices`` (and, with
        ``distill_weight > 0``, a check that the forward returns logits).

        The MACs come from one pass of ``example_input`` through the module's ``forward``; a module without
        ``forward`` runs its loss instead, on ``example_input`` taken as a batch.
        """
        model = self.float_module
        device = next(model.parameters()).device
        run = None if defines_forward(model) else resolve_loss_fn(model, self.loss_fn, "HAWQModule")
        outputs = []
        handle = model.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            self.stats = layer_stats(model, move_data_to_device(example_input, device), self.layers, run)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            what = f"the loss of {type(model).__name__}" if run else f"{type(model).__name__}.forward"
            raise ValueError(f"HAWQModule: the layer costs ran example_input through {what}, which failed "
                             f"({type(err).__name__}: {first_line(err)}); pass example_input= (an input that "
                             f"{type(model).__name__}.forward takes; a batch for the loss if there is no forward)"
                             ) from err
        finally:
            handle.remove()
        if self.distill_weight > 0:
            self._check_logits(outputs[-1] if outputs else None)
        return {
            "size": size_costs(self.stats, self.bit_choices),
            "bops": bops_costs(self.stats, self.bit_choices, self._bops_act_bits),
        }

    def resolve_budgets(self, costs: Mapping[str, Mapping[str, Mapping[int, float]]]) -> dict[str, float]:
        """Absolute budgets: fractions in ``[0, 1]`` turned into HAWQ-V3 budgets between the extreme widths."""
        lo, hi = self.bit_choices[0], self.bit_choices[-1]
        return {r: budget_between(costs[r], v, lo, hi) if v <= 1 else float(v) for r, v in (self.budgets or {}).items()}

    def plan(self, batches: Any, example_input: Any = None) -> dict[str, int]:
        """Measure costs and sensitivities on ``batches`` and solve for the bits within ``budgets``.

        The costs come first and the budgets are checked on them alone, so a configuration error (no
        ``example_input`` for dict batches, budgets no allocation meets) costs no Hessian.
        """
        if self.budgets is None:
            raise ValueError("plan() needs budgets=, e.g. HAWQModule(module, budgets={'size': 0.5})")
        costs = self.measure_costs(example_input if example_input is not None else self._example_of(batches))
        budgets = self.resolve_budgets(costs)
        self._allocate({name: dict.fromkeys(self.bit_choices, 0.0) for name in costs["size"]}, costs, budgets)
        return self._allocate(self.measure_sensitivity(batches).omega(self.metric), costs, budgets)

    def quantize(self, bits: int | Mapping[str, int]) -> nn.Module:
        """Replace ``self.module`` by a quantized copy of the float module with these weight bits."""
        bits = self._check_bits(bits)
        # isolate_rng: initialising the quantized layers must not shift the training RNG stream
        with warnings.catch_warnings(), isolate_rng():
            warnings.filterwarnings("ignore", message="quantize_model: ")  # reported below, once (rank 0)
            qmodule, report = quantize_model(self.float_module, bits, self.act_bits, self.momentum, ignore=(Metric,),
                                             groups=self._groups_of(bits))
        if report.float_layers:  # layers with weights only: activations in float are expected in fake quantization
            listed = "; ".join(f"{n} ({why})" for n, why in report.float_layers.items())
            rank_zero_warn(f"HAWQModule: {len(report.float_layers)} layer(s) with weights left in float: {listed}")
        if self._trainer is not None:  # the deep copy left the Trainer behind; the wrapped forward may read it
            qmodule.trainer = self._trainer
        self.module = qmodule
        self.weight_bits = dict(report.weight_bits)
        self._quantized_with = (self.weight_bits, self.act_bits, self.momentum)
        codes = [self.weight_bits.get(name, 0) for name in self.layers]
        codes.append(_FOLLOW_CODE if self.act_bits == FOLLOW else self.act_bits)
        self.hawq_bits.copy_(torch.tensor(codes, dtype=torch.int64))
        return qmodule

    def _groups_of(self, bits: int | Mapping[str, int]) -> dict[str, Any] | None:
        """The group-wise layers among those ``bits`` quantizes."""
        groups = {name: g for name, g in self.weight_groups.items() if not isinstance(bits, Mapping) or name in bits}
        return groups or None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a HAWQModule state dict, first re-quantizing to the bits it was saved with."""
        codes = state_dict.get("hawq_bits")
        if codes is not None and int(codes[-1]) != 0:
            codes = [int(c) for c in codes]
            if len(codes) != len(self.layers) + 1:
                raise ValueError(f"the state dict holds bits for {len(codes) - 1} layers but the module has "
                                 f"{len(self.layers)} quantizable layers: a different architecture")
            self.act_bits = FOLLOW if codes[-1] == _FOLLOW_CODE else codes[-1]
            bits = {name: b for name, b in zip(self.layers, codes) if b > 0}
            if self._quantized_with != (bits, self.act_bits, self.momentum):
                self.quantize(bits)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def calibrate(self, batches: Iterable[Any]) -> None:
        """Activation ranges from ``batches`` run through the loss (quantizers alone in training mode), all-reduced
        over ranks."""
        device = next(self.module.parameters()).device
        batches = (move_data_to_device(batch, device) for batch in batches)
        calibrate_ranges(self.module, batches, resolve_loss_fn(self.module, self.loss_fn, "HAWQModule"))
        if is_distributed():
            for q in self.module.modules():
                if isinstance(q, ActivationQuantizer):
                    q.merge_ranks()

    def bit_report(self) -> BitReport:
        """Per-layer bits, sensitivity, size and BOPS against float (needs ``measure_costs`` to have run)."""
        if self.stats is None or self.weight_bits is None:
            raise RuntimeError("bit_report() needs a quantized module and its layer costs (run configure_model)")
        return bit_report(self.stats, self.weight_bits, self.sensitivity, self._bops_act_bits, self.metric,
                          self._frontier())

    def _frontier(self) -> Frontier | None:
        """The exact Pareto frontier of the first budgeted resource (the others within their budgets) with the plan
        on it, for the report; ``None`` without a planned allocation of the measured metric's bit widths."""
        s, bits = self.sensitivity, self.weight_bits
        if self.budgets is None or s is None or self.metric not in s.metrics or bits is None:
            return None
        omega = s.omega(self.metric)
        if set(omega) != set(bits) or any(bits[name] not in table for name, table in omega.items()):
            return None  # a checkpoint's bits from other candidates than this run's
        costs = {"size": size_costs(self.stats, self.bit_choices),
                 "bops": bops_costs(self.stats, self.bit_choices, self._bops_act_bits)}
        budgets = self.resolve_budgets(costs)
        resource = next(iter(budgets))
        fixed = {r: b for r, b in budgets.items() if r != resource}
        try:
            points = pareto_frontier(omega, costs, resource, "all", budgets=fixed, ties=self.ties)
        except ValueError as err:  # too many partial allocations, or budgets no allocation meets
            rank_zero_warn(f"HAWQModule: the report has no Pareto frontier ({err})")
            return None
        return frontier_of(points, resource, costs[resource], omega, bits, fixed)

    # --------------------------------------------------------------------------------- Lightning hooks
    def configure_model(self) -> None:
        """Quantize before the strategy wraps the model (fixed bits, or a plan on the probe set), calibrate the
        activation ranges on the probe set, measure the costs and write the report. The wrapped module's own
        ``configure_model`` runs first, so the quantized copy has what it builds.

        A module without ``bits``/``budgets``, and a planned one without a Trainer (``load_from_checkpoint``)
        or outside ``fit`` without ``probe_data``, waits for a checkpoint: ``on_load_checkpoint`` brings the bits.
        Fixed bits there are quantized at once and calibrated when evaluation starts, unless a checkpoint brings
        the ranges. A later ``fit`` completes what an evaluation left out (calibration, costs, report). A ``fit``
        resumed with ``ckpt_path`` still plans here (Lightning reads the checkpoint after this hook; a
        ``cache_dir`` makes that free), then takes the checkpoint's bits and ranges and rewrites the report.
        """
        if is_overridden("configure_model", self.float_module, _lightning_base(self.float_module)):
            self._delegate("configure_model")
        if self.fixed_bits is None and self.budgets is None:
            return
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if trainer is None or not (fitting or self.probe_data is not None or self.calibration == "distilled"):
            if self.weight_bits is None and self.fixed_bits is not None:
                self.quantize(self.fixed_bits)
            return
        if self.weight_bits is not None and self.stats is not None:
            return
        batches = self._probe_batches()
        if self.weight_bits is None and self.budgets is not None:
            self.float_module.to(trainer.strategy.root_device)
        if batches:  # once, before any plan, cost or calibration rests on the loss
            self._check_loss(batches)
        if self.weight_bits is None and self.budgets is not None:
            self.quantize(trainer.strategy.broadcast(self.plan(batches, self._example_of(batches)), src=0))
        elif self.weight_bits is None:
            self.quantize(self.fixed_bits)
        if self.stats is None:
            self.measure_costs(self._example_of(batches))
        if not self._calibrated():
            self.calibrate(batches)
        self._write_report()

    def _write_report(self) -> None:
        """The bit report on rank 0; the bits it shows are kept, so on_fit_start can tell a checkpoint changed them."""
        self._reported = self.weight_bits
        if self.trainer.is_global_zero:
            folder = self.report_dir if self.report_dir is not None else Path(self.trainer.default_root_dir) / "hawq"
            table, _ = self.bit_report().save(folder)
            note = self._not_converged()
            if note is not None:
                table.write_text(f"{table.read_text()}\n**Sensitivity not converged**: {note}.\n")

    def _example_of(self, batches: list[Any]) -> Any:
        """``example_input``, else one from the probe batches (a rank may hold none: then the first given one); for a
        module without ``forward``, the first probe batch itself (its costs run the loss)."""
        if self.example_input is not None:
            return self.example_input
        batches = batches or [prepare_batch(self.trainer, next(iter(self.probe_data)))]
        return self._example(batches) if defines_forward(self.float_module) else batches[0]

    def _check_loss(self, batches: Sequence[Any]) -> None:
        """:func:`~lightning_hessian.probe_set.check_loss` on the float module, where it is."""
        model = self.float_module
        device = next(model.parameters()).device
        with leave_no_trace(model, "eval"):
            check_loss(resolve_loss_fn(model, self.loss_fn, "HAWQModule"), model,
                       Batches(move_data_to_device(batch, device) for batch in batches), "HAWQModule")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hawq"] = {
            "bits": dict(self.weight_bits or {}),
            "act_bits": self.act_bits,
            "momentum": self.momentum,
            "sensitivity": self.sensitivity.to_dict() if self.sensitivity is not None else None,
        }
        self._delegate("on_save_checkpoint", checkpoint)  # the wrapped module's extra state (its keys unprefixed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("hawq")
        if state is None:
            raise ValueError("the checkpoint has no 'hawq' entry: it was not saved from a HAWQModule")
        bits = {str(k): int(v) for k, v in state["bits"].items()}
        fixed = self.fixed_bits
        if fixed is not None and (fixed if isinstance(fixed, dict) else dict.fromkeys(self.layers, fixed)) != bits:
            rank_zero_warn(f"HAWQModule: the checkpoint's bits {bits} replace bits={self.fixed_bits}")
        elif self.budgets is not None and self.weight_bits is not None and self.weight_bits != bits:
            rank_zero_warn(f"HAWQModule: the checkpoint's bits {bits} replace this run's plan {self.weight_bits}")
        self.act_bits, self.momentum = validate_act_bits(state["act_bits"], "checkpoint act_bits"), state["momentum"]
        if state.get("sensitivity") is not None:
            self.sensitivity = Sensitivity.from_dict(state["sensitivity"])
        if bits and self._quantized_with != (bits, self.act_bits, self.momentum):
            self.quantize(bits)  # before the wrapped hook restores its state onto the module that stays
        self._delegate("on_load_checkpoint", checkpoint)

    def on_fit_start(self) -> None:
        self._require_quantized()
        if self._reported is not None and self._reported != self.weight_bits:  # a resumed fit took the checkpoint's
            self._write_report()  # bits after configure_model reported its plan
        self._teacher = None  # built at the first step, on this run's device and in its precision
        self._delegate("on_fit_start")

    def on_validation_start(self) -> None:
        self._require_calibrated()
        self._delegate("on_validation_start")

    def on_test_start(self) -> None:
        self._require_calibrated()
        self._delegate("on_test_start")

    def on_predict_start(self) -> None:
        self._require_calibrated()
        self._delegate("on_predict_start")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        # Lightning passes batch_idx only to a step that takes it: so does this one
        args = (batch, batch_idx) if is_param_in_hook_signature(self.module.training_step, "batch_idx", min_args=2) \
            else (batch,)
        if self.distill_weight == 0:
            return self._delegate("training_step", *args)
        calls = []
        handle = self.module.register_forward_hook(
            lambda module, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True
        )
        try:
            out = self._delegate("training_step", *args)
        finally:
            handle.remove()
        if out is None:  # the wrapped step skips this batch
            return None
        if not calls:
            raise RuntimeError("distill_weight > 0 needs the wrapped training_step to compute its logits with "
                               "self(...) (the module's forward), so the float teacher sees the same input")
        args, kwargs, student = calls[-1]
        self._check_logits(student)
        with torch.no_grad():
            teacher = self._teacher_module()(*args, **kwargs)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="batchmean") * t * t
        self.log("train/distill_kl", kl, on_step=True, on_epoch=True)
        task = out["loss"] if isinstance(out, Mapping) else out
        loss = (1 - self.distill_weight) * task + self.distill_weight * kl
        return {**out, "loss": loss} if isinstance(out, Mapping) else loss

    def hessian_loss(self, batch: Any) -> torch.Tensor:
        """The Hessian loss of the quantized network: ``loss_fn``, else the wrapped module's ``hessian_loss``, else
        cross-entropy on ``(x, y)`` batches."""
        return resolve_loss_fn(self.module, self.loss_fn, "HAWQModule")(self.module, batch)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self.module.parameters())
        return self._delegate("configure_optimizers")

    @property
    def automatic_optimization(self) -> bool:
        """The wrapped module's: a manually optimized ``training_step`` steps this run's optimizers itself."""
        return self.module.automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.module.automatic_optimization = value

    # ------------------------------------------------------------------------------------- data-free (ZeroQ)
    def distilled_batches(self, device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The distilled probe set of ``calibration="distilled"``: ``probe_size`` inputs whose BatchNorm statistics
        match the float module's, as ``(x, y)`` batches of ``probe_batch_size`` with ``y`` the float module's
        predicted class; distilled once (on ``device``, default the module's) and kept. Under DDP every rank
        distils the whole set (the same for every rank) and takes its share of the batches."""
        if self._distilled is None:
            model = self.float_module
            home = next(model.parameters()).device
            try:
                x = distill_data(model, self.input_shape, self.probe_size, seed=self.seed,
                                 device=device if device is not None else home, **self.distill_options)
                with torch.no_grad(), training_mode(model, False):
                    logits = model(x.to(home))
            except NotImplementedError as err:  # nn.Module's forward
                raise ValueError(f"calibration='distilled' runs {type(model).__name__}'s forward on distilled inputs, "
                                 "but it has none: give it a forward(x) that returns the logits") from err
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError(f"calibration='distilled' labels the distilled inputs with the module's predicted "
                                 f"class, but its forward returns {type(logits).__name__} "
                                 f"{tuple(getattr(logits, 'shape', ()))}, not (batch, classes) logits")
            labels = logits.argmax(-1).to(x.device)
            self._distilled = list(zip(x.split(self.probe_batch_size), labels.split(self.probe_batch_size)))
        return self._distilled

    def prepare_data_free(self, device: torch.device | str | None = None) -> dict[str, int]:
        """Quantize with no Trainer and no data (ZeroQ, ``calibration="distilled"``): distil the probe set, plan
        the bits within ``budgets`` (or take ``bits``), quantize, measure the costs and calibrate the activation
        ranges on the distilled batches; ``report_dir``, if given, receives the report. Returns the weight bits;
        ``trainer.test(self, ...)`` then evaluates the quantized module as it is."""
        if self.calibration != "distilled":
            raise ValueError("prepare_data_free() quantizes on distilled data: construct the HAWQModule with "
                             "calibration='distilled'")
        if self.fixed_bits is None and self.budgets is None:
            raise ValueError("prepare_data_free() needs bits= (a fixed configuration) or budgets= (a plan)")
        if device is not None:
            self.float_module.to(device)
        batches = self.distilled_batches(device)
        example = self._example_of(batches)
        self.quantize(self.plan(batches, example) if self.budgets is not None else self.fixed_bits)
        self.module.to(batches[0][0].device)
        if self.stats is None:
            self.measure_costs(example)
        self.calibrate(batches)
        if self.report_dir is not None:
            self.bit_report().save(self.report_dir)
        return dict(self.weight_bits)

    # ------------------------------------------------------------------------------------------ internals
    @property
    def _bops_act_bits(self) -> int | None:
        """Activation bits for the BOPS tables: ``None`` pairs each layer's weight bits with the same width."""
        return None if self.act_bits == FOLLOW else self.act_bits

    def _delegate(self, hook: str, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module's hook as Lightning would: its ``self.log``, ``self.optimizers()`` and
        ``manual_backward`` act on this run."""
        self.module.trainer = self._trainer
        self.module._current_fx_name = self._current_fx_name
        return getattr(self.module, hook)(*args, **kwargs)

    def _require_quantized(self) -> None:
        if self.weight_bits is None:
            raise RuntimeError(
                "HAWQModule has no bit configuration: pass bits= or budgets= and fit, or test/validate with "
                "ckpt_path= pointing at a HAWQModule checkpoint"
            )

    def _allocate(self, omega: Mapping[str, Mapping[int, float]], costs: Mapping[str, Any],
                  budgets: Mapping[str, float]) -> dict[str, int]:
        try:
            return allocate_bits(omega, costs, budgets, self.ties, self.solver)
        except InfeasibleBudgetError as err:
            raise InfeasibleBudgetError(f"HAWQModule budgets={self.budgets}: {err}", err.minimums, err.budgets) from err

    def _teacher_module(self) -> nn.Module:
        """A frozen copy of the float module on this module's device and in the run's precision ("64-true"
        converts the student and its inputs); the user's module stays as it is."""
        if self._teacher is None:
            teacher = copy.deepcopy(self.float_module).to(self.device).eval().requires_grad_(False)
            if self._trainer is not None:
                teacher = self._trainer.precision_plugin.convert_module(teacher)
            object.__setattr__(self, "_teacher", teacher)
        return self._teacher

    def _check_logits(self, output: Any) -> None:
        if self.distill_weight > 0 and not isinstance(output, torch.Tensor):
            raise ValueError(f"distill_weight={self.distill_weight} distils the logits the module's forward returns, "
                             f"but {type(self.float_module).__name__}.forward returns a {type(output).__name__}: make "
                             "it return the logits tensor, or pass distill_weight=0")

    def _not_converged(self) -> str | None:
        """What did not converge in the sensitivity measurement, and the knobs; ``None`` if all did."""
        s = self.sensitivity
        if s is None or s.converged:
            return None
        if not s.trace:
            return "the layers' top eigenvalues (Lanczos) did not converge"
        worst = max((s.trace_std_error[name] / abs(t) for name, t in s.trace.items() if t), default=math.inf)
        return (f"the Hutchinson traces did not converge: after {s.num_samples} probes (max_samples="
                f"{self.max_samples}) the worst layer's relative standard error is {worst:.1%} > trace_rel_tol="
                f"{self.trace_rel_tol}; raise max_samples, or loosen trace_rel_tol")

    def _calibrated(self) -> bool:
        """Whether the activation quantizers (if any) have ranges (from calibration, training or a checkpoint)."""
        quantizers = [q for q in self.module.modules() if isinstance(q, ActivationQuantizer)]
        return not quantizers or any(bool(q.calibrated) for q in quantizers)

    def _require_calibrated(self) -> None:
        """Evaluate only with activation ranges: calibrate on the probe set if nothing brought them."""
        self._require_quantized()
        if self._calibrated():
            return
        with torch.inference_mode(False):  # the evaluation loop's mode: the ranges must stay usable in training
            try:
                batches = self._probe_batches(convert_input=True)
            except Exception as err:  # no (usable) train loader: either Lightning package's MisconfigurationException
                if not isinstance(err, (TypeError, ValueError)) and type(err).__name__ != "MisconfigurationException":
                    raise
                raise RuntimeError(
                    "HAWQModule: the activation quantizers have no ranges and there is no training data to calibrate "
                    f"them on ({type(err).__name__}: {err}); pass probe_data= (a few training batches) or evaluate a "
                    "HAWQModule checkpoint with ckpt_path="
                ) from err
            rank_zero_info(f"HAWQModule: calibrating the activation ranges on {len(batches)} probe batch(es)")
            self.calibrate(batches)

    def _probe_batches(self, convert_input: bool = False) -> list[Any]:
        """This rank's share of ``probe_data`` or of ``probe_size`` training samples, as the training loop would
        hand them over (batch-transfer hooks, device; the precision plugin's conversion with ``convert_input``)."""
        trainer = self.trainer
        if self.calibration == "distilled":  # model inputs already: no batch-transfer hooks
            batches = self.distilled_batches(trainer.strategy.root_device)[trainer.global_rank :: trainer.world_size]
            if convert_input:
                batches = [trainer.precision_plugin.convert_input(batch) for batch in batches]
            return Batches(batches)
        if self.probe_data is not None:
            batches = list(self.probe_data)
            if not batches:
                raise ValueError("probe_data holds no batches")
            batches = batches[trainer.global_rank :: trainer.world_size]
        else:
            dataset, collate = train_dataset_of(trainer)
            indices = draw_probe_indices(len(dataset), min(self.probe_size, len(dataset)), self.seed)
            batches = probe_batches(dataset, indices, self.probe_batch_size, collate, trainer.global_rank,
                                    trainer.world_size, self.seed)
        return Batches(prepare_batch(trainer, batch, convert_input=convert_input) for batch in batches)

    @staticmethod
    def _example(batches: Sequence[Any]) -> Any:
        """The module's input in the first probe batch: the batch if it is a tensor (or a dict: keyword
        arguments), else its first item."""
        first = batches[0]
        if isinstance(first, (torch.Tensor, Mapping)):
            return first
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
            return first[0]
        raise ValueError("HAWQModule cannot tell the module's input in the probe batches (not a tensor, a dict or an "
                         "(x, ...) tuple): pass example_input=")



class _HAWQType(type):
    """Builds a ``HAWQModule`` on the Lightning package of the module it wraps; ``isinstance(x, HAWQModule)`` holds
    for either. (A metaclass rather than ``__new__``, whose signature LightningCLI would read instead of
    ``__init__``'s.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        module = args[0] if args else kwargs.get("module")
        if isinstance(module, (str, os.PathLike)):  # a checkpoint: its module_class tells the package
            module = kwargs.get("module_class", args[1] if len(args) > 1 else None)
        if cls is HAWQModule and _lightning_base(module) is not LightningModule:  # a pytorch_lightning module
            return _pytorch_lightning_hawq()(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return super().__instancecheck__(instance) or (cls is HAWQModule and isinstance(instance, _HAWQ))


class HAWQModule(_HAWQ, LightningModule, metaclass=_HAWQType):
    """Quantize a trained LightningModule to mixed precision chosen from Hessian sensitivity, then fine-tune.

    The settings come in four groups (:mod:`~lightning_hessian.quant.hawq_options`), each checked when it is built:
    ``probe=ProbeOptions(...)`` (what is measured on: the probe set, the loss), ``sensitivity=SensitivityOptions(...)``
    (how), ``quantization=QuantizationOptions(...)`` (fixed bits or budgets, activation bits, weight groups) and
    ``finetune=FineTuneOptions(...)``. Every field is also a flat keyword of the same name (``bits=``, ``metric=``:
    the ``hawq`` keys of ``conf/quantize.yaml``), documented below with its default; a flat keyword left at ``None``
    takes its group's value. A setting given both ways must agree, else the error names both.

    Args:
        module: the trained float LightningModule, or a checkpoint path loaded with ``module_class``.
        module_class: a LightningModule class (``module_class.load_from_checkpoint(module)``) or any
            callable ``path -> LightningModule`` (e.g. a ``functools.partial`` passing ``net=``).
        probe: :class:`~lightning_hessian.quant.hawq_options.ProbeOptions`: ``calibration``, ``probe_data``,
            ``probe_size``, ``probe_batch_size``, ``seed``, ``loss_fn``, ``example_input``, ``input_shape``,
            ``distill``.
        sensitivity: :class:`~lightning_hessian.quant.hawq_options.SensitivityOptions`: ``metric``,
            ``trace_rel_tol``, ``max_samples``, ``cache_dir``. (After planning, the attribute ``sensitivity`` holds
            the measured :class:`~lightning_hessian.quant.sensitivity.Sensitivity`.)
        quantization: :class:`~lightning_hessian.quant.hawq_options.QuantizationOptions`: ``bits``, ``budgets``,
            ``bit_choices``, ``act_bits``, ``ties``, ``solver``, ``groups``, ``momentum``, ``report_dir``.
        finetune: :class:`~lightning_hessian.quant.hawq_options.FineTuneOptions`: ``optimizer``,
            ``distill_weight``, ``temperature``.
        bits: a fixed configuration instead of a plan: an int for every layer (uniform 8 or 4, say) or
            ``{layer: bits}`` (layers left out stay in float).
        budgets: plan the bits: ``{"size": ..., "bops": ...}``. A value in ``[0, 1]`` is HAWQ-V3's
            fraction of the way from every layer at ``min(bit_choices)`` to every layer at
            ``max(bit_choices)``; a value above 1 is absolute (weight bits for ``"size"``, per-sample
            bit operations ``MACs * b_w * b_a`` for ``"bops"``).
        bit_choices: candidate weight bit widths (2..8) for the plan; default ``(4, 8)``.
        act_bits: activation bit width (2..8, default 8) of every layer's input, or ``"follow"``: a layer's input
            activations take its weight bits (HAWQ-V3's W4A4/W8A8 mixed precision; residual additions keep
            8 bits), so BOPS cost ``MACs * b * b``.
        ties: groups of layer names that must share a bit width (e.g. a residual block's shortcut conv
            and the conv it is added to); default none.
        metric: ``"trace"`` (the default; HAWQ-V2/V3: ``Tr(H_i)/n_i * ||dW_i||^2``), ``"eigenvalue"`` (HAWQ-V1: the top
            eigenvalue in place of the average trace), ``"qbert"`` (Q-BERT: ``|mean| + std`` of the top eigenvalue
            over the probe batches in place of the average trace), ``"quadratic"`` (the exact ``dW_i^T H_ii dW_i``, one
            Hessian-vector product per layer and bit width) or, with ``act_bits="follow"``, ``"quadratic+act"``
            (plus ``dA_i^T H_A dA_i`` of the layer's input activations rounded at the same bits), ``"kfac"``
            (``dW_i^T (G_i (x) A_i) dW_i`` on K-FAC's Gauss-Newton block: no Hessian-vector product), or ``"kl"``
            (ZeroQ: the KL divergence of the outputs with one layer's weights quantized from the float outputs, no
            Hessian); see :mod:`~lightning_hessian.quant.sensitivity`.
        probe_data: batches for the sensitivity and calibration (a list of batches or a DataLoader); default
            ``probe_size`` training samples drawn with ``seed``. Under DDP the ranks split either (rank ``r``
            takes batches ``r, r + world_size, ...``) and all-reduce, as one process on all of them.
        probe_size: size of the default (or distilled) probe set; default 512.
        probe_batch_size: size of its batches; default 256.
        seed: seed of the probe draw, of the distillation and of the Hutchinson probes; default 0.
        trace_rel_tol: Hutchinson stopping rule: the relative standard error of every layer's trace; default 0.05.
        max_samples: the Hutchinson cap on probes (at least 32); default 200.
        cache_dir: folder of the sensitivity cache (re-planning the same model and probe is then free).
        loss_fn: ``loss_fn(module, batch)`` for the Hessian; default ``module.hessian_loss`` or
            cross-entropy on ``(x, y)`` batches.
        example_input: an input of ``module`` for the size/BOPS costs; default the first tensor of the
            first probe batch.
        momentum: activation range tracking: ``None`` running min/max, else the EMA momentum.
        optimizer: factory ``optimizer(params)`` for the fine-tune; default the module's own
            ``configure_optimizers``.
        distill_weight: ``w`` in ``(1 - w) * task_loss + w * T^2 * KL(teacher || student)`` on the logits
            of the float model (0, the default, disables distillation); the wrapped ``training_step`` must call
            ``self(...)``.
        temperature: distillation temperature ``T``; default 1.
        solver: OR-Tools solver of :func:`~lightning_hessian.quant.allocation.allocate_bits`: ``"cbc"`` (the
            default), ``"scip"`` or ``"cp-sat"``.
        report_dir: where ``hawq_report.md``/``.png`` go; default ``<trainer.default_root_dir>/hawq``.
        calibration: where the probe set (sensitivity, activation ranges) comes from: ``"data"`` (the default:
            ``probe_data`` or training samples) or ``"distilled"`` (ZeroQ, no data: ``probe_size`` inputs distilled
            from the module's BatchNorm statistics by :func:`~lightning_hessian.quant.distill.distill_data`, seeded with
            ``seed``, in batches ``(x, y)`` of ``probe_batch_size`` with ``y`` the float module's predicted class, so
            the loss and the Hessian metrics apply; ``metric="kl"`` is ZeroQ's own choice). Then ``trainer.test``
            or ``validate`` plans and calibrates with no training data, and :meth:`prepare_data_free` with no
            Trainer at all.
        input_shape: the shape of one input sample for ``"distilled"`` (e.g. ``(3, 32, 32)``); default that of
            ``example_input``.
        distill: further keyword arguments of ``distill_data`` (``batch_size``, ``max_steps``, ``lr``, ``tol``,
            ``patience``, ``input_prior``, ``progress``).
        groups: which weights share a scale (:func:`~lightning_hessian.quant.swap.resolve_groups`): ``None``
            per output channel; ``{"columns": 32}`` (groups of input columns, int4 practice), ``{"rows": 4}``
            (Q-BERT's groups of output rows), ``"tensor"``, or ``{layer: spec}``; one spec applies to every layer
            it tiles (the others stay per-channel, with a warning). The sensitivities round with the same groups.
            A checkpoint keeps the bits, not the groups: pass the same ``groups`` to the module that loads it.

    A module holding ``nn.MultiheadAttention`` (or ``nn.TransformerEncoderLayer``) is wrapped as a copy in which
    every attention's projections are ``nn.Linear`` layers (``lightning_hessian.quant.attention.unpack_attention``:
    the same function), named ``<attention>.q_proj``, ``.k_proj``, ``.v_proj`` and ``.out_proj``: ``float_module``
    is that copy, and the module passed in is not trained.

    Training, validation and test steps are the wrapped module's, and so are the hooks it overrides (its
    dataloaders, batch-transfer hooks, epoch and batch hooks: ``_DELEGATED_HOOKS``), so its metrics are logged
    unchanged. The probe batches go through its batch-transfer hooks as training batches do; ``hessian_loss``
    differentiates the quantized network, so the Hessian callbacks work on a HAWQModule. A ``training_step``
    without ``batch_idx`` and manual optimization work as in Lightning. A module without ``forward`` (the loss in
    its steps) needs ``loss_fn``; its layer costs then run that loss on a probe batch (or on ``example_input``).

    Around a ``pytorch_lightning.LightningModule`` (the package before ``lightning``), ``HAWQModule(module)`` is built
    on that package's ``LightningModule``, so a ``pytorch_lightning.Trainer`` fits it (its class is then
    ``PytorchLightningHAWQModule``; ``isinstance(hawq, HAWQModule)`` still holds).

    An integer-only export (``to_integer_model``, ``export_onnx``) of a module with BatchNorm needs the BatchNorm
    folded first: ``fold_batchnorm(hawq.module, example_input)`` after fine-tuning (``recipes.quantize`` does it).

    Example: plan 4/8-bit weights within half the size budget (HAWQ-V3's fraction from all 4-bit to all 8-bit)
    from K-FAC's Gauss-Newton sensitivity (no Hessian-vector product: fast), given as groups or as flat keywords;
    ``trainer.fit(hawq, ...)`` would then quantize, calibrate and fine-tune, and ``trainer.test(HAWQModule(trained),
    ..., ckpt_path=...)`` rebuild the quantized network from the checkpoint:

    >>> import torch
    >>> from lightning_hessian.models import MNIST1DCNN, ClassificationModule
    >>> from lightning_hessian.quant import QuantizationOptions, SensitivityOptions
    >>> _ = torch.manual_seed(0)
    >>> trained = ClassificationModule(MNIST1DCNN(channels=4, num_classes=4), num_classes=4)
    >>> probe = [(torch.randn(64, 40), torch.randint(0, 4, (64,)))]
    >>> hawq = HAWQModule(trained, quantization=QuantizationOptions(budgets={"size": 0.5}, bit_choices=(4, 8)),
    ...                   sensitivity=SensitivityOptions(metric="kfac"))
    >>> bits = hawq.plan(probe)
    >>> weights = {name: stats.params for name, stats in hawq.stats.items()}
    >>> sum(weights[name] * b for name, b in bits.items()) <= 6 * sum(weights.values())  # 4 + 0.5 * (8 - 4) bits
    True
    >>> HAWQModule(trained, budgets={"size": 0.5}, metric="kfac").plan(probe) == bits
    True
    """


@functools.cache
def _pytorch_lightning_hawq() -> type:
    import pytorch_lightning

    return type("PytorchLightningHAWQModule", (_HAWQ, pytorch_lightning.LightningModule), {
        "__module__": __name__,
        "__doc__": "``HAWQModule`` on ``pytorch_lightning.LightningModule``, for a ``pytorch_lightning.Trainer``.",
    })


def __getattr__(name: str) -> Any:
    """``PytorchLightningHAWQModule``, built (and ``pytorch_lightning`` imported) on first use; pickle finds it here."""
    if name == "PytorchLightningHAWQModule":
        return _pytorch_lightning_hawq()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning_base(module: Any) -> type:
    """The ``LightningModule`` class of the package ``module`` (an instance or a class) was written against:
    ``lightning.pytorch``'s, or ``pytorch_lightning``'s when that package is loaded and the module is its."""
    cls = module if isinstance(module, type) else type(module)
    other = sys.modules.get("pytorch_lightning")
    if other is not None and issubclass(cls, other.LightningModule):
        return other.LightningModule
    return LightningModule


def _load_module(
    module: LightningModule | str | os.PathLike, module_class: type[LightningModule] | Callable | None
) -> LightningModule:
    if isinstance(module, _lightning_base(module)):
        return module
    if isinstance(module, (str, os.PathLike)):
        if module_class is None:
            raise ValueError("module is a checkpoint path: pass module_class= (a LightningModule class, or a "
                             "callable path -> LightningModule)")
        if isinstance(module_class, type) and issubclass(module_class, _lightning_base(module_class)):
            loaded = module_class.load_from_checkpoint(str(module), map_location="cpu")
        else:
            loaded = module_class(str(module))
        if not isinstance(loaded, _lightning_base(loaded)):
            raise TypeError(f"module_class returned a {type(loaded).__name__}, not a LightningModule")
        return loaded
    raise TypeError(f"module must be a LightningModule or a checkpoint path, got {type(module).__name__}")
