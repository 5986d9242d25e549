"""``mix_seed``, the package's one seed derivation, and the draws it seeds: each pinned to the closed form the
call site used before it went through the helper (the sampler's orders, the probe set's sample seeds), or, for
AdaHessian's probes (a tuple ``hash`` before), to the helper's own value."""

import random

import numpy as np
import torch

from lightning_hessian.data.sampling import EpochShuffleSampler
from lightning_hessian.optim import adahessian
from lightning_hessian.optim.adahessian import AdaHessian
from lightning_hessian.probe_set import probe_batches
from lightning_hessian.seeds import MODULUS, mix_seed


def test_mix_seed_folds_with_the_prime_multiplier():
    assert mix_seed() == 0 and mix_seed(42) == 42
    assert mix_seed(3999, 1023) == 3999 * 1_000_003 + 1023
    assert mix_seed(1, 2, 3) == (1 * 1_000_003 + 2) * 1_000_003 + 3
    assert mix_seed(7, 11, multiplier=100_003) == 7 * 100_003 + 11
    assert mix_seed(2**62, 2**62) == (2**62 * 1_000_003 + 2**62) % (2**63 - 1) < MODULUS
    assert len({mix_seed(s, i) for s in range(50) for i in range(50)}) == 2500


def test_keyed_sampler_orders_and_sample_seeds_are_the_recorded_ones():
    for seed, epoch in ((0, 0), (3, 5), (3999, 89)):
        sampler = EpochShuffleSampler(20, seed=seed, keyed=True)
        sampler.set_epoch(epoch)
        epoch_seed = seed * 100_003 + epoch
        order = torch.randperm(20, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        assert list(sampler) == [(i, (epoch_seed * 1_000_003 + i) % 2**63) for i in order]


class Draws(torch.utils.data.Dataset):
    """Each sample is what torch's, NumPy's and Python's generators give when it is read."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random()], dtype=torch.float64)


def test_probe_samples_are_read_with_the_recorded_seeds():
    (batch,) = probe_batches(Draws(), [1, 4, 9], batch_size=3, seed=17)
    for row, index in zip(batch, (1, 4, 9)):
        old = (17 * 1_000_003 + index) % 2**32
        torch.manual_seed(old)
        np.random.seed(old)
        random.seed(old)
        assert row.tolist() == [torch.rand(()).item(), np.random.rand(), random.random()]


def test_adahessian_probes_step_t_with_mix_seed(monkeypatch):
    seeds = []
    estimate = adahessian.hessian_diagonal

    def spy(*args, seed, **kwargs):
        seeds.append(seed)
        return estimate(*args, seed=seed, **kwargs)

    monkeypatch.setattr(adahessian, "hessian_diagonal", spy)
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdaHessian([w], lr=0.1, seed=5)
    for _ in range(3):
        opt.zero_grad()
        (w**3).sum().backward(create_graph=True)
        opt.step()
    assert seeds == [5 * 1_000_003, 5 * 1_000_003 + 1, 5 * 1_000_003 + 2]
