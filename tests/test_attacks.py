"""Attacks against exact references: closed-form worst cases and minimal perturbations of linear models."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.attacks import (
    attack_success_rate,
    fgsm,
    perturbation_norm,
    pgd,
    robust_accuracy,
    trust_region,
)
from tests.helpers.problems import fit_full_batch

ATTACKS = {
    "fgsm": partial(fgsm, eps=0.3),
    "pgd_linf": partial(pgd, eps=0.3, steps=3),
    "pgd_l2": partial(pgd, eps=0.5, steps=3, norm="l2"),
    "trust_region": partial(trust_region, eps=1.0, norm="l2", max_iter=5),
}


def _blobs(n: int, dim: int, classes: int, seed: int, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    return fit_full_batch(model, x, y, steps).eval()


@pytest.fixture(scope="module")
def linear_binary():
    torch.manual_seed(0)
    x, y = _blobs(300, 6, 2, seed=1, spread=1.0)
    return _train(nn.Linear(6, 2), x, y), x, y


@pytest.fixture(scope="module")
def linear_multiclass():
    torch.manual_seed(0)
    x, y = _blobs(300, 12, 5, seed=2)
    return _train(nn.Linear(12, 5), x, y), x, y


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    x, y = _blobs(400, 10, 3, seed=3, spread=1.5)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    return _train(model, x, y), x, y


def _binary_margin(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins ``f_y - f_other`` and the weight differences ``w_y - w_other`` of a 2-class linear model."""
    with torch.no_grad():
        logits = model(x)
        margin = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, (1 - y)[:, None]).squeeze(1)
        return margin, model.weight[y] - model.weight[1 - y]


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_linf_attacks_reach_exact_worst_case_of_linear_binary_model(linear_binary, attack):
    # For 2 classes and linear logits the worst L-inf perturbation is -eps * sign(w_y - w_other) exactly.
    model, x, y = linear_binary
    eps = 0.8
    margin, dw = _binary_margin(model, x, y)
    exact = x - eps * dw.sign()
    x_adv = fgsm(model, x, y, eps) if attack == "fgsm" else pgd(model, x, y, eps, steps=5)
    torch.testing.assert_close(x_adv, exact, rtol=0, atol=1e-6)
    robust = (margin - eps * dw.abs().sum(1) > 0).float().mean()
    assert robust_accuracy(model, partial(fgsm, eps=eps), [(x[:150], y[:150]), (x[150:], y[150:])]) == robust
    assert 0.2 < robust < (model(x).argmax(1) == y).float().mean() - 0.2


def test_pgd_l2_reaches_exact_worst_case_of_linear_binary_model(linear_binary):
    model, x, y = linear_binary
    eps = 0.8
    _, dw = _binary_margin(model, x, y)
    exact = x - eps * dw / dw.norm(dim=1, keepdim=True)
    x_adv = pgd(model, x, y, eps, steps=4, norm="l2", random_start=False)
    torch.testing.assert_close(x_adv, exact, rtol=0, atol=1e-4)


def test_pgd_beats_fgsm_beats_clean_on_trained_mlp(mlp):
    model, x, y = mlp
    eps = 0.5
    gen = torch.Generator().manual_seed(0)
    x_fgsm, x_pgd = fgsm(model, x, y, eps), pgd(model, x, y, eps, steps=20, generator=gen)
    with torch.no_grad():
        clean, l_fgsm, l_pgd = (F.cross_entropy(model(v), y).item() for v in (x, x_fgsm, x_pgd))
    adv = {"clean": x, "fgsm": x_fgsm, "pgd": x_pgd}
    acc = {k: (model(v).argmax(1) == y).float().mean().item() for k, v in adv.items()}
    assert l_pgd >= l_fgsm > clean
    assert acc["clean"] > 0.95
    assert acc["pgd"] <= acc["fgsm"] < acc["clean"] - 0.2


def test_targeted_fgsm_moves_towards_target(mlp):
    model, x, y = mlp
    target = (y + 1) % 3
    x_adv = fgsm(model, x, target, 0.5, targeted=True)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), target) < F.cross_entropy(model(x), target) - 0.5


@pytest.mark.parametrize("norm,p", [("l2", 2.0), ("linf", 1.0)])
def test_trust_region_matches_exact_minimal_perturbation_of_linear_model(linear_multiclass, norm, p):
    # Distance to the nearest boundary of a linear classifier: min_j (f_y - f_j) / ||w_y - w_j||_dual.
    model, x, y = linear_multiclass
    with torch.no_grad():
        logits = model(x)
        margins = logits.gather(1, y[:, None]) - logits
        dual = (model.weight[y][:, None, :] - model.weight[None]).norm(p=p, dim=2)
        minimal = (margins / dual).scatter(1, y[:, None], float("inf")).amin(1)
    correct = logits.argmax(1) == y
    assert correct.float().mean() > 0.9
    x_adv = trust_region(model, x, y, norm=norm)
    fooled = model(x_adv).argmax(1) != y
    assert fooled[correct].all()
    dist = (x_adv - x).norm(p=2 if norm == "l2" else float("inf"), dim=1)
    ratio = dist[correct] / minimal[correct]
    assert ratio.min() >= 1.0 - 1e-4
    assert ratio.max() <= 1.03  # the 2% overshoot
    torch.testing.assert_close(x_adv[~correct], x[~correct], rtol=0, atol=0)


def test_trust_region_close_to_smallest_pgd_radius_on_mlp(mlp):
    # Reference: per sample, the smallest radius on a grid (step 0.1) at which a strong L2 PGD fools it, an
    # upper bound on the minimal perturbation. Full linearised (DeepFool-like) steps give ~1.3x on this model.
    model, x, y = mlp
    x, y = x[:100], y[:100]
    correct = model(x).argmax(1) == y
    smallest = torch.full((len(y),), float("inf"))
    for eps in torch.arange(4.0, 0.0, -0.1).tolist():
        x_adv = pgd(model, x, y, eps, steps=20, step_size=eps / 8, norm="l2", random_start=False)
        smallest[model(x_adv).argmax(1) != y] = eps
    x_tr = trust_region(model, x, y, norm="l2")
    fooled = (model(x_tr).argmax(1) != y) & correct
    assert fooled.sum() == correct.sum() > 90
    assert smallest[correct].isfinite().all()
    ratio = (x_tr - x).norm(dim=1)[correct].mean() / smallest[correct].mean()
    assert 0.8 < ratio < 1.1


def test_trust_region_respects_eps_and_clamp(mlp):
    model, x, y = mlp
    lo, hi = x.min().item(), x.max().item()
    for norm in ("linf", "l2"):
        eps = 0.3 if norm == "linf" else 0.8
        x_adv = trust_region(model, x, y, eps, norm=norm, clamp=(lo, hi))
        dist = (x_adv - x).norm(p=float("inf") if norm == "linf" else 2, dim=1)
        assert dist.max() <= eps + 1e-6
        assert x_adv.min() >= lo and x_adv.max() <= hi
        bounded = attack_success_rate(model, x_adv, y, x=x)
        unbounded = attack_success_rate(model, trust_region(model, x, y, norm=norm), y, x=x)
        assert 0.05 < bounded < unbounded == 1.0


def test_trust_region_stops_cleanly_when_every_direction_is_blocked():
    # Class 1 wins only for larger x, but x already sits at the top of the valid range: no step is possible.
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
        model.bias.copy_(torch.tensor([10.0, 0.0]))
    x, y = torch.ones(4, 3), torch.zeros(4, dtype=torch.int64)
    for norm in ("linf", "l2"):
        x_adv = trust_region(model, x, y, norm=norm, clamp=(-1.0, 1.0), max_iter=5)
        assert torch.equal(x_adv, x)
    x_adv = trust_region(model, x, y, norm="l2", clamp=(-1.0, 4.0))  # with room above, the attack succeeds
    assert (model(x_adv).argmax(1) == 1).all() and x_adv.max() <= 4.0


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
        nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )
    model(torch.randn(32, 10))  # non-trivial running statistics
    model[5].eval()  # a frozen BatchNorm inside a training model keeps its own flag
    return model


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_leaves_no_trace(name):
    model = _bn_model()
    flags = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].weight.grad = torch.randn_like(model[0].weight)
    grad_before = model[0].weight.grad.clone()
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    x_adv = ATTACKS[name](model, x, y)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(model[0].weight.grad, grad_before)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    # Eval mode during the attack: the result equals that on an eval-mode copy (dropout off, running stats).
    model.eval()
    torch.manual_seed(1)
    torch.testing.assert_close(ATTACKS[name](model, x, y), x_adv)


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_attack_works_under_no_grad_and_inference_mode(name, mode, mlp):
    model, x, y = mlp
    attack = ATTACKS[name]
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name.startswith("pgd") else {}
    expected = attack(model, x[:20], y[:20], **kwargs)
    if kwargs:
        kwargs["generator"].manual_seed(0)
    with mode():
        xi, yi = x[:20].clone(), y[:20].clone()
        got = attack(model, xi, yi, **kwargs)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, x[:20])


def test_pgd_generator_makes_random_start_reproducible(mlp):
    model, x, y = mlp
    a = pgd(model, x, y, 0.3, steps=2, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, 0.3, steps=2, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, 0.3, steps=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_custom_loss_fn_is_used(mlp):
    model, x, y = mlp
    # Ascending the negated loss is a targeted descent on y: the loss must fall.
    x_adv = pgd(model, x, y, 0.5, steps=10, loss_fn=lambda out, t: -F.cross_entropy(out, t))
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) < F.cross_entropy(model(x), y)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x, y: fgsm(m, x, y, 0.0), "eps"),
        (lambda m, x, y: fgsm(m, x, y, -0.1), "eps"),
        (lambda m, x, y: pgd(m, x, y, float("inf")), "eps"),
        (lambda m, x, y: pgd(m, x, y, 0.1, steps=0), "steps"),
        (lambda m, x, y: pgd(m, x, y, 0.1, step_size=0.0), "step_size"),
        (lambda m, x, y: pgd(m, x, y, 0.1, norm="l1"), "norm"),
        (lambda m, x, y: trust_region(m, x, y, norm="L2"), "norm"),
        (lambda m, x, y: trust_region(m, x, y, -1.0), "eps"),
        (lambda m, x, y: trust_region(m, x, y, num_classes_considered=0), "num_classes_considered"),
        (lambda m, x, y: trust_region(m, x, y, grow=0.5), "grow"),
        (lambda m, x, y: trust_region(m, x, y, shrink=1.0), "shrink"),
        (lambda m, x, y: fgsm(m, x, y, 0.1, clamp=(1.0, 0.0)), "clamp"),
        (lambda m, x, y: fgsm(m, x, y, 0.1, clamp=(0.0, 1.0)), "clamp"),  # x is not inside [0, 1]
        (lambda m, x, y: fgsm(m, x, y.float(), 0.1), "y"),
        (lambda m, x, y: fgsm(m, x[0], y, 0.1), "x"),
        (lambda m, x, y: perturbation_norm(x, x, "l3"), "norm"),
        (lambda m, x, y: robust_accuracy(m, partial(fgsm, eps=0.1), []), "batches"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(mlp, call, match):
    model, x, y = mlp
    with pytest.raises(ValueError, match=match):
        call(model, x[:4], y[:4])


def test_metrics_against_hand_computed_values():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])  # sample 2 is misclassified already
    x_adv = torch.tensor([[2.0, 3.0], [0.0, 3.0], [1.0, 0.0], [4.0, 1.0]])
    assert attack_success_rate(model, x_adv, y).item() == pytest.approx(3 / 4)
    assert attack_success_rate(model, x_adv, y, x=x).item() == pytest.approx(2 / 3)
    pn = perturbation_norm(x, x_adv, "l2")
    assert pn.absolute.item() == pytest.approx((3 + 0 + 0 + 4) / 4)
    assert pn.relative.item() == pytest.approx((3 / 2 + 0 + 0 + 4) / 4)
    pn = perturbation_norm(x, x_adv, "linf", mask=torch.tensor([True, False, False, True]))
    assert pn.absolute.item() == pytest.approx(3.5)
    assert pn.relative.item() == pytest.approx((3 / 2 + 4) / 2)


def test_per_channel_clamp_keeps_each_channel_in_its_own_pixel_range():
    # standardised RGB-like data: each channel's valid range is ((0 - mean_c) / std_c, (1 - mean_c) / std_c)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(32, 3, 4, 4, generator=g)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0.0, 1.0  # every channel at both ends of its range
    x = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # float32 rounding: a few ulps off the bounds
    y = torch.randint(0, 3, (32,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    clamp = (((0 - mean) / std).double().tolist(), ((1 - mean) / std).double().tolist())
    for attack in (partial(fgsm, eps=0.4), partial(pgd, eps=0.4, steps=3), partial(trust_region, eps=0.4)):
        back = attack(model, x, y, clamp=clamp) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
        assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6  # the union of the channels' ranges would not hold
    scalar = fgsm(model, x, y, 0.4, clamp=(min(clamp[0]), max(clamp[1]))) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert scalar.min() < -0.01 or scalar.max() > 1.01
    with pytest.raises(ValueError, match=r"clamp holds 2 per-channel bounds but x .* has 3 channels"):
        fgsm(model, x, y, 0.4, clamp=([0.0, 0.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="two per-channel sequences of equal length"):
        fgsm(model, x, y, 0.4, clamp=([0.0, 0.0, 0.0], [1.0, 1.0]))
    with pytest.raises(ValueError, match="outside it"):  # more than rounding outside still fails
        fgsm(model, x + 1e-3, y, 0.4, clamp=clamp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_results_stay_inside_the_eps_ball(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 3)).to(dtype)
    x, y = (torch.randn(64, 16) * 3).to(dtype), torch.randint(0, 3, (64,))
    for norm in ("linf", "l2"):
        attacks = [partial(pgd, steps=3, norm=norm), partial(trust_region, norm=norm, max_iter=3)]
        for attack in attacks + ([fgsm] if norm == "linf" else []):
            delta = (attack(model, x, y, 0.1).double() - x.double()).flatten(1)
            dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
            # measured in float64 (up to its own rounding): rounding x + delta to bfloat16 went 1.5% past eps before
            assert dist.max() <= 0.1 * (1 + 1e-12)


def test_trust_region_moves_samples_off_an_exact_tie():
    # equal logits: the linearised distance to the boundary is 0, so the first radius was 0 and stayed there
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x, y = torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64)
    for norm in ("linf", "l2"):
        x_adv = trust_region(model, x, y, norm=norm, max_iter=5)
        assert (model(x_adv).argmax(1) == 1).all() and float((x_adv - x).abs().max()) < 1e-3


def test_eps_may_be_a_numpy_scalar(mlp):
    model, x, y = mlp
    torch.testing.assert_close(fgsm(model, x[:8], y[:8], np.float32(0.25)), fgsm(model, x[:8], y[:8], 0.25))
