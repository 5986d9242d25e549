"""Our attacks next to torchattacks, on the same models, inputs, units and settings, in one run.

1. FGSM / PGD (L-inf, L2): accuracy under attack and time per batch, ours vs torchattacks' FGSM / PGD / PGDL2.
2. Minimal-perturbation L2 attacks: our trust-region attack vs torchattacks' CW and DeepFool: success rate on
   correctly classified samples, mean relative L2 perturbation ``||x_adv - x|| / ||x||`` over fooled samples,
   time per sample.

Models: the MNIST-1D CNN trained briefly on MNIST-1D, and a ResNet-20 trained briefly on a synthetic,
learnable 32x32 colour task (ten smooth random class templates plus pixel noise; no CIFAR download needed).
torchattacks expects inputs in [0, 1]: both models are wrapped so that they take [0, 1] inputs (MNIST-1D:
an affine map onto the standardised data range; ResNet-20: per-channel normalisation inside the model), so
both libraries attack the same function in the same units with ``clamp=(0, 1)``.

Run: ``.venv/bin/python benchmarks/attacks_vs_torchattacks.py`` (writes benchmarks/results/attacks_vs_torchattacks.md)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks
from _common import command, machine, markdown_table, write_result
from torch import nn

from lightning_hessian.attacks import attack_success_rate, fgsm, perturbation_norm, pgd, trust_region
from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.models import MNIST1DCNN, resnet20

ROOT = Path(__file__).resolve().parents[1]


class UnitInterval(nn.Module):
    """Takes ``(N, 1, 1, L)`` inputs in [0, 1], maps them affinely onto ``[lo, hi]`` and calls ``net``."""

    def __init__(self, net: nn.Module, lo: float, hi: float):
        super().__init__()
        self.net, self.lo, self.hi = net, lo, hi

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net((self.lo + u * (self.hi - self.lo)).flatten(1))


class Normalize(nn.Module):
    """Standardisation inside the model, so that attacks work in [0, 1] pixel units."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def mnist1d_model(device: torch.device, data_dir: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    x_train, y_train, x_test, y_test = load_mnist1d(data_dir=data_dir)
    torch.manual_seed(0)
    net = MNIST1DCNN()
    _train(net, x_train, y_train, epochs=15, batch=100, lr=1e-2)
    lo, hi = min(x_train.min(), x_test.min()).item(), max(x_train.max(), x_test.max()).item()
    model = UnitInterval(net, lo, hi).to(device).eval()
    u = ((x_test - lo) / (hi - lo)).reshape(-1, 1, 1, 40)
    return model, u.to(device), y_test.to(device), "MNIST-1D CNN (15 epochs Adam, 4000 train samples)"


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 RGB images in [0, 1]: one of ten smooth random templates plus independent pixel noise."""
    gen = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=gen), size=32, mode="bilinear")
    gen.manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = 0.5 + 0.06 * templates[y] + 0.2 * torch.randn(n, 3, 32, 32, generator=gen)
    return x.clamp(0, 1), y


def resnet_model(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    x_train, y_train = synthetic_images(2560, seed=1)
    x_test, y_test = synthetic_images(200, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(Normalize(0.5, 0.25), resnet20())
    _train(model, x_train, y_train, epochs=1, batch=64, lr=2e-3)
    desc = "ResNet-20 (1 epoch Adam on 2560 synthetic 32x32 template+noise images; normalisation inside)"
    return model.to(device), x_test.to(device), y_test.to(device), desc


def _timed(device: torch.device, fn, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def compare_gradient_attacks(model, x, y, eps_linf, eps_l2, batch, repeats, device) -> list[list[str]]:
    steps = 10
    settings = [
        ("FGSM L-inf", lambda m, a, b: fgsm(m, a, b, eps_linf, clamp=(0, 1)), torchattacks.FGSM(model, eps=eps_linf)),
        (
            f"PGD-{steps} L-inf",
            lambda m, a, b: pgd(m, a, b, eps_linf, steps=steps, step_size=2.5 * eps_linf / steps, clamp=(0, 1)),
            torchattacks.PGD(model, eps=eps_linf, alpha=2.5 * eps_linf / steps, steps=steps, random_start=True),
        ),
        (
            f"PGD-{steps} L2",
            lambda m, a, b: pgd(m, a, b, eps_l2, steps=steps, step_size=2.5 * eps_l2 / steps, norm="l2", clamp=(0, 1)),
            torchattacks.PGDL2(model, eps=eps_l2, alpha=2.5 * eps_l2 / steps, steps=steps, random_start=True),
        ),
    ]
    rows = []
    for name, ours, theirs in settings:
        ours(model, x[:batch], y[:batch]), theirs(x[:batch], y[:batch])  # warm-up
        adv_ours, adv_theirs, t_ours, t_theirs = [], [], [], []
        for i, (xb, yb) in enumerate(zip(x.split(batch), y.split(batch))):
            for r in range(repeats):
                # The same seed before either library's call (its random start); the order alternates.
                for who in ("ours", "theirs") if (i + r) % 2 == 0 else ("theirs", "ours"):
                    torch.manual_seed(i)
                    if who == "ours":
                        a, t = _timed(device, ours, model, xb, yb)
                        t_ours.append(t)
                    else:
                        b, t = _timed(device, theirs, xb, yb)
                        t_theirs.append(t)
            adv_ours.append(a)
            adv_theirs.append(b)
        acc_ours = _accuracy(model, torch.cat(adv_ours), y)
        acc_theirs = _accuracy(model, torch.cat(adv_theirs), y)
        med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
        eps = eps_l2 if "L2" in name else eps_linf
        rows.append([
            name, f"{eps:.4g}", f"{100 * acc_ours:.1f}", f"{100 * acc_theirs:.1f}",
            f"{100 * (acc_ours - acc_theirs):+.1f}", f"{1e3 * med_ours:.1f}", f"{1e3 * med_theirs:.1f}",
            f"{med_theirs / med_ours:.2f}x",
        ])
    return rows


def compare_minimal_attacks(model, x, y, cw_steps, device) -> list[list[str]]:
    attacks = [
        ("ours: trust region L2 (c=9)", lambda: trust_region(model, x, y, norm="l2", clamp=(0, 1))),
        (
            "ours: trust region L2 (c=3)",
            lambda: trust_region(model, x, y, norm="l2", num_classes_considered=3, clamp=(0, 1)),
        ),
        (
            "torchattacks DeepFool (50 steps, overshoot 0.02)",
            lambda: torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y),
        ),
    ] + [
        (
            f"torchattacks CW L2 (c=1, {s} steps, lr 0.01)",
            lambda s=s: torchattacks.CW(model, c=1, steps=s, lr=0.01)(x, y),
        )
        for s in cw_steps
    ]
    correct = model(x).argmax(1) == y
    rows, reference = [], None
    for name, run in attacks:
        x_adv, seconds = _timed(device, run)
        with torch.no_grad():
            fooled = (model(x_adv).argmax(1) != y) & correct
        rel = perturbation_norm(x, x_adv, "l2", mask=fooled).relative.item()
        per_sample = seconds / len(y)
        reference = reference or per_sample
        rows.append([
            name, f"{100 * attack_success_rate(model, x_adv, y, x=x).item():.1f}", f"{rel:.4f}",
            f"{1e3 * per_sample:.2f}", f"{per_sample / reference:.1f}x",
        ])
    return rows



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 for fair timings)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"), help="MNIST-1D cache folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()

    sections = []
    grad_header = [
        "attack", "eps", "ours acc %", "torchattacks acc %", "diff (pts)", "ours ms/batch",
        "torchattacks ms/batch", "speed-up",
    ]
    min_header = ["attack", "success % (of correct)", "mean rel. L2", "ms/sample", "time vs ours c=9"]
    setups = [
        (
            lambda: mnist1d_model(device, args.data_dir),
            dict(eps_linf=0.02, eps_l2=0.1, batch=250, repeats=5),
            dict(n=200, cw_steps=(100, 1000)),
        ),
        (
            lambda: resnet_model(device),
            dict(eps_linf=2 / 255, eps_l2=0.2, batch=50, repeats=1),
            dict(n=24, cw_steps=(100, 500)),
        ),
    ]
    for build, grad_cfg, min_cfg in setups:
        model, x, y, desc = build()
        clean = _accuracy(model, x, y)
        grad_rows = compare_gradient_attacks(model, x, y, device=device, **grad_cfg)
        min_rows = compare_minimal_attacks(model, x[: min_cfg["n"]], y[: min_cfg["n"]], min_cfg["cw_steps"], device)
        sections.append(
            f"### {desc}\n\nClean test accuracy {100 * clean:.1f}% on {len(y)} samples; inputs in [0, 1], "
            f"batches of {grad_cfg['batch']}, step size 2.5 eps / steps, random start.\n\n"
            + markdown_table(grad_header, grad_rows)
            + f"\n\nMinimal L2 perturbation on the first {min_cfg['n']} test samples (relative L2 over fooled "
            "samples; CW keeps its best successful iterate):\n\n"
            + markdown_table(min_header, min_rows)
        )

    report = "\n\n".join([
        "## Attacks: lightning_hessian vs torchattacks",
        f"Command: `{command()}`  \n"
        f"Machine: {machine(f'torchattacks {torchattacks.__version__}')}  \n"
        f"Total run time {time.perf_counter() - started:.0f} s. "
        "Timings: median over batches (and repeats) of runs interleaved with the peer, in alternating order, "
        "after a warm-up call; the same seed before each call of either library.",
        *sections,
    ])
    write_result("attacks_vs_torchattacks", report)

if __name__ == "__main__":
    main()
