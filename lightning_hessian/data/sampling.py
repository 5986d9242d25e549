"""A training order drawn from ``(seed, epoch)`` alone, so a resumed run replays the same epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from lightning_hessian.seeds import mix_seed


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch (Lightning calls ``set_epoch``), independent of the global RNG.

    With the default ``RandomSampler`` the order comes from the global random state, which a checkpoint
    does not restore; with this sampler the epoch after a resume sees the batches it would have seen.

    ``keyed=True`` yields ``(index, sample_seed)`` pairs, the seed a function of ``(seed, epoch, index)``, for a
    dataset that draws its random augmentation from it: a resumed epoch then also sees the same crops.
    """

    def __init__(self, size: int, seed: int = 0, keyed: bool = False):
        self.size, self.seed, self.epoch, self.keyed = size, seed, 0, keyed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        epoch_seed = mix_seed(self.seed, self.epoch, multiplier=100_003)  # the orders recorded since
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        if not self.keyed:
            return iter(order)
        return iter((i, mix_seed(epoch_seed, i)) for i in order)
