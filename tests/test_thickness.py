"""Boundary thickness against exact references: the closed form of a two-class linear softmax model, a fine
brute-force integral along the same segments on an MLP, and the metric against the function."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_hessian.attacks import BoundaryThickness, boundary_thickness, pgd, targeted_log_odds
from tests.conftest import fit_full_batch


def _linear_two_class(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A float64 linear softmax model on (N, 3, 4) inputs, and its weight difference w = W_0 - W_1."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).double()
    w = (model[1].weight[0] - model[1].weight[1]).detach()
    return model, w


def _far_from_boundary(model: nn.Module, n: int, min_gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples whose logit gap |z_0 - z_1| exceeds ``min_gap``, labelled by the model's prediction."""
    x = torch.randn(20 * n, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        logits = model(x)
    far = (logits[:, 0] - logits[:, 1]).abs() > min_gap
    x = x[far][:n]
    assert len(x) == n
    return x, model(x).argmax(1)


def test_paper_band_is_ln7_of_the_logit_gap():
    # p_i - p_j = tanh(z / 2) for the logit gap z of two classes: 0 < tanh(z / 2) < 0.75 is 0 < z < ln 7
    assert math.isclose(2 * math.atanh(0.75), math.log(7))


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.75), (-0.5, 0.5), (0.2, 0.9)])
@pytest.mark.parametrize("num_points", [16, 128])
def test_two_class_linear_model_matches_the_closed_form(alpha, beta, num_points):
    """Along w the gap z changes at rate ||w||, so the band 2 atanh(alpha) < z < 2 atanh(beta) is
    2 (atanh(beta) - atanh(alpha)) / ||w|| long (ln 7 / ||w|| for the paper's band); the midpoint rule is off
    by at most one cell, ||x' - x|| / num_points."""
    model, w = _linear_two_class()
    x, y = _far_from_boundary(model, 40, min_gap=2 * math.atanh(0.9) + 0.5, seed=1)
    eps = 12.0  # far enough to cross the whole band: the segment runs on to z < 2 atanh(-0.5) from every x
    result = boundary_thickness(model, x, y, eps, alpha=alpha, beta=beta, steps=30, num_points=num_points)
    exact = 2 * (math.atanh(beta) - math.atanh(alpha)) / w.norm().item()
    assert bool(result.reached.all())
    # the discrete reference: the gap at each midpoint of the segment x -> x - eps w / ||w|| (class 0; + for class 1)
    gap = (model(x)[:, 0] - model(x)[:, 1]).detach()
    t = (torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points
    margin = torch.where(y == 0, 1.0, -1.0)[:, None] * gap[:, None] - t * eps * w.norm()
    inside = (margin > 2 * math.atanh(alpha)) & (margin < 2 * math.atanh(beta))
    assert torch.allclose(result.per_sample, eps * inside.double().mean(1), rtol=1e-12, atol=0)
    error = (result.per_sample - exact).abs()
    assert error.max().item() <= eps / num_points + 1e-9, (error.max(), eps / num_points)
    if num_points == 128:  # and it is not trivially right: the midpoint rule does not hit the value exactly
        assert error.max().item() > 0
    assert result.mean.item() == pytest.approx(result.per_sample.mean().item())
    assert result.std_error.item() == pytest.approx(result.per_sample.std().item() / math.sqrt(40))


def test_segment_runs_along_the_weight_difference_to_the_ball():
    """Targeted L2 PGD on a linear model steps along -/+ w from x itself (no random start): x' = x -/+ eps w/||w||,
    so a shifted copy of the model (same w, other bias) gives the same thickness."""
    model, w = _linear_two_class()
    x, y = _far_from_boundary(model, 10, min_gap=3.0, seed=2)
    x_adv = pgd(model, x, 1 - y, 5.0, steps=20, norm="l2", random_start=False, targeted=True)
    sign = torch.where(y == 0, -1.0, 1.0).double()
    expected = x + 5.0 * sign[:, None, None] * (w / w.norm()).view(3, 4)
    assert torch.allclose(x_adv, expected, atol=1e-9)


def _brute_force(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                 alpha: float, beta: float, points: int = 20001) -> tuple[torch.Tensor, torch.Tensor]:
    """The thickness on a fine grid including both ends, and the number of band intervals along each segment."""
    t = torch.linspace(0, 1, points, dtype=x.dtype)
    with torch.no_grad():
        lengths, intervals = [], []
        for k in range(len(x)):
            line = x[k] + t[:, None] * (x_adv[k] - x[k])
            p = model(line).softmax(1)
            inside = (p[:, i[k]] - p[:, j[k]] > alpha) & (p[:, i[k]] - p[:, j[k]] < beta)
            lengths.append(inside.double().mean() * (x_adv[k] - x[k]).norm())
            intervals.append(int(inside[0]) + int((inside[1:] & ~inside[:-1]).sum()))
    return torch.stack(lengths), torch.tensor(intervals)


@pytest.fixture(scope="module")
def mlp_data():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 10, generator=g) * 2
    y = torch.randint(0, 4, (200,), generator=g)
    x = (centres[y] + torch.randn(200, 10, generator=g)).clamp(-4, 4).double()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    return fit_full_batch(model, x, y, 200).eval(), x[:24], y[:24]


def test_mlp_matches_a_fine_brute_force_integral_along_the_same_segments(mlp_data):
    model, x, y = mlp_data
    targets = (y + 1 + torch.arange(len(y)) % 3) % 4
    result = boundary_thickness(model, x, y, 3.0, targets=targets, num_points=64, clamp=(-4.0, 4.0))
    x_adv = pgd(model, x, targets, 3.0, steps=20, norm="l2", random_start=False, clamp=(-4.0, 4.0), targeted=True)
    assert x_adv.abs().max() <= 4.0
    exact, intervals = _brute_force(model, x, x_adv, y, targets, 0.0, 0.75)
    length = (x_adv - x).flatten(1).norm(dim=1)
    bound = intervals * length / 64 + length / 20000  # one midpoint cell per band interval, plus the grid's own
    assert bool(((result.per_sample - exact).abs() <= bound).all()), (result.per_sample - exact, bound)
    assert result.per_sample.max() > 0.1 and bool(result.reached.any())
    with torch.no_grad():
        assert torch.equal(result.reached, model(x_adv).argmax(1) == targets)


def test_log_odds_steps_are_the_cross_entropys_steps(mlp_data):
    """The cross-entropy of j is softplus of the log-odds against j: the same normalised L2 steps."""
    model, x, y = mlp_data
    targets = (y + 1) % 4
    kwargs = dict(steps=10, norm="l2", random_start=False, clamp=(-4.0, 4.0), targeted=True)
    with_log_odds = pgd(model, x, targets, 3.0, loss_fn=targeted_log_odds, **kwargs)
    assert torch.allclose(with_log_odds, pgd(model, x, targets, 3.0, **kwargs), atol=1e-9, rtol=0)


def test_float32_segments_keep_their_direction_where_the_cross_entropy_saturates():
    """A linear model with large weights: past the boundary the other classes hold < 1e-7, so the float32
    cross-entropy gradient p - e_j loses its j entry (p_j - 1 rounds to 0) and its steps go astray; the log-odds
    steps stay with the float64 reference, and so does the thickness."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.mul_(8)
    model64 = nn.Linear(6, 3).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    i = model(x).argmax(1).detach()
    targets = (i + 1) % 3
    kwargs = dict(steps=20, norm="l2", random_start=False, targeted=True)
    reference = pgd(model64, x.double(), targets, 6.0, loss_fn=targeted_log_odds, **kwargs)
    log_odds = pgd(model, x, targets, 6.0, loss_fn=targeted_log_odds, **kwargs)
    cross_entropy = pgd(model, x, targets, 6.0, **kwargs)
    assert (log_odds.double() - reference).norm(dim=1).max() < 1e-4
    assert (cross_entropy.double() - reference).norm(dim=1).max() > 1.0  # what the float32 cross-entropy does
    float32 = boundary_thickness(model, x, i, 6.0, targets=targets)
    float64 = boundary_thickness(model64, x.double(), i, 6.0, targets=targets)
    assert torch.allclose(float32.per_sample.double(), float64.per_sample, atol=1e-5, rtol=0)
    assert float64.per_sample.min() > 0


def test_targets_are_seeded_and_drawn_among_the_other_classes(mlp_data):
    model, x, y = mlp_data
    a = boundary_thickness(model, x, y, 2.0, num_points=8, generator=torch.Generator().manual_seed(5))
    b = boundary_thickness(model, x, y, 2.0, num_points=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.per_sample, b.per_sample)
    offsets = torch.randint(1, 4, y.shape, generator=torch.Generator().manual_seed(5))  # the documented draw
    explicit = boundary_thickness(model, x, y, 2.0, num_points=8, targets=(y + offsets) % 4)
    assert torch.equal(a.per_sample, explicit.per_sample)
    rng_state = torch.get_rng_state()
    boundary_thickness(model, x, y, 2.0, num_points=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), rng_state)  # a generator given: the global stream is untouched


def test_any_shape_leaves_no_trace_and_runs_under_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU(), nn.Flatten(),
                          nn.Linear(24, 3))
    model[1].running_mean.fill_(0.3)
    model.train()
    model[1].eval()  # a mixed mode the caller chose must come back as it was
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(5, 2, 8), torch.tensor([0, 1, 2, 0, 1])
    with torch.inference_mode():
        result = boundary_thickness(model, x, y, 1.0, steps=3, num_points=10, clamp=(0.0, 1.0))
    assert result.per_sample.shape == (5,) and bool((result.per_sample <= 1.0 + 1e-6).all())
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True]
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():  # eval mode: the dropout layer is off, so the result is deterministic
        again = boundary_thickness(model, x, y, 1.0, steps=3, num_points=10, clamp=(0.0, 1.0),
                                   targets=(y + 1) % 3)
    assert torch.equal(again.per_sample, boundary_thickness(model, x, y, 1.0, steps=3, num_points=10,
                                                            clamp=(0.0, 1.0), targets=(y + 1) % 3).per_sample)


def test_one_sample_has_no_standard_error():
    model, _ = _linear_two_class()
    x, y = _far_from_boundary(model, 1, min_gap=3.0, seed=4)
    result = boundary_thickness(model, x, y, 12.0)
    assert math.isnan(result.std_error.item()) and result.per_sample.item() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": 0.0}, "eps"), ({"alpha": 0.8}, "alpha < beta"), ({"beta": 1.5}, "beta"), ({"num_points": 0}, "num_points"),
    ({"steps": 0}, "steps"), ({"targets": torch.tensor([1, 1, 0])}, "targets"), ({"y": torch.tensor([0, 3, 1])}, "y"),
    ({"clamp": (0.5, 1.0)}, "clamp"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    args = {"x": torch.rand(3, 4), "y": torch.tensor([1, 2, 0]), "eps": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        boundary_thickness(model, args.pop("x"), args.pop("y"), args.pop("eps"), **args)


def test_a_model_without_two_logits_is_refused():
    with pytest.raises(ValueError, match="logits of shape"):
        boundary_thickness(nn.Linear(4, 1), torch.rand(3, 4), torch.zeros(3, dtype=torch.long), 1.0)


def test_metric_over_batches_equals_the_function_on_their_union(mlp_data):
    model, x, y = mlp_data
    targets = (y + 1 + torch.arange(len(y)) % 3) % 4
    whole = boundary_thickness(model, x, y, 2.0, targets=targets, num_points=32)
    metric = BoundaryThickness(2.0, num_points=32)
    for part in (slice(0, 10), slice(10, 11), slice(11, 24)):
        metric.update(model, x[part], y[part], targets[part])
    stats = metric.compute()
    assert stats.mean.dtype == torch.float64
    assert stats.mean.item() == pytest.approx(whole.mean.item(), rel=1e-12)
    assert stats.std_error.item() == pytest.approx(whole.std_error.item(), rel=1e-9)
    assert stats.reached.item() == pytest.approx(whole.reached.double().mean().item())
    metric.reset()
    metric.update(model, x[:1], y[:1], targets[:1])
    assert metric.compute().mean.item() == pytest.approx(whole.per_sample[0].item())
    assert math.isnan(metric.compute().std_error.item())
    with pytest.raises(ValueError, match="alpha < beta"):
        BoundaryThickness(1.0, alpha=0.5, beta=0.5)


def test_metric_without_classes_measures_around_the_predictions(mlp_data):
    _, x, y = mlp_data
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).double()  # untrained: often wrong
    predicted = model(x).argmax(1).detach()
    assert (predicted != y).any()
    metric = BoundaryThickness(2.0, num_points=32, seed=7)
    metric.update(model, x)
    expected = boundary_thickness(model, x, predicted, 2.0, num_points=32, generator=torch.Generator().manual_seed(7))
    assert metric.compute().mean.item() == pytest.approx(expected.mean.item(), rel=1e-12)
