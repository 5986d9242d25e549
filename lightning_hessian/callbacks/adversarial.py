"""AdversarialAugmentCallback: adversarial training for any Lightning run, plus robust-accuracy metrics."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_hessian.attacks import attack_success_rate, fgsm, pgd, trust_region
from lightning_hessian.attacks._common import NORMS, Attack, Range, as_column, check_clamp, check_eps, check_range
from lightning_hessian.checks import check_batch_key, check_choice, check_number, check_positive_int, check_seed
from lightning_hessian.no_trace import leave_no_trace
from lightning_hessian.probe_set import first_line, module_loss_problem
from lightning_hessian.seeds import mix_seed

# (model, x, y) -> x_adv and epoch -> value; typed loosely so LightningCLI takes a function by its dotted path
Schedule = Callable[..., Any] | Mapping[int, float]
ATTACKS = ("fgsm", "pgd", "trust_region")
MODES = ("replace", "append")
_MIXUP_STREAM = 1  # separates the mixup draws of a batch from its attack draws


class AdversarialAugmentCallback(Callback):
    """Replace (or append) a fraction of every training batch with adversarial examples; measure robustness.

    At each training batch, ``fraction * N`` randomly chosen samples (rounded up with probability equal to
    the fractional part, so any batch size attacks ``fraction`` of its samples on average) are attacked with
    ``attack`` on the LightningModule itself (``pl_module(x)`` must return logits) and, with
    ``mode="replace"``, take the place of their clean rows; with ``mode="append"`` they are added to the
    batch with their labels (other per-sample entries of a dict batch are not extended). Attacks run in
    eval mode, leave the parameters' ``.grad`` and the module's modes untouched, and use their own seeded
    random source, so the global RNG stream is unchanged. Under DDP each rank attacks its own shard, with
    no collectives. An attack that fails on the first batch raises (a misconfiguration); one that fails
    later warns and leaves that batch clean.

    ``eps`` is in the units of the inputs as the model receives them (default 0.1: a tenth of a standard
    deviation for standardised data such as the project's MNIST-1D and CIFAR-10 datamodules; for CIFAR-10
    that is about 6/255 in pixel units). ``clamp="auto"`` keeps adversarial inputs inside
    ``trainer.datamodule.input_range`` when the datamodule has one, else does not clamp.

    ``fraction`` and ``eps`` are plain attributes that may be changed at any time (``AdaptiveBatchSizeCallback``
    halves ``fraction`` at each batch growth), or follow ``fraction_schedule`` / ``eps_schedule``: a callable
    ``epoch -> value`` or a dict ``{first_epoch: value}``, applied at every epoch start.

    Batches are ``(x, y)`` tuples or lists, or dicts; ``input_key`` / ``target_key`` give the position or key
    (default 0 and 1, or ``"x"`` and ``"y"`` for dicts). Lists and dicts get new tensors in their slots;
    tuples, being immutable, have their tensors' contents swapped in place (``Tensor.set_``), which never
    writes into the loader's storage. The batch objects are changed in place, so a loader must yield fresh
    batches (``DataLoader`` does), not the same objects again.

    With ``robust_eval=True`` every validation epoch also measures accuracy under ``robust_eval_attack``
    (default PGD with ``robust_eval_steps`` steps at ``robust_eval_eps``, default ``eps``), with random
    starts drawn from a generator seeded with ``seed`` (plus the rank) at each validation epoch start.
    Logged per epoch (all ranks pooled): ``adv/fraction`` (share of the epoch's training samples attacked),
    ``adv/success_rate`` (share of the attacked samples the model misclassifies after the attack) and
    ``adv/robust_acc``.

    With ``mixup_alpha > 0`` every training batch is first mixed up (Zhang et al., ICLR 2018): one
    ``lam ~ Beta(mixup_alpha, mixup_alpha)`` per batch, and each sample ``x_r`` becomes
    ``lam * x_r + (1 - lam) * x_p(r)`` for a random permutation ``p`` of the batch. Labels stay integer classes,
    so any ``training_step`` works unchanged: a sample keeps its label with probability ``lam`` and takes its
    partner's otherwise; the expected cross-entropy is then exactly mixup's ``lam CE(y_r) + (1 - lam) CE(y_p(r))``
    (the loss is linear in the target distribution), at the price of some label noise in the gradient. Noisy
    mixup (Yang et al., NeurIPS 2020): with probability ``mixup_noise`` a sample's partner is a noise image,
    uniform in the valid input range (``clamp``, which must then be finite), labelled uniformly over the classes
    (the paper gives noise images a class of their own, which needs an extra output; a uniform label keeps the
    model as it is). The attack, if ``fraction > 0``, then runs on the mixed batch; ``fraction=0`` trains with
    mixup alone.

    Example::

        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_hessian import AdversarialAugmentCallback, ClassificationModule
        >>> _ = torch.manual_seed(0)
        >>> data = DataLoader(TensorDataset(torch.randn(128, 40), torch.randint(0, 10, (128,))), batch_size=32)
        >>> adv = AdversarialAugmentCallback(attack="pgd", eps=0.2, steps=3, fraction=0.5, robust_eval=True)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[adv], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(ClassificationModule(torch.nn.Linear(40, 10)), data, data)
        >>> sorted(name for name in trainer.callback_metrics if name.startswith("adv/"))
        ['adv/fraction', 'adv/robust_acc', 'adv/success_rate']
        >>> noisy_mixup = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, mixup_noise=0.5)
    """

    def __init__(
        self,
        attack: Attack | str = "fgsm",
        eps: float = 0.1,
        fraction: float = 0.5,
        mode: str = "replace",
        norm: str = "linf",
        steps: int = 10,
        step_size: float | None = None,
        clamp: str | Range | None = "auto",
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        fraction_schedule: Schedule | None = None,
        eps_schedule: Schedule | None = None,
        robust_eval: bool = False,
        robust_eval_attack: Attack | str = "pgd",
        robust_eval_steps: int = 10,
        robust_eval_eps: float | None = None,
        seed: int = 0,
        mixup_alpha: float = 0.0,
        mixup_noise: float = 0.0,
    ):
        """
        Args:
            attack: ``"fgsm"``, ``"pgd"``, ``"trust_region"`` (bounded by ``eps``) or a callable
                ``(model, x, y) -> x_adv``.
            eps: attack radius in input units, > 0.
            fraction: share of each batch to attack, in [0, 1].
            mode: ``"replace"`` the attacked rows, or ``"append"`` the adversarial copies.
            norm: ``"linf"`` or ``"l2"`` ball for PGD and the trust-region attack (FGSM is L-inf only).
            steps, step_size: PGD steps and step length (default ``2.5 * eps / steps``).
            clamp: valid input range ``(lo, hi)`` (numbers, or per-channel sequences), None for none, or
                ``"auto"`` (the datamodule's ``input_range``).
            input_key, target_key: where inputs and int labels sit in a batch (index or dict key).
            fraction_schedule, eps_schedule: ``epoch -> value`` callables or ``{first_epoch: value}`` dicts.
            robust_eval: measure accuracy under ``robust_eval_attack`` every validation epoch.
            robust_eval_attack: ``"pgd"``, ``"fgsm"``, ``"trust_region"`` or a callable ``(model, x, y)``.
            robust_eval_steps: PGD steps of the robust evaluation.
            robust_eval_eps: radius of the robust evaluation; None uses ``eps`` (as constructed).
            seed: seeds the choice of attacked rows, PGD's random starts, the robust evaluation and mixup.
            mixup_alpha: mixup's Beta(alpha, alpha) parameter, >= 0; 0 turns mixup off.
            mixup_noise: share of mixup partners that are noise images (noisy mixup), in [0, 1].
        """
        _check_attack(attack, "attack")
        _check_attack(robust_eval_attack, "robust_eval_attack")
        check_choice(mode, "mode", MODES)
        check_choice(norm, "norm", NORMS)
        if norm != "linf" and "fgsm" in (attack, robust_eval_attack):
            raise ValueError(f"FGSM is an L-inf attack: use norm='linf' or attack='pgd', got norm={norm!r}")
        check_positive_int(steps, "steps")
        check_positive_int(robust_eval_steps, "robust_eval_steps")
        if step_size is not None:
            check_eps(step_size, "step_size")
        if robust_eval_eps is not None:
            check_eps(robust_eval_eps, "robust_eval_eps")
        if clamp != "auto":
            check_range(clamp, "clamp (or 'auto')")
        check_batch_key(input_key, "input_key"), check_batch_key(target_key, "target_key")
        _check_schedule(fraction_schedule, "fraction_schedule", lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_schedule(eps_schedule, "eps_schedule", lambda v: 0 < v < math.inf, "positive and finite")
        check_seed(seed)
        self.mixup_alpha = check_number(mixup_alpha, "mixup_alpha", 0)
        self.mixup_noise = check_number(mixup_noise, "mixup_noise", 0, 1)
        if self.mixup_noise > 0 and self.mixup_alpha == 0:
            raise ValueError(f"mixup_noise={mixup_noise} mixes noise images into mixup: set mixup_alpha > 0 "
                             "(e.g. 1.0) too")
        self._num_classes: int | None = None  # read from the logits at the first noisy-mixup batch
        self.attack, self.mode, self.norm, self.steps, self.step_size = attack, mode, norm, steps, step_size
        self.clamp, self.input_key, self.target_key = clamp, input_key, target_key
        self.fraction_schedule, self.eps_schedule = fraction_schedule, eps_schedule
        self.robust_eval, self.robust_eval_attack = robust_eval, robust_eval_attack
        self.robust_eval_steps = robust_eval_steps
        self.robust_eval_eps = eps if robust_eval_eps is None else robust_eval_eps
        self.seed = seed
        self.fraction = fraction
        self.eps = eps
        self._initial_eps = self.eps
        # run totals (in state_dict)
        self.batches_seen = 0
        self.samples_attacked = 0
        self.samples_fooled = 0
        self._range: Range | None = None
        self._differentiable = False
        self._train_counts = torch.zeros(3, dtype=torch.float64)  # this epoch's samples, attacked, fooled
        self._counts_epoch = -1  # the epoch _train_counts belong to (restored mid-epoch, they carry on)
        self._train_ok = False
        self._eval_counts = torch.zeros(2, dtype=torch.float64)  # this validation: correct, total
        self._eval_ok = False
        self._eval_generator: torch.Generator | None = None

    # ---- attributes that may change during training ----------------------------------------------------

    @property
    def fraction(self) -> float:
        """Share of each training batch that is attacked, in [0, 1]."""
        return self._fraction

    @fraction.setter
    def fraction(self, value: float) -> None:
        self._fraction = check_number(value, "fraction", 0, 1)

    @property
    def eps(self) -> float:
        """Attack radius in input units, > 0."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = check_eps(value, "eps")

    @property
    def state_key(self) -> str:
        name = self.attack if isinstance(self.attack, str) else getattr(self.attack, "__name__", "callable")
        mixup = {"mixup_alpha": self.mixup_alpha, "mixup_noise": self.mixup_noise} if self.mixup_alpha else {}
        return self._generate_state_key(attack=name, eps=self._initial_eps, mode=self.mode, norm=self.norm, **mixup)

    # ---- hooks -------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        builtin = [(name, a) for name, a in (("attack", self.attack), ("robust_eval_attack", self.robust_eval_attack))
                   if isinstance(a, str) and (name == "attack" or self.robust_eval)]
        problem = module_loss_problem(pl_module) if builtin else None
        if problem is not None:
            name, attack = builtin[0]
            raise ValueError(f"AdversarialAugmentCallback: {name}={attack!r} ascends cross_entropy(module(x), y), "
                             f"which does not apply: {problem}; pass {name}=<callable (model, x, y) -> x_adv>")
        if self.clamp != "auto":
            self._range = check_range(self.clamp)
            return
        found = getattr(trainer.datamodule, "input_range", None)
        if found is None:
            rank_zero_info("AdversarialAugmentCallback: clamp='auto' found no `input_range` on the datamodule; "
                           "adversarial inputs are not clamped (pass clamp=(lo, hi) to bound them)")
            self._range = None
        else:
            self._range = check_range(found, "datamodule.input_range (read for clamp='auto'; else pass clamp=)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mixup_noise == 0:
            return
        bounds = [] if self._range is None else [v for b in self._range for v in (b if isinstance(b, tuple) else (b,))]
        if not bounds or not all(math.isfinite(v) for v in bounds):
            raise ValueError(f"mixup_noise={self.mixup_noise} draws noise images uniformly in the valid input range, "
                             f"but clamp={self.clamp!r} gives {self._range}: pass a finite clamp=(lo, hi)")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.fraction_schedule is not None:
            self.fraction = _scheduled(self.fraction_schedule, epoch, self.fraction)
        if self.eps_schedule is not None:
            self.eps = _scheduled(self.eps_schedule, epoch, self.eps)
        if self._counts_epoch != epoch:
            self._train_counts.zero_()
            self._counts_epoch = epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mixup_alpha > 0:
            self._mixup(trainer, pl_module, batch)
        x, y = self._inputs_and_targets(batch)
        n = x.shape[0]
        self.batches_seen += 1
        seed = mix_seed(self.seed, self.batches_seen, trainer.global_rank)
        generator = torch.Generator().manual_seed(seed)
        # fraction * n rounded up with probability its fractional part, so every batch size attacks `fraction`
        k = math.floor(self.fraction * n)
        k += int(torch.rand((), generator=generator).item() < self.fraction * n - k)
        self._train_counts[0] += n
        if k == 0:
            return
        if not self._differentiable:
            self._check_differentiable(pl_module, x, y, "attack")
        rows = torch.randperm(n, generator=generator, device="cpu")[:k].sort().values.to(x.device)
        x_clean, y_clean = x[rows], y[rows].long()
        attack = self._attack(self.attack, self.eps, self.steps, self.step_size,
                              torch.Generator(device=x.device).manual_seed(seed))
        try:
            x_adv = _checked_output(attack(pl_module, x_clean, y_clean), x_clean, "attack").to(x.dtype)
            fooled = round(float(attack_success_rate(pl_module, x_adv, y_clean)) * k)
        except Exception as err:
            _fail_first_then_warn(err, self._train_ok, f"the attack on training batch {batch_idx}", trainer)
            return
        self._train_ok = True
        self.samples_attacked += k
        self.samples_fooled += fooled
        self._train_counts[1:] += torch.tensor([k, fooled], dtype=torch.float64)
        if self.mode == "replace":
            new_x = x.clone()
            new_x[rows] = x_adv
            _put(batch, self._key(batch, "input"), x, new_x)
        else:
            _put(batch, self._key(batch, "input"), x, torch.cat([x, x_adv]))
            _put(batch, self._key(batch, "target"), y, torch.cat([y, y[rows]]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples, attacked, fooled = _all_ranks_sum(trainer, pl_module, self._train_counts)
        metrics = {}
        if samples > 0:
            metrics["adv/fraction"] = attacked / samples
        if attacked > 0:
            metrics["adv/success_rate"] = fooled / attacked
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.robust_eval or trainer.sanity_checking:
            return
        self._eval_counts.zero_()
        self._eval_generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + trainer.global_rank)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.robust_eval or trainer.sanity_checking:
            return
        x, y = self._inputs_and_targets(batch)
        y = y.long()
        if not self._differentiable:
            self._check_differentiable(pl_module, x, y, "robust_eval_attack")
        attack = self._attack(self.robust_eval_attack, self.robust_eval_eps, self.robust_eval_steps, None,
                              self._eval_generator)
        try:
            x_adv = _checked_output(attack(pl_module, x, y), x, "robust_eval_attack")
            wrong = round(float(attack_success_rate(pl_module, x_adv, y)) * len(y))
        except Exception as err:
            _fail_first_then_warn(err, self._eval_ok, f"the robust evaluation of batch {batch_idx}", trainer)
            return
        self._eval_ok = True
        self._eval_counts += torch.tensor([len(y) - wrong, len(y)], dtype=torch.float64)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.robust_eval or trainer.sanity_checking:
            return
        correct, total = _all_ranks_sum(trainer, pl_module, self._eval_counts)
        if total > 0:
            pl_module.log("adv/robust_acc", correct / total, on_step=False, on_epoch=True, sync_dist=False)

    # ---- checkpoint --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "eps": self.eps, "batches_seen": self.batches_seen,
                "samples_attacked": self.samples_attacked, "samples_fooled": self.samples_fooled,
                "train_counts": self._train_counts.tolist(), "counts_epoch": self._counts_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "train_counts" in state:
            self._train_counts = torch.tensor(state.pop("train_counts"), dtype=torch.float64)
            self._counts_epoch = state.pop("counts_epoch")
        for key, value in state.items():
            setattr(self, key, value)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _mixup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Mix the whole batch up in place (noisy mixup with ``mixup_noise > 0``), labels drawn as documented."""
        x, y = self._inputs_and_targets(batch)
        n = x.shape[0]
        rng = np.random.default_rng(mix_seed(self.seed, self.batches_seen + 1, trainer.global_rank, _MIXUP_STREAM))
        lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
        partner = torch.from_numpy(rng.permutation(n)).to(x.device)
        x_partner, y_partner = x[partner], y[partner]
        if self.mixup_noise > 0:
            if self._num_classes is None:
                with leave_no_trace(pl_module, "eval"), torch.no_grad():
                    self._num_classes = pl_module(x[:1]).shape[1]
            lo, hi = check_clamp(self._range, x)
            noisy = torch.from_numpy(rng.random(n) < self.mixup_noise).to(x.device)
            noise = lo + (hi - lo) * torch.from_numpy(rng.random(tuple(x.shape))).to(x.device, x.dtype)
            x_partner = torch.where(as_column(noisy, x), noise, x_partner)
            noise_labels = torch.from_numpy(rng.integers(0, self._num_classes, n)).to(y)
            y_partner = torch.where(noisy, noise_labels, y_partner)
        keep = torch.from_numpy(rng.random(n) < lam).to(x.device)
        _put(batch, self._key(batch, "input"), x, lam * x + (1 - lam) * x_partner)
        _put(batch, self._key(batch, "target"), y, torch.where(keep, y, y_partner))

    def _attack(
        self, attack: str | Attack, eps: float, steps: int, step_size: float | None, generator: torch.Generator | None
    ) -> Attack:
        if callable(attack):
            return attack
        if attack == "fgsm":
            return partial(fgsm, eps=eps, clamp=self._range)
        if attack == "pgd":
            return partial(pgd, eps=eps, steps=steps, step_size=step_size, norm=self.norm, clamp=self._range,
                           generator=generator)
        return partial(trust_region, eps=eps, norm=self.norm, clamp=self._range)

    def _key(self, batch: Any, role: str) -> int | str:
        key = self.input_key if role == "input" else self.target_key
        if key is not None:
            return key
        if isinstance(batch, Mapping):
            return "x" if role == "input" else "y"
        return 0 if role == "input" else 1

    def _inputs_and_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's inputs and int64 labels, or a ValueError naming the key argument to fix."""
        if not isinstance(batch, (Mapping, tuple, list)):
            raise ValueError(f"AdversarialAugmentCallback needs tuple, list or dict batches holding inputs and "
                             f"labels, got a {type(batch).__name__}")
        layout = f"dict with keys {list(batch)}" if isinstance(batch, Mapping) else \
            f"{type(batch).__name__} of length {len(batch)}"
        found = []
        for role, name in (("input", "input_key"), ("target", "target_key")):
            key = self._key(batch, role)
            try:
                value = batch[key]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"AdversarialAugmentCallback found no {role}s at {name}={key!r} in a batch that is "
                                 f"a {layout}: set {name}= to where they are") from None
            found.append(value)
        x, y = found
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"the inputs at input_key={self._key(batch, 'input')!r} must be a floating-point tensor "
                             f"(N, ...), got {_describe(x)}: set input_key= to the inputs")
        if (not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool
                or y.shape != x.shape[:1]):
            raise ValueError(f"the targets at target_key={self._key(batch, 'target')!r} must be integer class labels "
                             f"of shape ({x.shape[0]},), got {_describe(y)}: set target_key= to the labels")
        return x, y

    def _check_differentiable(self, pl_module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor,
                              name: str) -> None:
        """Fail clearly when ``pl_module(x)`` gives no class logits for the labels ``y`` with a gradient w.r.t. ``x``
        (the built-in attacks ascend ``cross_entropy(pl_module(x), y)``)."""
        fix = f"pass {name}=<callable (model, x, y) -> x_adv> otherwise"
        with leave_no_trace(pl_module, "eval"):
            probe = x.detach().clone().requires_grad_(True)
            try:
                out = pl_module(probe)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                raise ValueError(f"AdversarialAugmentCallback ({name}): {type(pl_module).__name__}(x) failed on the "
                                 f"batch's inputs ({type(err).__name__}: {first_line(err)}); the attacks need "
                                 f"pl_module(x) -> logits: set input_key= to the model's input, or {fix}") from err
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 2:
                raise ValueError(f"AdversarialAugmentCallback ({name}): pl_module(x) must return logits of shape "
                                 f"({x.shape[0]}, classes >= 2) for the attacks, got {_describe(out)}; {fix}")
            if bool(((y < 0) | (y >= out.shape[1])).any()):
                raise ValueError(f"AdversarialAugmentCallback ({name}): the labels hold {int(y.min())}..{int(y.max())} "
                                 f"but pl_module(x) has {out.shape[1]} outputs: they are not class logits for these "
                                 f"labels; set target_key= to the class labels, or {fix}")
            grad = None
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
        if grad is None:
            raise ValueError(f"{name}: pl_module(x)'s output does not depend on x through autograd (is forward under "
                             f"torch.no_grad() or does it detach?); gradient attacks need d logits / d x: fix forward, "
                             f"or pass {name}=<callable (model, x, y) -> x_adv>")
        self._differentiable = True


# ---- module helpers ----------------------------------------------------------------------------------------


def _all_ranks_sum(trainer: pl.Trainer, pl_module: pl.LightningModule, counts: torch.Tensor) -> list[float]:
    """``counts`` summed over the ranks (every rank calls this at the same hook, so the reduction never hangs)."""
    return trainer.strategy.reduce(counts.clone().to(pl_module.device), reduce_op="sum").cpu().tolist()


def _fail_first_then_warn(err: Exception, succeeded_before: bool, what: str, trainer: pl.Trainer) -> None:
    """Re-raise a failure before any success (a misconfiguration: fail fast); later ones warn and the batch is
    skipped, so one bad batch never ends a training run."""
    if not succeeded_before:
        raise err
    warnings.warn(f"AdversarialAugmentCallback: {what} failed on rank {trainer.global_rank} ({err!r}); skipped, "
                  "training continues", RuntimeWarning, stacklevel=2)


def _put(batch: Any, key: int | str, old: torch.Tensor, new: torch.Tensor) -> None:
    """Store ``new`` at ``key``: in the slot of a list or dict, else (tuples) in ``old``'s own tensor object."""
    if isinstance(batch, (MutableMapping, MutableSequence)):
        batch[key] = new
    else:
        old.set_(new)


def _checked_output(x_adv: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise TypeError(f"{name} must return adversarial inputs of shape {tuple(x.shape)}, got {_describe(x_adv)}")
    return x_adv.detach()


def _scheduled(schedule: Schedule, epoch: int, current: float) -> float:
    if callable(schedule):
        return schedule(epoch)
    started = [e for e in schedule if e <= epoch]
    return schedule[max(started)] if started else current


def _check_attack(attack: Any, name: str) -> None:
    if not (callable(attack) or attack in ATTACKS):
        raise ValueError(f"{name} must be one of {ATTACKS} or a callable (model, x, y) -> x_adv, got {attack!r}")


def _check_schedule(schedule: Any, name: str, valid: Callable[[float], bool], rule: str) -> None:
    if schedule is None or callable(schedule):
        return
    if not isinstance(schedule, Mapping) or not all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 0
        and isinstance(v, (int, float)) and not isinstance(v, bool) and valid(v)
        for e, v in schedule.items()
    ):
        raise ValueError(f"{name} must be None, a callable epoch -> value, or a dict {{first_epoch: value}} with "
                         f"integer epochs >= 0 and values {rule}, got {schedule!r}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
