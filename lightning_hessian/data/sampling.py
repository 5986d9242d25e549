"""A training order drawn from ``(seed, epoch)`` alone, so a resumed run replays the same epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch (Lightning calls ``set_epoch``), independent of the global RNG.

    With the default ``RandomSampler`` the order comes from the global random state, which a checkpoint
    does not restore; with this sampler the epoch after a resume sees the batches it would have seen.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
