"""Batch-size schedules as small policy objects: when the global batch grows, and by how much.

``AdaptiveBatchSizeCallback`` gathers what a schedule decides on (the top Hessian eigenvalue, the scheduler's LR
decay), asks it at the start of training and at every epoch's end, and realises the answer (the loader or the
accumulation, the LR, the cap). The rules themselves live here, free of Lightning, so each can be read and tested
on its own: a table of inputs against the growth it decides.

- ``"baseline"`` (``"bl"``): the batch never changes.
- ``"fixed_large_batch"`` (``"fb"``): the largest multiple of the base batch within the cap from the first step,
  the LR scaled linearly and warmed up (Goyal et al.).
- ``"gradual_growth"`` (``"gg"``): the batch grows where the LR scheduler decays the LR, by the power of ``factor``
  nearest the decay (Smith et al.).
- ``"adaptive"`` (``"abs"``): the batch grows when the top eigenvalue of the loss Hessian has fallen by
  ``decay_ratio``, or after ``duration`` epochs at one batch size (ABS, Yao et al.).

The short names are the seed paper's; both are accepted, in any case.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from lightning_hessian.checks import check_number, check_positive_int


class BatchSchedule:
    """How the global batch grows, in multiples of ``factor`` of the base batch.

    The callback asks ``start(base, cap)`` once, then ``decide(...)`` at each epoch's end, grows the batch by the
    answer (no further than the cap allows) and tells the schedule with ``grew()``. ``probes`` asks the callback
    for the top Hessian eigenvalue, ``follows_lr_decay`` for the LR decay since the last decision. State that must
    survive a checkpoint is in ``state_dict`` (Python primitives).

    Args:
        factor: the growth factor of the batch (an integer >= 2, so batch sizes stay whole).
    """

    name: ClassVar[str]
    alias: ClassVar[str]  # the seed paper's short name, also the callback's checkpoint key
    probes: ClassVar[bool] = False  # decides on the top eigenvalue of the loss Hessian
    follows_lr_decay: ClassVar[bool] = False  # decides on the LR scheduler's decay (and its growth replaces it)
    grows: ClassVar[bool] = True  # may change the batch at all
    start_warmup_epochs: float | None = None  # a warmup of the LR from the base batch's after ``start``

    def __init__(self, factor: int = 2):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2 (batch sizes stay whole), got {factor!r}")
        self.factor = factor

    def largest(self, base: int, cap: int) -> int:
        """The largest global batch the schedule reaches from ``base`` within ``cap``: ``base * factor**n``."""
        size = base
        while size * self.factor <= cap:
            size *= self.factor
        return size

    def start(self, base: int, cap: int) -> int:
        """The growth before the first step (1: train at the base batch)."""
        return 1

    def decide(self, eigenvalue: float | None = None, lr_decay: float = 1.0) -> int:
        """The growth at this epoch's end (1: keep the batch), from the top eigenvalue (``None``: not measured,
        or the probe failed) and the LR decay since the last decision (``lr_decay = 10``: the scheduler cut the LR
        tenfold)."""
        return 1

    def grew(self) -> None:
        """The batch grew (by ``decide``'s answer, or ``start``'s)."""

    def decided_above(self) -> float | None:
        """An eigenvalue above which ``decide`` answers the same whatever the exact value (``None``: the value
        itself matters): a probe may stop once the top eigenvalue is known to exceed it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s keys."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(factor={self.factor})"


class Baseline(BatchSchedule):
    """BL: the base batch throughout.

    >>> Baseline().decide(eigenvalue=0.1, lr_decay=10.0)
    1
    """

    name, alias, grows = "baseline", "bl", False


class FixedLargeBatch(BatchSchedule):
    """FB: the largest multiple of the base batch within the cap from the start (not only ``base * factor**n``),
    the LR scaled with it and warmed up linearly from the base LR over ``warmup_epochs``.

    >>> fb = FixedLargeBatch(warmup_epochs=5.0)
    >>> fb.start(base=64, cap=1600), fb.largest(64, 1600), fb.decide(eigenvalue=0.1)
    (25, 1600, 1)

    Args:
        factor: see ``BatchSchedule`` (here only whether the batch is at its cap).
        warmup_epochs: epochs over which the LR rises from the base batch's to the linearly scaled one.
    """

    name, alias = "fixed_large_batch", "fb"

    def __init__(self, factor: int = 2, warmup_epochs: float = 5.0):
        super().__init__(factor)
        self.start_warmup_epochs = check_number(warmup_epochs, "fb_warmup_epochs", 0)

    def largest(self, base: int, cap: int) -> int:
        return cap // base * base

    def start(self, base: int, cap: int) -> int:
        return self.largest(base, cap) // base

    def __repr__(self) -> str:
        return f"FixedLargeBatch(factor={self.factor}, warmup_epochs={self.start_warmup_epochs})"


class GradualGrowth(BatchSchedule):
    """GG: grow the batch instead of decaying the LR, by the power of ``factor`` nearest the scheduler's decay
    (the LR keeps the rest of it).

    >>> gg = GradualGrowth(factor=2)
    >>> [gg.decide(lr_decay=d) for d in (1.0, 1.3, 1.5, 2.0, 10.0)]  # 10x: 2**3 is the nearest power of 2
    [1, 1, 2, 2, 8]
    """

    name, alias, follows_lr_decay = "gradual_growth", "gg", True

    def decide(self, eigenvalue: float | None = None, lr_decay: float = 1.0) -> int:
        steps = round(math.log(lr_decay, self.factor)) if lr_decay > 1 else 0
        return self.factor**steps if steps >= 1 else 1


class Adaptive(BatchSchedule):
    """ABS: grow by ``factor`` when the top eigenvalue has fallen to ``reference / decay_ratio`` (the reference is
    the first eigenvalue, then the one at the last eigenvalue-driven growth), or after ``duration`` epochs at one
    batch size (the first epoch, which sets the reference, counts, as in the authors' code). A failed probe
    (``eigenvalue=None``) keeps the batch and does not count as an epoch.

    >>> abs_ = Adaptive(factor=2, decay_ratio=2.0, duration=3)
    >>> [abs_.decide(eigenvalue=e) for e in (10.0, 8.0, 4.9)], abs_.reference  # 4.9 <= 10 / 2: grow
    ([1, 1, 2], 4.9)

    Args:
        factor: see ``BatchSchedule``.
        decay_ratio: grow when the top eigenvalue has fallen to ``reference / decay_ratio`` (> 1).
        duration: grow anyway after this many epochs at one batch size.
    """

    name, alias, probes = "adaptive", "abs", True

    def __init__(self, factor: int = 2, decay_ratio: float = 2.0, duration: int = 10):
        super().__init__(factor)
        self.decay_ratio = check_number(decay_ratio, "decay_ratio", 1, low_open=True)
        self.duration = check_positive_int(duration, "duration")
        self.reference: float | None = None
        self.epochs_since_growth = 0

    def decide(self, eigenvalue: float | None = None, lr_decay: float = 1.0) -> int:
        if eigenvalue is None:
            return 1
        self.epochs_since_growth += 1  # this epoch trained at the current batch (the first epoch too)
        if self.reference is None:
            self.reference = eigenvalue
        elif eigenvalue <= self.reference / self.decay_ratio:
            self.reference = eigenvalue
            return self.factor
        return self.factor if self.epochs_since_growth >= self.duration else 1

    def grew(self) -> None:
        self.epochs_since_growth = 0

    def decided_above(self) -> float | None:
        """Above ``reference / decay_ratio`` the eigenvalue neither grows the batch nor becomes the reference."""
        return None if self.reference is None else self.reference / self.decay_ratio

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "epochs_since_growth": self.epochs_since_growth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state.get("reference")
        self.epochs_since_growth = int(state.get("epochs_since_growth", 0))

    def __repr__(self) -> str:
        return f"Adaptive(factor={self.factor}, decay_ratio={self.decay_ratio}, duration={self.duration})"


SCHEDULES: dict[str, type[BatchSchedule]] = {cls.name: cls for cls in (Baseline, FixedLargeBatch, GradualGrowth,
                                                                       Adaptive)}
ALIASES = {cls.alias: name for name, cls in SCHEDULES.items()}


def batch_schedule(name: str, factor: int = 2, decay_ratio: float = 2.0, duration: int = 10,
                   fb_warmup_epochs: float = 5.0) -> BatchSchedule:
    """The schedule called ``name`` (spelled out, or the seed paper's short name, in any case) with the parameters
    it uses.

    >>> batch_schedule("ABS", duration=5)
    Adaptive(factor=2, decay_ratio=2.0, duration=5)
    >>> batch_schedule("fixed_large_batch", fb_warmup_epochs=2.5)
    FixedLargeBatch(factor=2, warmup_epochs=2.5)
    """
    check_number(decay_ratio, "decay_ratio", 1, low_open=True)  # every parameter, whichever schedule uses it:
    check_positive_int(duration, "duration")  # a typo in a config fails whatever the schedule
    check_number(fb_warmup_epochs, "fb_warmup_epochs", 0)
    key = name.lower() if isinstance(name, str) else name
    key = ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)} (or {tuple(ALIASES)}), or a BatchSchedule, "
                         f"got {name!r}")
    if key == "adaptive":
        return Adaptive(factor, decay_ratio, duration)
    if key == "fixed_large_batch":
        return FixedLargeBatch(factor, fb_warmup_epochs)
    return SCHEDULES[key](factor)
