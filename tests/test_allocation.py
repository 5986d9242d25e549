"""allocate_bits / pareto_frontier against brute-force enumeration, and their input errors."""

from __future__ import annotations

import math
import random

import pytest
from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from lightning_hessian.quant.allocation import (
    CPSAT_RESOLUTION,
    InfeasibleBudgetError,
    NotProvenOptimalWarning,
    allocate_bits,
    allocation_total,
    pareto_frontier,
)
from tests.helpers.allocation import best_allocation

RESOURCES = ("size", "bops", "latency")


def random_instance(seed: int, num_layers: int, num_budgets: int, max_configs: int = 600_000, sigma: float = 2.0):
    """Layers in disjoint tie groups with random candidates; costs grow with bits, sensitivity shrinks.

    Layer traces are log-normal with ``sigma`` (HAWQ sensitivities span orders of magnitude).
    Returns (sensitivity, costs, budgets, ties, groups) with budgets a random fraction of the way
    from the cheapest to the dearest cost of each resource.
    """
    rng = random.Random(seed)
    layers = [f"layer{i}" for i in range(num_layers)]
    groups, i = [], 0
    while i < num_layers:
        size = rng.choice([1, 1, 1, 2, 3])
        groups.append(layers[i : i + size])
        i += size
    sens, costs, configs = {}, {r: {} for r in RESOURCES[:num_budgets]}, 1
    for group in groups:
        k = 2 if configs * 3 > max_configs else rng.choice([2, 3, 3, 4])
        configs *= k
        bits = sorted(rng.sample([2, 3, 4, 5, 6, 8], k))
        for layer in group:
            trace, params, macs = rng.lognormvariate(0, sigma), rng.randint(100, 50_000), rng.randint(1_000, 1_000_000)
            sens[layer] = {b: trace * 4.0**-b * rng.uniform(0.5, 1.5) for b in bits}
            table = {
                "size": {b: float(params * b) for b in bits},
                "bops": {b: float(macs * b * b) for b in bits},
                "latency": {b: rng.uniform(0.1, 1.0) * b for b in bits},
            }
            for r in costs:
                costs[r][layer] = table[r]
    budgets = {}
    for r, per_layer in costs.items():
        lo = sum(min(per_layer[layer][b] for b in sens[g[0]]) for g in groups for layer in g)
        hi = sum(max(per_layer[layer][b] for b in sens[g[0]]) for g in groups for layer in g)
        budgets[r] = lo + rng.uniform(0.2, 0.8) * (hi - lo)
    ties = [tuple(g) for g in groups if len(g) > 1]
    return sens, costs, budgets, ties, groups


def assert_valid(allocation, sens, costs, budgets, ties):
    assert list(allocation) == list(sens)
    for layer, bits in allocation.items():
        assert bits in sens[layer]
    for tie in ties:
        assert len({allocation[layer] for layer in tie}) == 1
    for r, b in budgets.items():
        assert allocation_total(costs[r], allocation) <= b * (1 + 1e-9)


CASES = [(seed, 12 + seed % 9, 1 + seed % 3) for seed in range(12)]


@pytest.mark.parametrize("solver", ["cbc", "scip"])
@pytest.mark.parametrize("seed,num_layers,num_budgets", CASES)
def test_mip_matches_brute_force(solver, seed, num_layers, num_budgets):
    sens, costs, budgets, ties, groups = random_instance(seed, num_layers, num_budgets)
    best, _ = best_allocation(sens, costs, budgets, groups)
    allocation = allocate_bits(sens, costs, budgets, ties=ties, solver=solver)
    assert_valid(allocation, sens, costs, budgets, ties)
    assert allocation_total(sens, allocation) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("solver", ["cbc", "scip"])
@pytest.mark.parametrize("seed", range(4))
def test_mip_exact_when_sensitivities_span_many_orders(solver, seed):
    # Small layers' differences fall far below the solvers' absolute tolerances unless the objective is scaled.
    sens, costs, budgets, ties, groups = random_instance(100 + seed, 14, 1 + seed % 3, sigma=6.0)
    best, _ = best_allocation(sens, costs, budgets, groups)
    allocation = allocate_bits(sens, costs, budgets, ties=ties, solver=solver)
    assert_valid(allocation, sens, costs, budgets, ties)
    assert allocation_total(sens, allocation) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed,num_layers,num_budgets", CASES)
def test_cpsat_within_documented_resolution(seed, num_layers, num_budgets):
    sens, costs, budgets, ties, groups = random_instance(seed, num_layers, num_budgets)
    allocation = allocate_bits(sens, costs, budgets, ties=ties, solver="cp-sat")
    assert_valid(allocation, sens, costs, budgets, ties)
    # Guarantee: the budgets exactly, and an objective at most G * S / R above the optimum.
    G = len(groups)
    spread = sum(max(sum(sens[layer][b] for layer in g) for b in sens[g[0]]) -
                 min(sum(sens[layer][b] for layer in g) for b in sens[g[0]]) for g in groups)
    best, _ = best_allocation(sens, costs, budgets, groups)
    objective = allocation_total(sens, allocation)
    assert best * (1 - 1e-9) <= objective <= best + G * spread / CPSAT_RESOLUTION
    # At this resolution the documented guarantee means the exact optimum on these instances.
    assert objective == pytest.approx(best, rel=1e-9)


def test_budget_exactly_at_optimum_boundary_is_feasible():
    sens, costs, _, ties, groups = random_instance(3, 14, 2)
    target = {layer: min(sens[g[0]]) for g in groups for layer in g}  # every layer at its fewest bits
    budgets = {r: allocation_total(costs[r], target) for r in costs}
    for solver in ("cbc", "scip", "cp-sat"):
        assert allocate_bits(sens, costs, budgets, ties=ties, solver=solver) == target


@pytest.mark.parametrize("solver", ["cbc", "scip", "cp-sat"])
def test_budgets_spent_exactly_by_resources_that_pull_apart(solver):
    """Size grows with bits, a latency table falls: budgets equal to one allocation's costs are met exactly
    (CP-SAT rounded costs up and called 51 of 400 such instances infeasible)."""
    rng = random.Random(1)
    for _ in range(40):
        layers = [f"l{i}" for i in range(rng.randint(3, 6))]
        sens = {layer: {b: rng.uniform(0, 1) * 4.0**-b for b in (2, 4, 8)} for layer in layers}
        costs = {"size": {layer: {b: rng.uniform(0.5, 1.5) * b * 1000.123 for b in (2, 4, 8)} for layer in layers},
                 "latency": {layer: {b: rng.uniform(0.5, 1.5) / b for b in (2, 4, 8)} for layer in layers}}
        target = {layer: rng.choice((2, 4, 8)) for layer in layers}
        budgets = {r: allocation_total(costs[r], target) for r in costs}
        # the budgets are the target's costs summed in one order: other orders may be an ulp above
        ulp = {r: -1e-12 * b for r, b in budgets.items()}
        best, _ = best_allocation(sens, costs, budgets, [[layer] for layer in layers], ulp)
        allocation = allocate_bits(sens, costs, budgets, solver=solver)
        assert_valid(allocation, sens, costs, budgets, ())
        assert allocation_total(sens, allocation) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_cpsat_exact_with_integer_costs_beyond_its_resolution(seed):
    """BOPS are integers spanning more than 1e9 (ResNet-20: 2.4e9): CP-SAT uses them as they are, so a budget
    spent exactly stays reachable (rounded up, CP-SAT gave plans up to 13% worse)."""
    rng = random.Random(seed)
    layers = [f"l{i}" for i in range(8)]
    macs = {layer: rng.randint(10**6, 10**8) for layer in layers}
    sens = {layer: {b: rng.lognormvariate(0, 2) * 4.0**-b for b in (2, 4, 8)} for layer in layers}
    costs = {"bops": {layer: {b: float(macs[layer] * b * b) for b in (2, 4, 8)} for layer in layers}}
    budgets = {"bops": allocation_total(costs["bops"], dict.fromkeys(layers, 4))}  # HAWQ-V3's all-4-bit budget
    best, _ = best_allocation(sens, costs, budgets, [[layer] for layer in layers])
    allocation = allocate_bits(sens, costs, budgets, solver="cp-sat")
    assert allocation_total(costs["bops"], allocation) <= budgets["bops"]
    assert allocation_total(sens, allocation) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("solver", ["cbc", "scip", "cp-sat"])
def test_one_dear_option_neither_loosens_a_small_budget_nor_hides_its_answer(solver):
    # The slack on a budget is relative to the budget: a 5e7 option elsewhere once let 3 + 1e-6 pass for 3.
    sens = {"a": {4: 1.0, 6: 0.0}, "b": {5: 1.0, 8: 0.0}}
    costs = {"bops": {"a": {4: 0.0, 6: 5e7}, "b": {5: 0.001, 8: 3.000001}}}
    assert allocate_bits(sens, costs, {"bops": 3.0}, solver=solver) == {"a": 4, "b": 5}
    assert allocate_bits(sens, costs, {"bops": 3.000001}, solver=solver) == {"a": 4, "b": 8}
    # Scaled by its dearest option (4e7), a budget of 4.7 sat at CBC's tolerance: CBC overshot, then, with the
    # budget tightened, found nothing. Choices that alone break a budget now leave the rows.
    sens = {"l0": {2: 0.0599, 4: 0.00257, 5: 0.0014, 8: 2.38e-05}, "l3": {2: 0.0846, 4: 0.00521, 5: 0.00173,
            8: 2.36e-05}, "l1": {2: 0.00259, 3: 0.000343, 8: 4.73e-07}, "l2": {3: 0.0319, 4: 0.0192}}
    costs = {"size": {"l0": {2: 1.7028206, 4: 3.9137533, 5: 40844386.84, 8: 3.2045167},
                      "l3": {2: 9953555.23, 4: 0.80927477, 5: 0.0027065349, 8: 0.0072063793},
                      "l1": {2: 0.0013747581, 3: 23987990.6, 8: 1.5286568}, "l2": {3: 0.0029708335, 4: 0.001012972}},
             "bops": {"l0": {2: 16281364.3, 4: 1.3667995, 5: 20506215.7, 8: 49809498.4},
                      "l3": {2: 1.8309147, 4: 2.3230313, 5: 13081728.2, 8: 0.0067121986},
                      "l1": {2: 10893547.3, 3: 0.0015360954, 8: 2.7286276}, "l2": {3: 24253834.8, 4: 39579540.8}}}
    budgets, groups = {"size": 4.74139284780919, "bops": 80084268.99876475}, [["l0", "l3"], ["l1"], ["l2"]]
    best, expected = best_allocation(sens, costs, budgets, groups)
    assert allocate_bits(sens, costs, budgets, ties=[("l3", "l0")], solver=solver) == expected


def test_infeasible_budget_names_each_resource_and_minimum():
    sens, costs, budgets, ties, groups = random_instance(5, 15, 3)
    # Brute force with the resource itself as objective and no budget: its smallest value under the ties.
    minimums = {r: best_allocation(costs[r], costs, {}, groups)[0] for r in costs}
    budgets["size"] = minimums["size"] * 0.99
    with pytest.raises(InfeasibleBudgetError) as info:
        allocate_bits(sens, costs, budgets, ties=ties)
    message = str(info.value)
    for r in costs:
        assert f"{r!r}: smallest achievable {minimums[r]:.12g}" in message
        assert f"budget {budgets[r]:.12g}" in message
    assert info.value.minimums["size"] == pytest.approx(minimums["size"], rel=1e-12)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("solver", ["cbc", "scip", "cp-sat"])
def test_jointly_infeasible_budgets(solver):
    # size <= 5 forces (a, b) = (2, 8) and bops <= 5 forces (8, 2): each alone is met, not both.
    sens = {"a": {2: 1.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}
    costs = {
        "size": {"a": {2: 0.0, 8: 10.0}, "b": {2: 10.0, 8: 0.0}},
        "bops": {"a": {2: 10.0, 8: 0.0}, "b": {2: 0.0, 8: 10.0}},
    }
    with pytest.raises(InfeasibleBudgetError, match="not all together") as info:
        allocate_bits(sens, costs, {"size": 5.0, "bops": 5.0}, solver=solver)
    assert info.value.minimums == {"size": 0.0, "bops": 0.0}


def test_ties_respected_and_change_the_optimum():
    sens = {"a": {4: 10.0, 8: 0.0}, "b": {4: 0.0, 8: 0.0}}
    costs = {"size": {"a": {4: 4.0, 8: 8.0}, "b": {4: 4.0, 8: 8.0}}}
    assert allocate_bits(sens, costs, {"size": 12.0}) == {"a": 8, "b": 4}
    # Tied, 8/8 costs 16 > 12: both must drop to 4 bits.
    assert allocate_bits(sens, costs, {"size": 12.0}, ties=[("a", "b")]) == {"a": 4, "b": 4}
    assert allocate_bits(sens, costs, {"size": 16.0}, ties=[("b", "a")]) == {"a": 8, "b": 8}


def test_result_keeps_the_order_of_sensitivity_with_ties():
    sens = {n: {4: 1.0, 8: 0.0} for n in "abcd"}
    costs = {"size": {n: {4: 4.0, 8: 8.0} for n in "abcd"}}
    bits = allocate_bits(sens, costs, {"size": 24.0}, ties=[("d", "a")])
    assert list(bits) == list("abcd") and bits["a"] == bits["d"]


def test_overlapping_ties_merge():
    sens = {n: {4: 1.0, 8: 0.0} for n in "abc"}
    sens["c"] = {4: 0.0, 8: 0.0}
    costs = {"size": {n: {4: 4.0, 8: 8.0} for n in "abc"}}
    bits = allocate_bits(sens, costs, {"size": 20.0}, ties=[("a", "b"), ("b", "c")])
    assert bits == {"a": 4, "b": 4, "c": 4}  # a,b at 8 alone would fit (20), but c is tied to them


@pytest.mark.parametrize("solver", ["cbc", "scip", "cp-sat"])
def test_time_limit_unproven_warns_and_empty_raises(solver, monkeypatch):
    """Solver statuses at the time limit: feasible-but-unproven warns, nothing found raises."""
    sens, costs, budgets, ties, groups = random_instance(7, 16, 3)
    best, _ = best_allocation(sens, costs, budgets, groups)
    if solver == "cp-sat":
        cls, method, feasible, nothing = cp_model.CpSolver, "solve", cp_model.FEASIBLE, cp_model.UNKNOWN
    else:
        cls, method, feasible, nothing = pywraplp.Solver, "Solve", pywraplp.Solver.FEASIBLE, pywraplp.Solver.NOT_SOLVED
    solve = getattr(cls, method)
    monkeypatch.setattr(cls, method, lambda self, *a: (solve(self, *a), feasible)[1])
    with pytest.warns(NotProvenOptimalWarning, match="time_limit_s=2.5 before proving optimality"):
        allocation = allocate_bits(sens, costs, budgets, ties=ties, solver=solver, time_limit_s=2.5)
    assert_valid(allocation, sens, costs, budgets, ties)
    assert allocation_total(sens, allocation) == pytest.approx(best, rel=1e-9)
    monkeypatch.setattr(cls, method, lambda self, *a: (solve(self, *a), nothing)[1])
    with pytest.raises(TimeoutError, match="no allocation within time_limit_s=2.5"):
        allocate_bits(sens, costs, budgets, ties=ties, solver=solver, time_limit_s=2.5)


def test_over_budget_solver_answer_is_resolved_with_tighter_budget(monkeypatch):
    """An answer over budget (the solver's integrality tolerance) is never returned: the row is tightened."""
    import lightning_hessian.quant.allocation as allocation

    sens, costs, budgets, ties, groups = random_instance(9, 13, 2)
    real, calls = allocation._solve_mip, []

    def sloppy(problem, name, time_limit_s, rhs_cut):
        calls.append(dict(rhs_cut))
        if len(calls) == 1:  # first answer: optimal for budgets 10% too loose
            return real(problem, name, time_limit_s, {r: -0.1 * b for r, b in problem.budgets.items()})
        return real(problem, name, time_limit_s, rhs_cut)

    monkeypatch.setattr(allocation, "_solve_mip", sloppy)
    bits = allocate_bits(sens, costs, budgets, ties=ties)
    assert len(calls) == 2 and calls[0] == {"size": 0.0, "bops": 0.0} and max(calls[1].values()) > 0
    assert_valid(bits, sens, costs, budgets, ties)
    tightened, _ = best_allocation(sens, costs, budgets, groups, slack=calls[1])
    assert allocation_total(sens, bits) == pytest.approx(tightened, rel=1e-9)


def test_pareto_frontier_matches_brute_force_sweep():
    sens, costs, budgets, ties, groups = random_instance(11, 12, 2)
    points = pareto_frontier(sens, costs, "size", 6, budgets={"bops": budgets["bops"]}, ties=ties)
    lo = sum(min(sum(costs["size"][layer][b] for layer in g) for b in sens[g[0]]) for g in groups)
    hi = sum(max(sum(costs["size"][layer][b] for layer in g) for b in sens[g[0]]) for g in groups)
    swept = [p.budget for p in points]
    expected = [lo + (hi - lo) * i / 5 for i in range(6)]
    objectives = []
    for budget, objective, allocation in points:
        best, _ = best_allocation(sens, costs, {"size": budget, "bops": budgets["bops"]}, groups)
        assert objective == pytest.approx(best, rel=1e-9)
        assert allocation_total(costs["size"], allocation) <= budget * (1 + 1e-9)
        objectives.append(objective)
    assert all(b in expected for b in swept) and swept == sorted(swept)
    assert all(x >= y - 1e-12 for x, y in zip(objectives, objectives[1:]))  # more budget, less loss
    # Points infeasible under the fixed bops budget are left out, not reported.
    feasible = [b for b in expected if best_allocation(sens, costs, {"size": b, "bops": budgets["bops"]}, groups)[1]]
    assert swept == feasible


def test_pareto_frontier_explicit_budgets_and_errors():
    sens = {"a": {4: 1.0, 8: 0.0}, "b": {4: 2.0, 8: 0.0}}
    costs = {"size": {"a": {4: 4.0, 8: 8.0}, "b": {4: 4.0, 8: 8.0}}}
    points = pareto_frontier(sens, costs, "size", [4.0, 8.0, 12.0, 16.0])
    assert [(p.budget, p.objective) for p in points] == [(8.0, 3.0), (12.0, 1.0), (16.0, 0.0)]
    assert points[1].allocation == {"a": 4, "b": 8}
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable 8"):
        pareto_frontier(sens, costs, "size", [1.0, 2.0])
    with pytest.raises(ValueError, match="resource='latency'"):
        pareto_frontier(sens, costs, "latency", 5)
    with pytest.raises(ValueError, match="budgets_or_num_points"):
        pareto_frontier(sens, costs, "size", 1)
    with pytest.raises(ValueError, match="budgets_or_num_points is an empty list"):
        pareto_frontier(sens, costs, "size", [])
    with pytest.raises(ValueError, match="swept resource"):
        pareto_frontier(sens, costs, "size", 3, budgets={"size": 10.0})


SENS = {"a": {4: 1.0, 8: 0.0}, "b": {4: 2.0, 8: 0.0}}
COSTS = {"size": {"a": {4: 4.0, 8: 8.0}, "b": {4: 4.0, 8: 8.0}}}


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(ties=[("a", "zzz")]), ValueError, "ties: unknown layer 'zzz'"),
        (dict(ties=("a", "b")), TypeError, "ties must be groups of layer names"),
        (dict(costs={"size": {**COSTS["size"], "c": {4: 1.0}}}), ValueError, r"costs\['size'\]: unknown layer 'c'"),
        (dict(costs={"size": {"a": COSTS["size"]["a"]}}), ValueError, r"costs\['size'\] has no entry for layer 'b'"),
        (dict(costs={"size": {"a": {4: 4.0}, "b": COSTS["size"]["b"]}}), ValueError, r"lacks bit widths \[8\]"),
        (dict(costs={"size": {"a": {4: -1.0, 8: 8.0}, "b": COSTS["size"]["b"]}}), ValueError, r">= 0"),
        (dict(costs={"size": {"a": [4.0, 8.0], "b": COSTS["size"]["b"]}}), TypeError,
         r"costs\['size'\]\['a'\] must map bit widths to costs"),
        (dict(sensitivity={"a": {1: 1.0, 8: 0.0}, "b": SENS["b"]}), ValueError, r"\['a'\] bit width=1 is outside"),
        (dict(sensitivity={"a": {4: 1.0, 16: 0.0}, "b": SENS["b"]}), ValueError, r"bit width=16 is outside .* 2\.\.8"),
        (dict(sensitivity={"a": {4: 1.0, 8.0: 0.0}, "b": SENS["b"]}), TypeError, r"an int in 2\.\.8, got 8\.0"),
        (dict(costs={"size": {"a": {4: 4.0, 8: 8.0, 9: 1.0}, "b": COSTS["size"]["b"]}}), ValueError,
         r"costs\['size'\]\['a'\] bit width=9 is outside"),
        (dict(sensitivity={"a": {4: float("nan"), 8: 0.0}, "b": SENS["b"]}), ValueError, r"sensitivity\['a'\]\[4\]"),
        (dict(sensitivity={}), ValueError, "sensitivity must be a non-empty"),
        (dict(budgets={"size": -1.0}), ValueError, r"budgets\['size'\] must be a number >= 0"),
        (dict(budgets={"latency": 1.0}), ValueError, r"budgets\['latency'\] has no cost table"),
        (dict(solver="glpk"), ValueError, "solver='glpk' is not supported"),
        (dict(time_limit_s=0), ValueError, "time_limit_s must be a positive"),
        (dict(time_limit_s=True), ValueError, "time_limit_s must be a positive"),
        (dict(budgets={"size": True}), ValueError, r"budgets\['size'\] must be a number >= 0"),
        (
            dict(sensitivity={"a": {4: 1.0, 8: 0.0}, "b": {2: 3.0, 4: 2.0, 8: 0.0}}, ties=[("a", "b")],
                 costs={"size": {"a": {4: 4.0, 8: 8.0}, "b": {2: 2.0, 4: 4.0, 8: 8.0}}}),
            ValueError,
            "different candidate bit widths",
        ),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, pattern):
    args = dict(sensitivity=SENS, costs=COSTS, budgets={"size": 12.0})
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        allocate_bits(**args)


def test_unbudgeted_resources_and_infinite_budget_leave_choice_free():
    costs = {**COSTS, "bops": {"a": {4: 1.0, 8: 1e9}, "b": {4: 1.0, 8: 1e9}}}
    assert allocate_bits(SENS, costs, {"size": math.inf}) == {"a": 8, "b": 8}
    assert allocate_bits(SENS, costs, {}, solver="cp-sat") == {"a": 8, "b": 8}


@pytest.mark.parametrize("solver", ["cbc", "scip", "cp-sat"])
def test_no_time_limit(solver):
    assert allocate_bits(SENS, COSTS, {"size": 12.0}, solver=solver, time_limit_s=math.inf) == {"a": 4, "b": 8}
