"""Brute-force references for bit allocation: every assignment of widths to tie groups enumerated."""

import itertools
import math

import numpy as np


def best_allocation(sens, costs, budgets, groups, slack=None):
    """Optimal (objective, allocation) by enumerating every per-group choice (vectorised).

    ``slack[r]`` is subtracted from budget ``r``.
    """
    slack = slack or {}
    obj, used, choices = np.zeros(1), {r: np.zeros(1) for r in budgets}, []
    for g in groups:
        bits = sorted(sens[g[0]])
        choices.append(bits)
        s = np.array([sum(sens[layer][b] for layer in g) for b in bits])
        obj = (obj[:, None] + s[None, :]).ravel()
        for r in budgets:
            c = np.array([sum(costs[r][layer][b] for layer in g) for b in bits])
            used[r] = (used[r][:, None] + c[None, :]).ravel()
    feasible = np.ones(obj.shape, dtype=bool)
    for r, b in budgets.items():
        feasible &= used[r] <= b - slack.get(r, 0.0)
    if not feasible.any():
        return math.inf, None
    best = int(np.argmin(np.where(feasible, obj, np.inf)))
    index = np.unravel_index(best, [len(c) for c in choices])
    allocation = {layer: bits[k] for g, bits, k in zip(groups, choices, index) for layer in g}
    return obj[best], allocation


def pareto_points(sens, costs, resource, groups, budgets=None):
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
