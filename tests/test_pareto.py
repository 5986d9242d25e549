"""pareto_frontier(..., "all"): the exact non-dominated set, against brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from lightning_hessian.quant.allocation import InfeasibleBudgetError, allocation_total, pareto_frontier


def instance(seed: int, num_layers: int = 8, bits: tuple[int, ...] = (2, 4, 8), ties: bool = False,
             monotone: bool = True):
    """Random layers: sizes ``params * b`` (integers, so many allocations share a cost), BOPS ``macs * b * b``, a
    latency with repeated values, and log-normal sensitivities (decreasing in bits unless ``monotone=False``)."""
    rng = random.Random(seed)
    layers = [f"layer{i}" for i in range(num_layers)]
    sens, size, bops, latency = {}, {}, {}, {}
    for name in layers:
        trace, params, macs = rng.lognormvariate(0, 2), rng.choice([64, 128, 256, 512]), rng.randint(1_000, 100_000)
        if monotone:
            sens[name] = {b: trace * 4.0**-b * rng.uniform(0.5, 1.5) for b in bits}
        else:
            sens[name] = {b: rng.uniform(0, 1) for b in bits}
        size[name] = {b: float(params * b) for b in bits}
        bops[name] = {b: float(macs * b * b) for b in bits}
        latency[name] = {b: float(rng.choice([1, 2, 3])) for b in bits}
    groups = [[name] for name in layers]
    if ties:  # two tie groups of two and three layers
        groups = [layers[0:2], layers[2:5]] + [[name] for name in layers[5:]]
    return sens, {"size": size, "bops": bops, "latency": latency}, groups


def brute_force(sens, costs, resource, groups, budgets=None):
    """The non-dominated (cost, sensitivity) values of every allocation (one width per group) within ``budgets``:
    all of them enumerated, each compared with every other."""
    budgets = budgets or {}
    bits = sorted(next(iter(sens.values())))
    picks = np.array(list(itertools.product(range(len(bits)), repeat=len(groups))))  # allocations x groups

    def totals(table):
        per_group = np.array([[sum(table[layer][b] for layer in group) for b in bits] for group in groups])
        return per_group[np.arange(len(groups)), picks].sum(axis=1)

    feasible = np.ones(len(picks), dtype=bool)
    for r, b in budgets.items():
        feasible &= totals(costs[r]) <= b
    cost, total = totals(costs[resource])[feasible], totals(sens)[feasible]
    no_worse = (cost[None, :] <= cost[:, None]) & (total[None, :] <= total[:, None])  # [i, j]: j is no worse than i
    better = (cost[None, :] < cost[:, None]) | (total[None, :] < total[:, None])
    dominated = (no_worse & better).any(axis=1)
    return sorted(set(zip(cost[~dominated].tolist(), total[~dominated].tolist())))


def check_frontier(points, expected, sens, costs, resource, groups, budgets=None):
    assert len(points) == len(expected)
    for point, (cost, total) in zip(points, expected):
        assert point.budget == pytest.approx(cost, rel=1e-12)
        assert point.objective == pytest.approx(total, rel=1e-12)
        assert point.budget == allocation_total(costs[resource], point.allocation)  # the point is its allocation's
        assert point.objective == allocation_total(sens, point.allocation)
        assert list(point.allocation) == list(sens)
        for group in groups:
            assert len({point.allocation[layer] for layer in group}) == 1
        for r, b in (budgets or {}).items():
            assert allocation_total(costs[r], point.allocation) <= b


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("resource", ["size", "bops", "latency"])
def test_exact_frontier_equals_brute_force(seed, resource):
    sens, costs, groups = instance(seed, monotone=seed % 2 == 0)
    points = pareto_frontier(sens, costs, resource, "all")
    check_frontier(points, brute_force(sens, costs, resource, groups), sens, costs, resource, groups)
    assert len(points) > 3
    assert [p.budget for p in points] == sorted(p.budget for p in points)
    assert all(a.objective > b.objective for a, b in zip(points, points[1:]))


@pytest.mark.parametrize("seed", range(3))
def test_exact_frontier_with_ties_and_a_fixed_budget(seed):
    sens, costs, groups = instance(10 + seed, ties=True)
    ties = [g for g in groups if len(g) > 1]
    points = pareto_frontier(sens, costs, "size", "all", ties=ties)
    check_frontier(points, brute_force(sens, costs, "size", groups), sens, costs, "size", groups)
    lo, hi = (sum(f(t.values()) for t in costs["bops"].values()) for f in (min, max))
    for fixed in ({"bops": lo + 0.4 * (hi - lo)}, {"bops": lo + 0.6 * (hi - lo), "latency": 14.0}):
        points = pareto_frontier(sens, costs, "size", "all", budgets=fixed, ties=ties)
        check_frontier(points, brute_force(sens, costs, "size", groups, fixed), sens, costs, "size", groups, fixed)


def test_exact_frontier_points_are_the_sweep_optima():
    """Each frontier point is what the MIP finds at its own cost as the budget, and the cheapest point is the
    all-min-bits allocation."""
    sens, costs, _ = instance(3)
    points = pareto_frontier(sens, costs, "size", "all")
    assert points[0].allocation == dict.fromkeys(sens, 2)
    assert points[-1].objective == min(allocation_total(sens, p.allocation) for p in points)
    for point in points[:: max(1, len(points) // 5)]:
        swept = pareto_frontier(sens, costs, "size", [point.budget])[0]
        assert swept.objective == pytest.approx(point.objective, rel=1e-9)


def test_exact_frontier_duplicate_layers_keep_one_allocation_per_point():
    """Two identical layers: (2, 8) and (8, 2) reach the same point; one allocation stands for it."""
    table = {2: 1.0, 8: 0.1}
    sens = {"a": table, "b": dict(table)}
    costs = {"size": {"a": {2: 2.0, 8: 8.0}, "b": {2: 2.0, 8: 8.0}}}
    points = pareto_frontier(sens, costs, "size", "all")
    assert [(p.budget, p.objective) for p in points] == [(4.0, 2.0), (10.0, 1.1), (16.0, 0.2)]
    assert points[1].allocation == {"a": 2, "b": 8}  # the first in enumeration order (earlier groups narrower)


def test_exact_frontier_errors():
    sens, costs, _ = instance(0)
    with pytest.raises(ValueError, match="use 'all'"):
        pareto_frontier(sens, costs, "size", "every")
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable"):
        pareto_frontier(sens, costs, "size", "all", budgets={"bops": 1.0})
    one = {"l": {2: 1.0, 8: 0.0}}
    opposed = {"size": {"l": {2: 2.0, 8: 8.0}}, "latency": {"l": {2: 5.0, 8: 1.0}}, "bops": {"l": {2: 4.0, 8: 64.0}}}
    with pytest.raises(InfeasibleBudgetError, match="not all together"):  # each budget alone can be met
        pareto_frontier(one, opposed, "bops", "all", budgets={"size": 2.0, "latency": 1.0})
    with pytest.raises(ValueError, match="max_states=4"):
        pareto_frontier(sens, costs, "size", "all", max_states=4)
    with pytest.raises(ValueError, match="max_states"):
        pareto_frontier(sens, costs, "size", "all", max_states=0)
    with pytest.raises(TypeError, match="'all'"):
        pareto_frontier(sens, costs, "size", 2.5)


def test_exact_frontier_scales_to_a_resnet_sized_table():
    """52 layers x 3 widths (ResNet-50's conv count): thousands of points, each checked against its neighbours."""
    sens, costs, _ = instance(7, num_layers=52)
    points = pareto_frontier(sens, costs, "size", "all")
    assert len(points) > 100
    assert all(a.budget < b.budget and a.objective > b.objective for a, b in zip(points, points[1:]))
    assert math.isclose(points[-1].objective, sum(min(t.values()) for t in sens.values()), rel_tol=1e-12)
