"""Property tests: every attack stays inside its eps-ball and the valid range, for random shapes, eps, ranges."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_hessian.attacks import fgsm, pgd, trust_region


def _model(shape: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    features = math.prod(shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 4)).train()


@st.composite
def cases(draw):
    shape = draw(st.sampled_from([(3,), (2, 5), (1, 3, 3), (2, 2, 4)]))
    n = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    lo = draw(st.floats(-3.0, 0.0))
    width = draw(st.floats(0.05, 4.0))
    clamp = draw(st.sampled_from([True, False]))
    eps = draw(st.floats(1e-3, 2.0))
    norm = draw(st.sampled_from(["linf", "l2"]))
    attack = draw(st.sampled_from(["fgsm", "pgd", "trust_region"]))
    gen = torch.Generator().manual_seed(seed)
    x = lo + width * torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return attack, _model(shape, seed), x, y, eps, norm, (lo, lo + width) if clamp else None


@settings(max_examples=60, deadline=None)
@given(cases())
def test_attack_stays_in_eps_ball_and_valid_range(case):
    attack, model, x, y, eps, norm, clamp = case
    if attack == "fgsm":
        norm = "linf"
        x_adv = fgsm(model, x, y, eps, clamp=clamp)
    elif attack == "pgd":
        x_adv = pgd(model, x, y, eps, steps=3, norm=norm, clamp=clamp)
    else:
        x_adv = trust_region(model, x, y, eps, norm=norm, max_iter=4, initial_radius=eps, clamp=clamp)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and torch.isfinite(x_adv).all()
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert dist.max() <= eps + 1e-6
    if clamp is not None:
        assert x_adv.min() >= clamp[0] and x_adv.max() <= clamp[1]
    elif attack == "fgsm":  # unclamped FGSM moves every coordinate by exactly eps
        torch.testing.assert_close(dist, torch.full_like(dist, eps), rtol=1e-5, atol=1e-6)
    assert model.training
