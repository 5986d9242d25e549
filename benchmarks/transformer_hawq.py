"""Q-BERT on a transformer: group-wise and Hessian mixed-precision weights against uniform and random allocations.

The model is ``MNIST1DTransformer`` (MNIST-1D read as 10 patches of 4 samples; dim 32, 4 heads, 2 pre-norm blocks,
GELU MLP of 64, a position ``nn.Embedding``; 15 quantizable layers: 12 attention/MLP projections, the patch
embedding, the position embedding and the head), trained in float32 for ``--epochs`` epochs (AdamW 3e-3, cosine,
batch 100) on the standard 4000/1000 split, one model per seed. Each configuration quantizes that model's weights
(``quantize_model``; activations 8-bit per tensor, LayerNorm/GELU/softmax in float as in Q-BERT), calibrates the
activation ranges on 1000 training samples and is evaluated on the test split twice: right after quantization (PTQ)
and after ``--qat-epochs`` epochs of quantization-aware fine-tuning (Adam 3e-4, the same data order for every
configuration).

Rows: float; uniform 8/4/3/2-bit weights per output channel, in groups of input columns (``columns=16`` and ``8``:
the int4 practice, finer than per-channel) and in Q-BERT's groups of output rows (``rows=4``: coarser than
per-channel, one scale per 4 rows); Hessian mixed 2/4/8 at HAWQ-V3 size budgets 0.25 and 0.5 (of the way from all
2-bit to all 8-bit weights; 3.5 and 5 bits per weight on average) planned by ``allocate_bits`` with the Q-BERT
sensitivity (``metric="qbert"``: ``(|mean| + std)`` of each layer's top Hessian eigenvalue over 4 probe batches of
128, times ``||Q_b(W) - W||^2``) and with the trace (HAWQ-V2/V3, at most 100 Hutchinson probes), both in groups
of 16 columns; and random allocations at the same budgets (``allocate_bits`` on random sensitivities
``u_l * 4^-b``, ``u_l`` log-uniform over six decades, so each fills the budget as the plans do).

"bits/weight" and "weights KB" count the quantized layers' weights at their bits plus one float32 scale per output
channel or group (biases, LayerNorm and activation scales, the same in every row, are left out; float: 32 bits).
The goals of issue 26 are checked at the end: uniform W8 within 0.3 points of float; group-wise W4 closer to float
than per-channel W4; each Hessian plan beyond 2 standard errors of the random mean at the same size.

    python benchmarks/transformer_hawq.py [--seeds 3] [--quick]

Writes benchmarks/results/transformer_hawq.md.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F
from _common import command, machine, markdown_table, write_result

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.hessian import Batches
from lightning_hessian.models.transformer import MNIST1DTransformer
from lightning_hessian.quant import (
    WeightGroups,
    allocate_bits,
    budget_between,
    calibrate,
    layer_sensitivity,
    layer_stats,
    quantizable_layers,
    quantize_model,
    resolve_groups,
    size_costs,
    unpack_attention,
)

GROUPINGS = {"per-channel": None, "columns=16": {"columns": 16}, "columns=8": {"columns": 8}, "rows=4": {"rows": 4}}
MIXED_GROUPS = "columns=16"
BITS = (8, 4, 3, 2)
CHOICES = (2, 4, 8)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def _epochs(model, x, y, epochs: int, lr: float, seed: int, schedule: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01) if schedule else \
        torch.optim.Adam(model.parameters(), lr)
    steps = epochs * math.ceil(len(x) / 100)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule else None
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 100):
            idx = perm[i:i + 100]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()


def _weight_bits(model, bits: dict[str, int], groups: dict[str, WeightGroups]) -> tuple[float, float]:
    """(total bits of the quantized weights and their scales, number of weights)."""
    total = count = 0
    for name, b in bits.items():
        w = model.get_submodule(name).weight
        g = groups.get(name, WeightGroups())
        rows, columns = g.blocks(w.shape)
        total += w.numel() * b + 32 * (w.shape[0] // rows) * (w[0].numel() // columns)
        count += w.numel()
    return total, count


def _random_plan(names, size, budget, rng: torch.Generator) -> dict[str, int]:
    u = 10 ** (6 * torch.rand(len(names), generator=rng))
    omega = {n: {b: float(u[i]) * 4.0 ** -b for b in CHOICES} for i, n in enumerate(names)}
    return allocate_bits(omega, {"size": size}, {"size": budget})


def run_seed(seed: int, data, args) -> dict[str, dict[str, float]]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = MNIST1DTransformer()
    t0 = time.perf_counter()
    _epochs(model, xtr, ytr, args.epochs, 3e-3, seed, schedule=True)
    model = unpack_attention(model).eval()
    rows: dict[str, dict[str, float]] = {}
    calib = [xtr[:1000]]
    names = quantizable_layers(model)

    def measure(label: str, bits, spec) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, report = quantize_model(model, bits, groups=spec)
        calibrate(q, calib)
        ptq = _accuracy(q, xte, yte)
        _epochs(q, xtr, ytr, args.qat_epochs, 3e-4, seed + 1, schedule=False)
        total, count = _weight_bits(model, report.weight_bits, report.groups)
        rows[label] = {"ptq": ptq, "qat": _accuracy(q, xte, yte), "bits": total / count, "kb": total / 8 / 1024}

    float_acc = _accuracy(model, xte, yte)
    count = sum(model.get_submodule(n).weight.numel() for n in names)
    rows["float"] = {"ptq": float_acc, "qat": float_acc, "bits": 32.0, "kb": count * 4 / 1024}
    train_s = time.perf_counter() - t0
    for bits in BITS:
        for label, spec in GROUPINGS.items():
            measure(f"W{bits} {label}", bits, spec)
    groups, _ = resolve_groups(GROUPINGS[MIXED_GROUPS], {n: model.get_submodule(n).weight for n in names})
    probe = Batches([(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 512, 128)])
    t1 = time.perf_counter()
    s = layer_sensitivity(model, _loss, probe, names, CHOICES, metrics=["qbert"], groups=groups, seed=seed)
    t2 = time.perf_counter()
    trace = layer_sensitivity(model, _loss, probe, names, CHOICES, metrics=["trace"], groups=groups,
                              max_samples=100, seed=seed)
    s.trace, s.trace_std_error = trace.trace, trace.trace_std_error
    timing = {"qbert_s": t2 - t1, "trace_s": time.perf_counter() - t2, "qbert_hvps": s.num_hvps,
              "trace_hvps": trace.num_hvps}
    size = size_costs(layer_stats(model, xtr[:8], names), CHOICES)
    rng = torch.Generator().manual_seed(1000 + seed)
    for fraction in args.fractions:
        budget = budget_between(size, fraction, CHOICES[0], CHOICES[-1])
        for metric in ("qbert", "trace"):
            plan = allocate_bits(s.omega(metric), {"size": size}, {"size": budget})
            measure(f"mixed {fraction} {metric}", plan, GROUPINGS[MIXED_GROUPS])
            rows[f"mixed {fraction} {metric}"]["plan"] = plan
        for r in range(args.randoms):
            measure(f"random {fraction} #{r}", _random_plan(names, size, budget, rng), GROUPINGS[MIXED_GROUPS])
    rows["timing"] = timing
    print(f"seed {seed}: float {float_acc:.1f}%, training {train_s:.0f} s, sensitivity {timing}, "
          f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _mean_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else float("nan")
    return float(t.mean()), se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--randoms", type=int, default=8, help="random allocations per budget and seed")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs, 2 randoms: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.randoms, args.qat_epochs = 1, 5, 2, 1
    torch.set_num_threads(1)
    data = load_mnist1d()
    t0 = time.perf_counter()
    per_seed = [run_seed(seed, data, args) for seed in range(args.seeds)]
    labels = [k for k in per_seed[0] if not k.startswith(("random", "timing"))]
    table = []

    def row(label: str, results: list[dict[str, float]]) -> list[str]:
        ptq, ptq_se = _mean_se([r["ptq"] for r in results])
        qat, qat_se = _mean_se([r["qat"] for r in results])
        return [label, f"{results[0]['bits']:.2f}", f"{results[0]['kb']:.1f}", f"{ptq:.2f} ± {ptq_se:.2f}",
                f"{qat:.2f} ± {qat_se:.2f}"]

    for label in labels:
        table.append(row(label, [rows[label] for rows in per_seed]))
        if label.startswith("mixed") and label.endswith("trace"):
            fraction = label.split()[1]
            randoms = [rows[k] for rows in per_seed for k in rows if k.startswith(f"random {fraction} ")]
            table.append(row(f"random {fraction} (mean of {len(randoms)})", randoms))
    float_qat = _mean_se([r["float"]["qat"] for r in per_seed])[0]
    goals = []

    def diff(label: str, stage: str) -> tuple[float, float]:
        return _mean_se([rows[label][stage] - rows["float"][stage] for rows in per_seed])

    for stage in ("ptq", "qat"):
        w8, w8_se = diff("W8 per-channel", stage)
        goals.append(f"- W8 within 0.3 points of float ({stage.upper()}): W8 - float = {w8:+.2f} ± {w8_se:.2f} "
                     f"points: {'met' if w8 >= -0.3 else 'not met'}")
        pc = diff("W4 per-channel", stage)[0]
        for grouping in ("columns=16", "columns=8", "rows=4"):
            g = diff(f"W4 {grouping}", stage)[0]
            goals.append(f"- group-wise W4 ({grouping}) closer to float than per-channel W4 ({stage.upper()}): "
                         f"{g:+.2f} vs {pc:+.2f} points: {'met' if abs(g) < abs(pc) else 'not met'}")
        for fraction in args.fractions:
            for metric in ("qbert", "trace"):
                margins = []
                for rows in per_seed:
                    randoms = [rows[k][stage] for k in rows if k.startswith(f"random {fraction} ")]
                    mean, se = _mean_se(randoms)
                    margins.append((rows[f"mixed {fraction} {metric}"][stage] - mean, se))
                held = sum(m > 2 * se for m, se in margins)
                listed = ", ".join(f"{m:+.2f} (2 SE {2 * se:.2f})" for m, se in margins)
                goals.append(f"- Hessian mixed ({metric}, budget {fraction}) beyond 2 SE of the random mean "
                             f"({stage.upper()}), per seed: {listed}: {held}/{len(margins)} seeds")
    plans = [f"- seed {i}, budget {f}, {m}: " + ", ".join(f"{k}={b}" for k, b in rows[f"mixed {f} {m}"]["plan"].items())
             for i, rows in enumerate(per_seed) for f in args.fractions for m in ("qbert", "trace")]
    text = "\n".join([
        "# Q-BERT on a transformer: group-wise and Hessian mixed-precision weights", "",
        f"Command: `{command()}`  ", f"Machine: {machine()}  ",
        f"{args.seeds} seeds, {args.epochs} float epochs, {args.qat_epochs} QAT epochs, {args.randoms} random "
        f"allocations per budget and seed; {time.perf_counter() - t0:.0f} s in all. Accuracy in % on the 1000 test "
        f"signals, mean ± standard error over seeds (float: {float_qat:.2f}). Mixed and random rows use groups of 16 "
        "input columns (the patch embedding, 4 wide, per channel).", "",
        markdown_table(["weights", "bits/weight", "weights KB", "PTQ acc", "QAT acc"], table), "",
        "## Goals of issue 26", "", *goals, "",
        "## Sensitivity cost (per seed: wall seconds on the shared machine, Hessian-vector products)", "",
        *[f"- seed {i}: qbert {r['timing']['qbert_s']:.1f} s, {r['timing']['qbert_hvps']} HVPs; trace "
          f"{r['timing']['trace_s']:.1f} s, {r['timing']['trace_hvps']} HVPs" for i, r in enumerate(per_seed)], "",
        "## Plans", "", *plans,
    ])
    write_result("transformer_hawq", text)


if __name__ == "__main__":
    main()
