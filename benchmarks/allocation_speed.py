"""How fast allocate_bits proves the optimal bit allocation, per solver, against references on the same instances.

Instances are synthetic HAWQ-like problems (seeded): layer sizes log-uniform in 1e3..2.4e6 parameters,
MACs log-uniform in 1e5..2e8, sensitivity ``trace * params * 4**-bits`` with log-normal traces, and
budgets half way between all-4-bit and all-8-bit (HAWQ-V3) for size and BOPS plus a random latency
table. Timings are end to end (validation, model building, solve), median of repeats over several
instances. References on the same instances: scipy.optimize.milp (HiGHS, fed the raw floats) and,
on a 12-layer instance, exhaustive numpy enumeration of all 3**12 allocations.

    python benchmarks/allocation_speed.py [--repeats 5] [--seeds 3]

Writes benchmarks/results/allocation_speed.md.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import numpy as np
import ortools
import scipy
import torch
from _common import command, machine, write_result
from scipy.optimize import Bounds, LinearConstraint, milp

from lightning_hessian.quant.allocation import allocate_bits, allocation_total
from lightning_hessian.quant.costs import budget_between

GOALS_MS = {"52 layers x 3 bits x 3 budgets": 100.0, "200 layers x 4 bits x 1 budget": 1000.0,
            "200 layers x 4 bits x 3 budgets": 1000.0}


def instance(seed: int, num_layers: int, bits: tuple[int, ...], num_budgets: int):
    """A seeded HAWQ-like allocation problem: (sensitivity, costs, budgets)."""
    rng = random.Random(seed)
    sens, costs = {}, {"size": {}, "bops": {}, "latency": {}}
    for i in range(num_layers):
        name = f"layer{i}"
        params = int(10 ** rng.uniform(3, math.log10(2.4e6)))
        macs = int(10 ** rng.uniform(5, math.log10(2e8)))
        trace = rng.lognormvariate(0, 2)
        sens[name] = {b: trace * params * 4.0**-b * rng.uniform(0.8, 1.2) for b in bits}
        costs["size"][name] = {b: float(params * b) for b in bits}
        costs["bops"][name] = {b: float(macs * b * b) for b in bits}
        speed = rng.uniform(0.5, 2.0)
        costs["latency"][name] = {b: macs * (1 + b / 8) * speed * 1e-9 for b in bits}
    resources = ["size", "bops", "latency"][:num_budgets]
    costs = {r: costs[r] for r in resources}
    budgets = {r: budget_between(costs[r], 0.5) for r in resources if r != "latency"}
    if "latency" in costs:
        budgets["latency"] = budget_between(costs["latency"], rng.uniform(0.3, 0.7))
    return sens, costs, budgets


def solve_scipy_milp(sens, costs, budgets, time_limit_s=10.0):
    """The same multiple-choice knapsack as a scipy.optimize.milp (HiGHS) problem on the raw floats."""
    layers = list(sens)
    cols = [(layer, b) for layer in layers for b in sorted(sens[layer])]
    index = {layer: [i for i, (name, _) in enumerate(cols) if name == layer] for layer in layers}
    c = np.array([sens[layer][b] for layer, b in cols])
    one = np.zeros((len(layers), len(cols)))
    for row, layer in enumerate(layers):
        one[row, index[layer]] = 1
    rows = np.array([[costs[r][layer][b] for layer, b in cols] for r in budgets])
    constraints = [LinearConstraint(one, 1, 1), LinearConstraint(rows, -np.inf, np.array(list(budgets.values())))]
    result = milp(c, constraints=constraints, integrality=np.ones(len(cols)), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0, "time_limit": time_limit_s})
    if result.x is None:
        raise RuntimeError(f"scipy milp failed: {result.message}")
    return {layer: b for (layer, b), x in zip(cols, result.x) if x > 0.5}


def solve_brute_force(sens, costs, budgets):
    """Enumerate every allocation with numpy (feasible only for small instances)."""
    layers = list(sens)
    choices = [sorted(sens[layer]) for layer in layers]
    obj, used = np.zeros(1), {r: np.zeros(1) for r in budgets}
    for layer, bits in zip(layers, choices):
        obj = (obj[:, None] + np.array([sens[layer][b] for b in bits])[None, :]).ravel()
        for r in budgets:
            used[r] = (used[r][:, None] + np.array([costs[r][layer][b] for b in bits])[None, :]).ravel()
    feasible = np.logical_and.reduce([used[r] <= budget for r, budget in budgets.items()])
    best = int(np.argmin(np.where(feasible, obj, np.inf)))
    picks = np.unravel_index(best, [len(bits) for bits in choices])
    return {layer: bits[k] for layer, bits, k in zip(layers, choices, picks)}


SOLVERS = {
    "ours: cbc": lambda s, c, b: allocate_bits(s, c, b, solver="cbc"),
    "ours: scip": lambda s, c, b: allocate_bits(s, c, b, solver="scip"),
    "ours: cp-sat": lambda s, c, b: allocate_bits(s, c, b, solver="cp-sat"),
    "peer: scipy milp (HiGHS)": solve_scipy_milp,
}


def measure(name, problems, solvers, repeats):
    """Median/max wall time (ms) per solver over problems x repeats, and its worst objective gap to the best."""
    times = {s: [] for s in solvers}
    gaps = dict.fromkeys(solvers, 0.0)
    feasible = dict.fromkeys(solvers, True)
    for sens, costs, budgets in problems:
        objectives = {}
        for solver, solve in solvers.items():
            for _ in range(repeats):
                start = time.perf_counter()
                bits = solve(sens, costs, budgets)
                times[solver].append((time.perf_counter() - start) * 1e3)
            objectives[solver] = allocation_total(sens, bits)
            feasible[solver] &= all(allocation_total(costs[r], bits) <= b * (1 + 1e-9) for r, b in budgets.items())
        best = min(v for s, v in objectives.items() if feasible[s])
        for solver, value in objectives.items():
            gaps[solver] = max(gaps[solver], value / best - 1)
    return [
        (name, s, statistics.median(times[s]), max(times[s]), gaps[s], feasible[s]) for s in solvers
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    rows = []
    small = [instance(seed, 12, (2, 4, 8), 3) for seed in seeds]
    rows += measure("12 layers x 3 bits x 3 budgets", small,
                    {**SOLVERS, "reference: brute force (numpy, 3^12)": solve_brute_force}, args.repeats)
    for (layers, bits, budgets) in [(52, (2, 4, 8), 3), (200, (2, 4, 6, 8), 1), (200, (2, 4, 6, 8), 3)]:
        name = f"{layers} layers x {len(bits)} bits x {budgets} budget{'s' if budgets > 1 else ''}"
        problems = [instance(seed, layers, bits, budgets) for seed in seeds]
        rows += measure(name, problems, SOLVERS, args.repeats)

    lines = [
        "# allocate_bits speed",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine(f'ortools {ortools.__version__}', f'scipy {scipy.__version__}')}  ",
        f"Each row: {args.seeds} seeded instances x {args.repeats} repeats, end-to-end wall time; "
        "'obj. gap' = worst (objective / best objective among feasible answers - 1) over the instances.",
        "",
        "| instance | solver | median ms | max ms | goal | obj. gap | feasible |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for name, solver, median, worst, gap, ok in rows:
        goal = GOALS_MS.get(name)
        goal_text = ""
        if goal and solver.startswith("ours"):
            goal_text = f"< {goal:.0f} ms: {'met' if median < goal else 'MISSED'}"
        lines.append(f"| {name} | {solver} | {median:.1f} | {worst:.1f} | {goal_text} | {gap:.2e} | {ok} |")
    ratios = []
    for name in dict.fromkeys(r[0] for r in rows):
        by_solver = {r[1]: r[2] for r in rows if r[0] == name}
        peer = by_solver["peer: scipy milp (HiGHS)"]
        ratios.append(f"{name}: scipy milp / ours cbc = {peer / by_solver['ours: cbc']:.2f}x")
    lines += ["", "Speed ratios (same run): " + "; ".join(ratios) + "."]
    write_result("allocation_speed", "\n".join(lines))

if __name__ == "__main__":
    main()
