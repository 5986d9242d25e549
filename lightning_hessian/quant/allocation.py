"""Per-layer bit widths that minimise the expected loss increase under resource budgets.

Choosing one bit width per layer so that the summed sensitivity is smallest while the summed size,
BOPS, latency... stay under their budgets is a multiple-choice knapsack with several constraints
(HAWQ-V3's integer linear program). It is small (tens to hundreds of layers, a handful of choices),
so it is solved exactly with OR-Tools: a MIP through ``pywraplp`` (CBC or SCIP) or CP-SAT.

Formulation: one binary ``x[g, b]`` per tie group ``g`` (a layer alone is a group of one) and
candidate bit width ``b``; ``sum_b x[g, b] = 1``; ``sum_{g,b} cost_r[g, b] x[g, b] <= budget_r`` for
every budgeted resource ``r``; minimise ``sum_{g,b} sens[g, b] x[g, b]``. Tied layers share the
choice variables of their group, which is the equality ``x[l, b] = x[m, b]`` substituted out;
``sens[g, b]`` and ``cost_r[g, b]`` are the sums over the group's layers.

:func:`pareto_frontier` sweeps budgets with these solvers, or (``"all"``) enumerates the exact frontier of
one resource against the summed sensitivity by a dynamic program over the tie groups.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from lightning_hessian.checks import check_number, check_positive_int
from lightning_hessian.quant.quantizers import validate_bits

SOLVERS = ("cbc", "scip", "cp-sat")
CPSAT_RESOLUTION = 10**9
"""CP-SAT works on integers. ``allocate_bits(..., solver="cp-sat")`` shifts each group's sensitivities
and costs by their smallest value (the budget by the sum of those). Budgets are kept exactly: integer
costs (sizes in bits, BOPS) are used as they are, others are floored to multiples of ``tol / (2 G)``
(``G`` tie groups, ``tol`` the float slack every solver has on a budget, ``1e-9`` of it) against the
budget plus ``tol / 2``, so no allocation within the budget is ruled out and none above it (beyond that
slack) is admitted. Sensitivities are rounded to the nearest multiple of ``delta = S / CPSAT_RESOLUTION``
(``S``: summed per-group spread ``max_b - min_b``), so the returned allocation's summed sensitivity is at
most ``G * delta`` above the optimum: ``G / 10**9`` of the spread, e.g. ``2e-7`` for 200 layers."""

_FEASIBILITY_RTOL = 1e-9  # relative slack on budgets: absorbs float summation order, nothing more
_MIP_NAMES = {"cbc": "CBC", "scip": "SCIP"}
# CBC and SCIP prune with absolute tolerances (CBC's cutoff increment is 1e-5): the objective is scaled
# to a summed spread of 1e6 so that those tolerances sit far below any real difference.
_MIP_OBJECTIVE_SCALE = 1e6


class InfeasibleBudgetError(ValueError):
    """No allocation meets the budgets.

    ``minimums[r]`` is the smallest achievable value of resource ``r`` alone (respecting ties) and
    ``budgets[r]`` the budget given; the message lists both for every budgeted resource.

    >>> size = {"a": {4: 400, 8: 800}, "b": {4: 400, 8: 800}}
    >>> try:
    ...     allocate_bits({"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}, {"size": size}, {"size": 700})
    ... except InfeasibleBudgetError as err:
    ...     print(err.minimums, err.budgets)
    {'size': 800.0} {'size': 700.0}
    """

    def __init__(self, message: str, minimums: dict[str, float], budgets: dict[str, float]):
        super().__init__(message)
        self.minimums = minimums
        self.budgets = budgets


class NotProvenOptimalWarning(UserWarning):
    """The solver hit ``time_limit_s`` with a feasible allocation it could not prove optimal."""


class ParetoPoint(NamedTuple):
    """One point of :func:`pareto_frontier`: the budget, the optimal summed sensitivity, the bits.

    >>> sensitivity = {"a": {4: 10.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}  # layer a is ten times more sensitive
    >>> size = {"a": {4: 400, 8: 800}, "b": {4: 400, 8: 800}}
    >>> for point in pareto_frontier(sensitivity, {"size": size}, "size", "all"):
    ...     print(point.budget, point.objective, point.allocation)
    800.0 11.0 {'a': 4, 'b': 4}
    1200.0 1.0 {'a': 8, 'b': 4}
    1600.0 0.0 {'a': 8, 'b': 8}
    """

    budget: float
    objective: float
    allocation: dict[str, int]


@dataclass
class _Problem:
    """Validated instance over tie groups: the solvers only see lists of floats."""

    groups: list[list[str]]
    bits: list[list[int]]
    sens: list[list[float]]
    costs: dict[str, list[list[float]]]
    budgets: dict[str, float]

    def minimum(self, resource: str) -> float:
        return math.fsum(min(c) for c in self.costs[resource])

    def maximum(self, resource: str) -> float:
        return math.fsum(max(c) for c in self.costs[resource])

    def tolerance(self, resource: str) -> float:
        """Slack on the budget of ``resource``: relative to the budget (or the resource's minimum), so one
        dear option elsewhere in the table never lets an allocation over a small budget through."""
        scale = max(self.budgets[resource], self.minimum(resource))
        return _FEASIBILITY_RTOL * (scale if math.isfinite(scale) else 0.0)

    def cost_of(self, resource: str, choice: list[int]) -> float:
        return math.fsum(c[k] for c, k in zip(self.costs[resource], choice))


def allocate_bits(
    sensitivity: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, Mapping[str, Mapping[int, float]]],
    budgets: Mapping[str, float],
    ties: Iterable[Iterable[str]] = (),
    solver: str = "cbc",
    time_limit_s: float = 10.0,
) -> dict[str, int]:
    """Optimal bit width per layer: least summed ``sensitivity`` with every resource within budget.

    Args:
        sensitivity: ``sensitivity[layer][bits]`` expected loss increase; its keys define the layers
            and each layer's candidate bit widths (integers in 2..8).
        costs: ``costs[resource][layer][bits]`` non-negative cost (size in bits or bytes, BOPS,
            latency...) for every layer and candidate; resources without a budget are not constrained.
        budgets: ``budgets[resource]`` upper bound on the summed cost (``math.inf`` for none).
        ties: groups of layer names that must get one common bit width (e.g. a residual block's
            shortcut conv and the conv it is added to); overlapping groups merge.
        solver: ``"cbc"`` or ``"scip"`` (exact MIP), or ``"cp-sat"`` (exact up to
            :data:`CPSAT_RESOLUTION`).
        time_limit_s: wall-clock limit for the solver. If it runs out with a feasible but unproven
            allocation, that allocation is returned with a :class:`NotProvenOptimalWarning`; if it
            runs out with none, ``TimeoutError`` is raised.

    Returns:
        ``{layer: bits}`` in the order of ``sensitivity``.

    Example: 1,200 bits afford one of two 100-weight layers at 8 bits; the more sensitive one gets them.

    >>> sensitivity = {"a": {4: 10.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    >>> size = {"a": {4: 400, 8: 800}, "b": {4: 400, 8: 800}}
    >>> allocate_bits(sensitivity, {"size": size}, {"size": 1200})
    {'a': 8, 'b': 4}

    Raises:
        InfeasibleBudgetError: no allocation meets the budgets (message: each resource's smallest
            achievable value and its budget).
        ValueError / TypeError: malformed input, naming the argument.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not supported; use one of {SOLVERS}")
    if isinstance(time_limit_s, bool) or not (isinstance(time_limit_s, Real) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a positive number of seconds (math.inf for none), got {time_limit_s!r}")
    problem = _build_problem(sensitivity, costs, budgets, ties)
    _raise_if_infeasible(problem, jointly=False)
    rhs_cut = dict.fromkeys(problem.budgets, 0.0)
    for _ in range(3):
        choice = (
            _solve_cpsat(problem, time_limit_s, rhs_cut)
            if solver == "cp-sat"
            else _solve_mip(problem, _MIP_NAMES[solver], time_limit_s, rhs_cut)
        )
        if choice is None:
            if any(rhs_cut.values()):
                raise RuntimeError(f"solver {solver!r} overshot a budget and has no answer once it is tightened")
            _raise_if_infeasible(problem, jointly=True)
        excess = {r: problem.cost_of(r, choice) - b - problem.tolerance(r) for r, b in problem.budgets.items()}
        if all(e <= 0 for e in excess.values()):
            chosen = {layer: bits[k] for g, bits, k in zip(problem.groups, problem.bits, choice) for layer in g}
            return {layer: chosen[layer] for layer in sensitivity}
        # The solver's integrality tolerance let a rounded choice overshoot a budget: tighten and re-solve.
        for r, e in excess.items():
            rhs_cut[r] += max(e, 0.0) * 2
    raise RuntimeError(f"solver {solver!r} kept returning allocations over budget (excess {excess})")


def pareto_frontier(
    sensitivity: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, Mapping[str, Mapping[int, float]]],
    resource: str,
    budgets_or_num_points: int | Sequence[float] | str = 11,
    *,
    budgets: Mapping[str, float] | None = None,
    ties: Iterable[Iterable[str]] = (),
    solver: str = "cbc",
    time_limit_s: float = 10.0,
    max_states: int = 100_000,
) -> list[ParetoPoint]:
    """Optimal allocations against the cost of ``resource``, for accuracy-vs-cost plots.

    ``"all"`` gives the exact frontier: every non-dominated ``(cost, summed sensitivity)`` pair (no other
    allocation is at most as dear and at most as sensitive, and strictly better in one), one allocation
    each, cheapest first; ``ParetoPoint.budget`` is then the allocation's cost of ``resource``. It is a
    dynamic program over the tie groups that keeps only the non-dominated partial allocations (with fixed
    ``budgets`` on other resources, non-dominated in those costs too, and only those that can still meet
    them); ``solver`` and ``time_limit_s`` do not apply, and more than ``max_states`` partial allocations
    at one group raise a ``ValueError`` (use a sweep then). Totals are float sums: allocations whose totals
    differ only by rounding may stand for one another.

    An integer ``n >= 2`` sweeps ``n`` evenly spaced budgets from the smallest achievable cost of
    ``resource`` (every group at its cheapest width) to the largest (every group at its dearest) and
    solves each with ``solver``; a sequence gives the budgets explicitly. ``budgets`` holds fixed budgets
    for other resources. Budgets that no allocation meets are left out; if none is met, the last
    :class:`InfeasibleBudgetError` is raised.
    """
    fixed = dict(budgets or {})
    if resource not in costs:
        raise ValueError(f"resource={resource!r} has no table in costs (resources: {sorted(costs)})")
    if resource in fixed:
        raise ValueError(f"budgets must not contain the swept resource {resource!r}; it is set by the sweep")
    problem = _build_problem(sensitivity, costs, {**fixed, resource: math.inf}, ties)
    if isinstance(budgets_or_num_points, str):
        if budgets_or_num_points != "all":
            raise ValueError(f"budgets_or_num_points={budgets_or_num_points!r}: use 'all' (the exact frontier), a "
                             "number of points or a list of budgets")
        check_positive_int(max_states, "max_states")
        _raise_if_infeasible(problem, jointly=False)
        return _exact_frontier(problem, resource, sensitivity, costs, max_states)
    if isinstance(budgets_or_num_points, Integral) and not isinstance(budgets_or_num_points, bool):
        if budgets_or_num_points < 2:
            raise ValueError(f"budgets_or_num_points must be >= 2 points, got {budgets_or_num_points}")
        lo, hi = problem.minimum(resource), problem.maximum(resource)
        n = int(budgets_or_num_points)
        sweep = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    elif isinstance(budgets_or_num_points, Sequence) and not isinstance(budgets_or_num_points, str):
        sweep = [float(b) for b in budgets_or_num_points]
        if not sweep:
            raise ValueError("budgets_or_num_points is an empty list: give budgets, or a number of points >= 2")
    else:
        raise TypeError(f"budgets_or_num_points must be 'all', a number of points or a list of budgets, got "
                        f"{budgets_or_num_points!r}")
    points, error = [], None
    for budget in sweep:
        try:
            bits = allocate_bits(sensitivity, costs, {**fixed, resource: budget}, problem.groups, solver, time_limit_s)
        except InfeasibleBudgetError as e:
            error = e
            continue
        points.append(ParetoPoint(budget, allocation_total(sensitivity, bits), bits))
    if not points:
        raise error
    return points


def _exact_frontier(problem: _Problem, resource: str, sensitivity: Mapping[str, Mapping[int, float]],
                    costs: Mapping[str, Mapping[str, Mapping[int, float]]], max_states: int) -> list[ParetoPoint]:
    """Every non-dominated ``(cost, sensitivity)`` allocation that meets the fixed budgets (see ``pareto_frontier``).

    Group by group, each kept partial allocation is extended by every candidate width; an extension that can no
    longer meet a fixed budget (its cost so far plus the cheapest rest) is dropped, and so is one dominated by
    another extension in every tracked quantity: no completion of it could beat the same completion of that one.
    """
    others = [r for r, b in problem.budgets.items() if r != resource and math.isfinite(b)]
    # the cheapest completion of each fixed resource after group g, for the "can still meet it" test
    rest = np.array([[math.fsum(min(c) for c in problem.costs[r][g + 1:]) for r in others]
                     for g in range(len(problem.groups))]).reshape(len(problem.groups), len(others))
    limit = np.array([problem.budgets[r] + problem.tolerance(r) for r in others])
    # the kept partial allocations: one row of (cost, sensitivity, other costs) each
    values = np.zeros((1, 2 + len(others)))
    history = []  # per group: the kept rows' parent row and choice index
    for g, bits in enumerate(problem.bits):
        table = np.array([[problem.costs[resource][g][k], problem.sens[g][k]] + [problem.costs[r][g][k] for r in others]
                          for k in range(len(bits))])
        extended = (values[:, None, :] + table[None, :, :]).reshape(-1, values.shape[1])
        parent, choice = np.divmod(np.arange(len(extended)), len(bits))
        fits = np.all(extended[:, 2:] + rest[g] <= limit, axis=1)
        rows = np.flatnonzero(fits)[_non_dominated(extended[fits])]
        values = extended[rows]
        history.append((parent[rows], choice[rows]))
        if len(values) > max_states:
            raise ValueError(f"pareto_frontier('all'): {len(values)} non-dominated partial allocations after "
                             f"{g + 1} of {len(problem.groups)} groups exceed max_states={max_states}; raise "
                             "max_states, or sweep budgets (an int or a list) instead")
    if not len(values):  # every budget alone can be met (checked before), but not all together
        _raise_if_infeasible(problem, jointly=True)
    rows, picks = _non_dominated(values[:, :2]), []
    for parent, choice in reversed(history):  # back from the last group: every frontier point at once
        picks.append(choice[rows])
        rows = parent[rows]
    points = []
    for choices in np.stack(picks[::-1], axis=1).tolist():
        chosen = {layer: bits[k] for group, bits, k in zip(problem.groups, problem.bits, choices) for layer in group}
        allocation = {layer: chosen[layer] for layer in sensitivity}
        points.append(ParetoPoint(allocation_total(costs[resource], allocation),
                                  allocation_total(sensitivity, allocation), allocation))
    return points


def _non_dominated(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``values`` (cost, sensitivity, other costs...) that no other row matches or beats in
    every column, by cost (of equal rows, the first)."""
    order = np.lexsort(values.T[::-1])  # by cost, then sensitivity, then the others; stable
    values = values[order]
    if values.shape[1] == 2:  # a sensitivity below every cheaper row's
        cheaper = np.minimum.accumulate(np.concatenate([[math.inf], values[:-1, 1]]))
        return order[values[:, 1] < cheaper]
    kept = []
    if values.shape[1] == 3:  # a staircase of the kept (sensitivity, other cost) pairs
        sens: list[float] = []  # ascending, their other costs strictly descending
        other: list[float] = []
        for i, (s, o) in enumerate(values[:, 1:].tolist()):  # by cost, so only the kept rows can dominate
            at = bisect.bisect_right(sens, s)
            if at and other[at - 1] <= o:  # the kept pair with the largest sensitivity <= s has the least cost
                continue
            end = at
            while end < len(sens) and other[end] >= o:  # pairs the new one dominates leave the staircase
                end += 1
            sens[at:end], other[at:end] = [s], [o]
            kept.append(i)
        return order[kept]
    for i, row in enumerate(values[:, 1:]):
        if not kept or not np.any(np.all(values[kept, 1:] <= row, axis=1)):
            kept.append(i)
    return order[np.array(kept, dtype=np.int64)]


def allocation_total(table: Mapping[str, Mapping[int, float]], allocation: Mapping[str, int]) -> float:
    """``sum_l table[l][allocation[l]]``: the objective (``sensitivity``) or a cost (``costs[r]``)."""
    return math.fsum(table[layer][bits] for layer, bits in allocation.items())


def _tie_groups(layers: list[str], ties: Iterable[Iterable[str]]) -> list[list[str]]:
    """Partition ``layers`` into tie groups (union of overlapping ties), in first-layer order."""
    parent = {layer: layer for layer in layers}

    def root(layer: str) -> str:
        while parent[layer] != layer:
            parent[layer] = parent[parent[layer]]
            layer = parent[layer]
        return layer

    if isinstance(ties, str):
        raise TypeError(f"ties must be groups of layer names, e.g. [('conv1', 'shortcut')], got {ties!r}")
    for group in ties:
        if isinstance(group, str) or not isinstance(group, Iterable):
            raise TypeError(f"ties must be groups of layer names, e.g. [('conv1', 'shortcut')], got group {group!r}")
        group = list(group)
        for layer in group:
            if layer not in parent:
                raise ValueError(f"ties: unknown layer {layer!r} (not a key of sensitivity)")
        for layer in group[1:]:
            parent[root(layer)] = root(group[0])
    members: dict[str, list[str]] = {}
    for layer in layers:
        members.setdefault(root(layer), []).append(layer)
    return list(members.values())


def _build_problem(
    sensitivity: Mapping[str, Mapping[int, float]],
    costs: Mapping[str, Mapping[str, Mapping[int, float]]],
    budgets: Mapping[str, float],
    ties: Iterable[Iterable[str]],
) -> _Problem:
    """Validate the inputs and aggregate them over tie groups."""
    if not isinstance(sensitivity, Mapping) or not sensitivity:
        raise ValueError("sensitivity must be a non-empty mapping {layer: {bits: expected loss increase}}")
    if not isinstance(costs, Mapping):
        raise TypeError(f"costs must be a mapping {{resource: {{layer: {{bits: cost}}}}}}, got {type(costs).__name__}")
    if not isinstance(budgets, Mapping):
        raise TypeError(f"budgets must be a mapping {{resource: upper bound}}, got {type(budgets).__name__}")
    sens: dict[str, dict[int, float]] = {}
    for layer, table in sensitivity.items():
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"sensitivity[{layer!r}] must be a non-empty mapping {{bits: float}}")
        where = f"sensitivity[{layer!r}]"
        sens[layer] = {
            validate_bits(b, f"{where} bit width"): check_number(v, f"{where}[{b}]") for b, v in table.items()
        }
    clean_budgets: dict[str, float] = {}
    for resource, budget in budgets.items():
        if resource not in costs:
            raise ValueError(f"budgets[{resource!r}] has no cost table: costs has resources {sorted(costs)}")
        if isinstance(budget, bool) or not isinstance(budget, Real) or math.isnan(budget) or budget < 0:
            raise ValueError(f"budgets[{resource!r}] must be a number >= 0 (math.inf for none), got {budget!r}")
        clean_budgets[resource] = float(budget)
    cost_tables: dict[str, dict[str, dict[int, float]]] = {}
    for resource, per_layer in costs.items():
        if not isinstance(per_layer, Mapping):
            raise TypeError(f"costs[{resource!r}] must be a mapping {{layer: {{bits: cost}}}}")
        for layer in per_layer:
            if layer not in sens:
                raise ValueError(f"costs[{resource!r}]: unknown layer {layer!r} (not a key of sensitivity)")
        cost_tables[resource] = {}
        for layer, candidates in sens.items():
            if layer not in per_layer:
                raise ValueError(f"costs[{resource!r}] has no entry for layer {layer!r}")
            where = f"costs[{resource!r}][{layer!r}]"
            if not isinstance(per_layer[layer], Mapping):
                raise TypeError(f"{where} must map bit widths to costs, e.g. {{4: 512, 8: 1024}}, "
                                f"got {per_layer[layer]!r}")
            table = {validate_bits(b, f"{where} bit width"): v for b, v in per_layer[layer].items()}
            missing = sorted(set(candidates) - set(table))
            if missing:
                raise ValueError(f"{where} lacks bit widths {missing} that sensitivity[{layer!r}] offers")
            cost_tables[resource][layer] = {b: check_number(table[b], f"{where}[{b}]", 0) for b in candidates}
    groups = _tie_groups(list(sens), ties)
    bits = []
    for group in groups:
        candidates = sorted(sens[group[0]])
        for layer in group[1:]:
            if sorted(sens[layer]) != candidates:
                raise ValueError(
                    f"ties: tied layers {group[0]!r} and {layer!r} have different candidate bit widths "
                    f"{candidates} and {sorted(sens[layer])}; give tied layers the same candidates in sensitivity"
                )
        bits.append(candidates)

    def aggregate(tables: Mapping[str, Mapping[int, float]]) -> list[list[float]]:
        return [[math.fsum(tables[layer][b] for layer in g) for b in bs] for g, bs in zip(groups, bits)]

    return _Problem(
        groups, bits, aggregate(sens), {r: aggregate(t) for r, t in cost_tables.items()}, clean_budgets
    )


def _raise_if_infeasible(problem: _Problem, jointly: bool) -> None:
    """Raise :class:`InfeasibleBudgetError` if some budget is below its resource's minimum (or ``jointly``)."""
    minimums = {r: problem.minimum(r) for r in problem.budgets}
    over = [r for r, m in minimums.items() if m > problem.budgets[r] + problem.tolerance(r)]
    if not over and not jointly:
        return
    lines = "; ".join(
        f"{r!r}: smallest achievable {minimums[r]:.12g} {'>' if r in over else '<='} budget {b:.12g}"
        for r, b in problem.budgets.items()
    )
    head = "budgets cannot be met" if over else "each budget can be met on its own but not all together"
    raise InfeasibleBudgetError(
        f"{head} ({lines}); raise the budgets or offer cheaper bit widths", minimums, dict(problem.budgets)
    )


class _Row(NamedTuple):
    """A budget row with each group's cheapest cost subtracted, from the budget too."""

    coeffs: list[list[float]]  # 0 for the banned choices
    rhs: float  # budget + tol - cut - minimum
    tol: float


def _budget_rows(problem: _Problem, rhs_cut: Mapping[str, float]) -> tuple[list[_Row], set[tuple[int, int]]]:
    """The budget rows and the banned ``(group, choice)`` pairs: those that alone cost more than a row allows.

    The solvers fix banned choices to 0 and leave them out of the rows, so a row's scale is set by what can
    fit: one dear option never turns a small budget into a value below the solver's tolerances.
    """
    rows = []
    for r, budget in problem.budgets.items():
        shifted = [[c - min(cs) for c in cs] for cs in problem.costs[r]]
        if math.isinf(budget) or not any(map(any, shifted)):
            continue  # unconstrained, or constant and already checked against its minimum
        tol = problem.tolerance(r)
        rows.append(_Row(shifted, budget + tol - rhs_cut[r] - problem.minimum(r), tol))
    banned = {(g, k) for row in rows for g, cs in enumerate(row.coeffs) for k, c in enumerate(cs) if c > row.rhs}
    kept = []
    for row in rows:
        coeffs = [[0.0 if (g, k) in banned else c for k, c in enumerate(cs)] for g, cs in enumerate(row.coeffs)]
        if any(map(any, coeffs)):  # else every allowed choice fits (a negative rhs bans them all)
            kept.append(row._replace(coeffs=coeffs))
    return kept, banned


def _shifted_objective(problem: _Problem) -> tuple[list[list[float]], float]:
    """Sensitivities minus each group's smallest (same argmin) and their summed spread."""
    shifted = [[s - min(ss) for s in ss] for ss in problem.sens]
    return shifted, math.fsum(max(ss) for ss in shifted)


def _solve_mip(problem: _Problem, name: str, time_limit_s: float, rhs_cut: Mapping[str, float]) -> list[int] | None:
    """Index of the chosen bit width per group from CBC/SCIP, or ``None`` if infeasible."""
    solver = pywraplp.Solver.CreateSolver(name)
    if solver is None:
        raise RuntimeError(f"OR-Tools was built without the {name} solver; use solver='cp-sat'")
    x = [[solver.BoolVar(f"x{g}_{b}") for b in bits] for g, bits in enumerate(problem.bits)]
    for xs in x:
        one = solver.Constraint(1.0, 1.0)
        for v in xs:
            one.SetCoefficient(v, 1.0)
    rows, banned = _budget_rows(problem, rhs_cut)
    for g, k in banned:
        x[g][k].SetBounds(0.0, 0.0)
    for coeffs, rhs, _ in rows:
        scale = max(map(max, coeffs))  # coefficients in [0, 1] keep the solver's tolerances meaningful
        row = solver.Constraint(-solver.infinity(), rhs / scale)
        for xs, cs in zip(x, coeffs):
            for v, c in zip(xs, cs):
                row.SetCoefficient(v, c / scale)
    shifted, spread = _shifted_objective(problem)
    objective = solver.Objective()
    for xs, ss in zip(x, shifted):
        for v, s in zip(xs, ss):
            objective.SetCoefficient(v, s * _MIP_OBJECTIVE_SCALE / spread if spread > 0 else 0.0)
    objective.SetMinimization()
    if math.isfinite(time_limit_s):
        solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
    if name == "SCIP":  # root cutting planes cost SCIP more than they save on these knapsacks (3-5x slower)
        solver.SetSolverSpecificParametersAsString("separating/maxroundsroot = 0")
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, 0.0)
    status = solver.Solve(params)
    if status == pywraplp.Solver.INFEASIBLE:
        return None
    if status == pywraplp.Solver.NOT_SOLVED:
        raise TimeoutError(f"{name} found no allocation within time_limit_s={time_limit_s}; raise time_limit_s")
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise RuntimeError(f"{name} failed with status {status}")
    if status == pywraplp.Solver.FEASIBLE:
        _warn_unproven(name, time_limit_s)
    return [max(range(len(xs)), key=lambda k: xs[k].solution_value()) for xs in x]


def _solve_cpsat(problem: _Problem, time_limit_s: float, rhs_cut: Mapping[str, float]) -> list[int] | None:
    """Same as :func:`_solve_mip` with CP-SAT on the integer scaling of :data:`CPSAT_RESOLUTION`."""
    model = cp_model.CpModel()
    x = [[model.new_bool_var(f"x{g}_{b}") for b in bits] for g, bits in enumerate(problem.bits)]
    for xs in x:
        model.add_exactly_one(xs)
    rows, banned = _budget_rows(problem, rhs_cut)
    for g, k in banned:
        model.add(x[g][k] == 0)
    for coeffs, rhs, tol in rows:
        if all(c == int(c) for cs in coeffs for c in cs) and math.fsum(map(max, coeffs)) < 2**53:
            delta, limit = 1.0, rhs  # integers: exact
        else:  # floors lose less than G * delta = tol / 2 in all, the budget's own slack tol / 2 takes it
            delta, limit = tol / (2 * len(coeffs)), max(rhs - tol / 2, 0.0)
        ints = [[math.floor(c / delta) for c in cs] for cs in coeffs]
        model.add(sum(c * v for xs, cs in zip(x, ints) for v, c in zip(xs, cs)) <= math.floor(limit / delta))
    shifted, spread = _shifted_objective(problem)
    if spread > 0:
        delta = spread / CPSAT_RESOLUTION
        model.minimize(sum(round(s / delta) * v for xs, ss in zip(x, shifted) for v, s in zip(xs, ss)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    # One worker with the full LP relaxation: deterministic, and on these knapsacks 10-100x faster than the
    # default portfolio on a 2-core machine (which can run into seconds for 52 layers x 3 budgets).
    solver.parameters.num_workers = 1
    solver.parameters.linearization_level = 2
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        return None
    if status == cp_model.UNKNOWN:
        raise TimeoutError(f"CP-SAT found no allocation within time_limit_s={time_limit_s}; raise time_limit_s")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT failed with status {solver.status_name(status)}")
    if status == cp_model.FEASIBLE:
        _warn_unproven("CP-SAT", time_limit_s)
    return [next(k for k, v in enumerate(xs) if solver.boolean_value(v)) for xs in x]


def _warn_unproven(name: str, time_limit_s: float) -> None:
    warnings.warn(
        f"{name} reached time_limit_s={time_limit_s} before proving optimality; returning the best "
        "allocation found (it meets the budgets). Raise time_limit_s for the proven optimum.",
        NotProvenOptimalWarning,
        stacklevel=4,  # the caller of allocate_bits
    )
