"""Time DDP's gradient all-reduces through a communication hook, for the cost breakdown of a training run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

CommHook = Callable[[Any, Any], torch.futures.Future]


class AllReduceClock:
    """Seconds during which a DDP gradient all-reduce was in flight.

    :meth:`wrap` turns a DDP communication hook (default: DDP's own averaging all-reduce) into one that times every
    bucket from the moment DDP hands it over (its gradients are ready) to the moment its reduced values are ready.
    Buckets in flight together count once (the union of the intervals), and the time includes waiting for the
    slowest rank to reach the all-reduce and any overlap with the backward pass of earlier layers. On CPU the
    intervals are wall-clock time; on CUDA they are CUDA events, read only when :meth:`seconds` is called (one
    device synchronisation then, none per step).

    Usage: ``ddp_model.register_comm_hook(ddp_model.process_group, clock.wrap())``, train, ``clock.seconds()``.

    Example (a stand-in bucket and a hook that takes 20 ms, in place of DDP's)::

        >>> import time
        >>> import torch
        >>> from lightning_hessian.callbacks.allreduce_clock import AllReduceClock
        >>> class Bucket:  # what DDP hands a hook: the flattened gradients of some parameters
        ...     def buffer(self):
        ...         return torch.ones(4)
        >>> def slow_allreduce(state, bucket):
        ...     time.sleep(0.02)
        ...     future = torch.futures.Future()
        ...     future.set_result(bucket.buffer())
        ...     return future
        >>> clock = AllReduceClock()
        >>> hook = clock.wrap(slow_allreduce)
        >>> hook(None, Bucket()).wait()
        tensor([1., 1., 1., 1.])
        >>> 0.02 <= clock.seconds() < 1.0
        True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, Any]] = []  # (start, end): perf_counter floats, or CUDA events
        self._total = 0.0
        self._busy_until = float("-inf")  # the end of the last folded interval (wall-clock intervals only)

    def wrap(self, hook: CommHook | None = None) -> CommHook:
        """The communication hook ``hook`` (``None``: the averaging all-reduce), timed."""
        inner = allreduce_hook if hook is None else hook

        def timed(state, bucket):  # type: ignore[no-untyped-def]  # (DDP compares annotations with its own types)
            cuda = bucket.buffer().is_cuda
            start = _cuda_event() if cuda else time.perf_counter()
            future = inner(state, bucket)

            def done(fut: torch.futures.Future) -> Any:
                end = _cuda_event() if cuda else time.perf_counter()
                with self._lock:
                    self._pending.append((start, end))
                return fut.value()

            return future.then(done)

        return timed

    def seconds(self) -> float:
        """The all-reduce time so far (folds the intervals recorded since the last call)."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return self._total
        if isinstance(pending[0][0], float):
            intervals = sorted(pending)
        else:  # CUDA events, on one timeline from the first start
            torch.cuda.synchronize()
            origin = pending[0][0]
            intervals = sorted((origin.elapsed_time(s) / 1e3, origin.elapsed_time(e) / 1e3) for s, e in pending)
            self._busy_until = float("-inf")  # a new timeline: intervals of earlier calls are already folded
        for start, end in intervals:
            start = max(start, self._busy_until)
            if end > start:
                self._total += end - start
            self._busy_until = max(self._busy_until, end)
        return self._total


def _cuda_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
