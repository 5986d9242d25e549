"""The analyze recipe and the loss landscape, against the core and against a dense Hessian."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.func import functional_call, hessian

from lightning_hessian import recipes
from lightning_hessian.analyze import AnalysisOptions
from lightning_hessian.hessian import HessianOperator, top_eigenvalues
from lightning_hessian.landscape import loss_along, loss_line, loss_plane
from lightning_hessian.probe_set import draw_probe_indices
from tests.helpers.config import compose_config

# a 490-parameter MLP, so the dense Hessian is cheap
DATA = ["data.num_train=400", "data.num_test=100", "data.batch_size=50"]
MODEL = ["model=mnist1d_mlp", "model.net.hidden=8"]
ROOT = Path(__file__).resolve().parents[1]


def _quadratic_op(seed: int = 0) -> tuple[HessianOperator, torch.Tensor, torch.Tensor, nn.Linear]:
    """Least squares ``mean((Xw - y)^2) / 2``: the loss along any direction is an exact parabola."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    op = HessianOperator(model, lambda m, b: 0.5 * F.mse_loss(m(b[0]), b[1]), (x, y))
    return op, x, y, model


def test_loss_line_and_plane_are_the_exact_parabola_and_restore_the_parameters():
    op, x, y, model = _quadratic_op()
    w0 = model.weight.detach().clone()
    H = x.T @ x / len(x)
    grad = (x.T @ (x @ w0.T - y) / len(x)).reshape(-1)
    loss0 = float(0.5 * ((x @ w0.T - y) ** 2).mean())
    d1, d2 = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alphas = torch.linspace(-2, 2, 5, dtype=torch.float64)
    expected = loss0 + alphas * (grad @ d1) + 0.5 * alphas**2 * (d1 @ H @ d1)
    torch.testing.assert_close(loss_line(op, d1, alphas), expected, rtol=1e-12, atol=1e-12)
    betas = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    plane = loss_plane(op, d1, d2, alphas, betas)
    assert plane.shape == (5, 2)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            d = a * d1 + b * d2
            torch.testing.assert_close(plane[i, j], loss0 + grad @ d + 0.5 * d @ H @ d, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.weight, w0)
    torch.testing.assert_close(op.matvec(d1), H @ d1)  # the operator still works after the walk


def test_loss_along_restores_parameters_when_the_loss_raises():
    op, x, y, model = _quadratic_op()
    w0 = model.weight.detach().clone()
    calls = []

    def flaky(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 0.5 * F.mse_loss(m(batch[0]), batch[1])

    op.loss_fn = op._wrapper.loss_fn = flaky
    with pytest.raises(RuntimeError, match="boom"):
        loss_line(op, torch.ones(5, dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert torch.equal(model.weight, w0)


@pytest.mark.parametrize(
    "directions, coords, match",
    [
        (torch.zeros(1, 4), torch.zeros(3, 1), r"directions must have shape \(k, 5\)"),
        (torch.zeros(2, 5), torch.zeros(3, 1), r"coords must have shape \(m, 2\)"),
        (torch.full((1, 5), float("nan")), torch.zeros(3, 1), "must be finite"),
    ],
)
def test_loss_along_rejects_bad_shapes(directions, coords, match):
    op, *_ = _quadratic_op()
    with pytest.raises(ValueError, match=match):
        loss_along(op, directions, coords)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"points_1d": 20}, "points_1d must be an odd integer"), ({"top_k": 0}, "top_k must be a positive integer"),
     ({"radius": -1.0}, r"radius \(None: automatic\) must be a finite number > 0"),
     ({"radius": float("inf")}, "radius .* must be a finite number"), ({"rise": float("inf")}, "rise must be a finite"),
     ({"tol": 0.0}, "tol must be a finite number > 0"), ({"trace_rel_tol": -0.1}, "trace_rel_tol must be a finite"),
     ({"trace_max_samples": 31}, "trace_max_samples must be >= 32"), ({"seed": 1.5}, "seed must be an integer"),
     ({"mode": "test"}, "mode must be 'eval' or 'train'")],
)
def test_analysis_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnalysisOptions(**kwargs)


def test_report_is_strict_json_and_one_parameter_gets_a_line_only(tmp_path):
    from lightning_hessian.analyze import analyze_model

    op, x, y, model = _quadratic_op()
    options = AnalysisOptions(top_k=2, density_runs=1, density_steps=5, per_layer=False)
    report = analyze_model(model, op.loss_fn, [(x, y)], tmp_path, options)
    assert math.isnan(report["density"]["trace_std_error"])  # one SLQ run: no error estimate
    strict = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["density"]["trace_std_error"] is None
    assert any(line.startswith("| trace (SLQ) |") and line.endswith("± n/a |")
               for line in (tmp_path / "report.md").read_text().splitlines())
    one = nn.Linear(1, 1, bias=False).double()  # a single parameter: a 1-D landscape, no plane
    report = analyze_model(one, op.loss_fn, [(x[:, :1], y)], tmp_path / "one", options)
    assert report["num_params"] == 1 and "loss_2d" not in report["landscape"]
    assert "landscape_2d" not in report["figures"]
    assert report["landscape"]["curvature_1d"] == pytest.approx(float((x[:, :1] ** 2).mean()), rel=1e-6)


def test_figures_close_on_errors_and_draw_a_zero_trace(tmp_path):
    import matplotlib.pyplot as plt

    from lightning_hessian.plots import plot_spectrum_history

    before = plt.get_fignums()
    with pytest.raises(ValueError, match="history is empty"):
        plot_spectrum_history([], tmp_path / "h.png")
    history = [{"step": s, "eigenvalues": [1.0], "trace": 0.0, "trace_std_error": 0.0} for s in (1, 2)]
    with pytest.raises(ValueError, match="not supported"):
        plot_spectrum_history(history, tmp_path / "h.unknownext")
    assert plt.get_fignums() == before
    assert plot_spectrum_history(history, tmp_path / "h.png").stat().st_size > 0  # a zero trace is a value


def test_analyze_recipe_report_equals_the_core_and_the_dense_hessian(tmp_path, data_dir):
    train_dir = tmp_path / "train"
    spectrum = ["callbacks=hessian", "callbacks.hessian_spectrum.probe_size=200", "callbacks.hessian_spectrum.top_k=2",
                "callbacks.hessian_spectrum.trace=false", "callbacks.hessian_spectrum.plot=false",
                "callbacks.hessian_spectrum.max_overhead=null"]  # a probe every epoch of this short fit
    train_cfg = compose_config("train", DATA + MODEL + spectrum + ["trainer.max_epochs=2", "test=false"], train_dir,
                               data_dir)
    recipes.train(train_cfg)
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "analyze"
    overrides = DATA + MODEL + [
        f"ckpt_path={ckpt}", "probe.probe_size=200", "probe.probe_batch_size=64",
        "analysis.top_k=3", "analysis.tol=1e-6", "analysis.density_runs=2", "analysis.density_steps=20",
        "analysis.trace_max_samples=64", "analysis.points_1d=11", "analysis.points_2d=5",
    ]
    cfg = compose_config("analyze", overrides, out, data_dir)
    recipes.analyze(cfg)
    for name in ("report.json", "report.md", "landscape_1d.png", "landscape_2d.png", "spectral_density.png",
                 "per_layer.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())

    # the same probe set (split, size, seed), rebuilt by hand as one batch
    module = instantiate(cfg.model)
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    module.eval()
    dm = instantiate(cfg.data)
    dm.setup("fit")
    idx = draw_probe_indices(len(dm.train_set), 200, cfg.probe.seed)
    x, y = dm.train_set.tensors[0][idx], dm.train_set.tensors[1][idx]
    op = HessianOperator(module, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    direct = top_eigenvalues(op, k=3, tol=1e-8, seed=11)
    assert report["eigenvalues"] == pytest.approx(direct.eigenvalues.tolist(), rel=1e-5)
    assert report["loss"] == pytest.approx(op.loss(), rel=1e-6)
    # the same probe set as the run's HessianSpectrumCallback (same size and seed): its curve continues here
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    history = next(v["history"] for k, v in state.items() if k.startswith("HessianSpectrumCallback"))
    assert history[-1]["eigenvalues"] == pytest.approx(report["eigenvalues"][:2], rel=1e-3)

    flat = torch.cat([p.detach().reshape(-1) for p in op.params]).double()
    module.double()

    def loss_of(v):
        return F.cross_entropy(functional_call(module, dict(zip(op.names, op.unflatten(v))), (x.double(),)), y)

    dense = hessian(loss_of)(flat)
    assert report["eigenvalues"] == pytest.approx(torch.linalg.eigvalsh(dense).flip(0)[:3].tolist(), rel=1e-4)
    trace = report["trace"]
    assert abs(trace["estimate"] - float(dense.trace())) <= 4 * trace["std_error"]
    for layer, values in report["per_layer"].items():
        index = torch.cat([torch.arange(op.dim)[op.slices[n]] for n in op.names if n.startswith(layer + ".")])
        block = dense[index][:, index]
        assert values["num_params"] == len(index)
        assert values["eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-4), layer
    land = report["landscape"]
    assert land["loss_1d"][len(land["loss_1d"]) // 2] == pytest.approx(report["loss"], rel=1e-6)
    # the second difference along v1 is lambda_1 up to the grid's O(h^2) and ReLU kinks
    # (the grid is spaced for the plot, not for a derivative)
    assert land["curvature_1d"] == pytest.approx(report["eigenvalues"][0], rel=0.25)
    assert "| eigenvalue 1 |" in (out / "report.md").read_text()


def test_analyze_run_dir_without_a_run_names_the_key(tmp_path, data_dir):
    cfg = compose_config("analyze", [f"run_dir={tmp_path}/nothing"], tmp_path, data_dir)
    with pytest.raises(recipes.ConfigError, match="run_dir: .*config.yaml not found"):
        recipes.analyze(cfg)


def test_run_dir_reuses_the_runs_data_location_and_applies_model_and_data_overrides(tmp_path, data_dir):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    train = [sys.executable, str(ROOT / "recipes" / "train.py"), *DATA, "trainer.max_epochs=1", "test=false",
             f"paths.data_dir={data_dir}", f"hydra.run.dir={run}"]
    result = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    overrides = [f"run_dir={run}", "data.batch_size=25", "model.optimizer.lr=0.5"]
    cfg = compose_config("analyze", overrides, elsewhere, elsewhere / "data")  # analyze's own data dir: empty
    module, datamodule, ckpt = recipes._trained_model(cfg)
    assert (datamodule.data_dir, datamodule.num_train, datamodule.batch_size) == (str(data_dir), 400, 25)
    assert cfg.model.optimizer.lr == 0.5 and ckpt == run / "checkpoints" / "last.ckpt"
    cfg = compose_config("analyze", [f"run_dir={run}", "model=mnist1d_mlp"], elsewhere, elsewhere / "data")
    with pytest.raises(recipes.ConfigError, match="model: with run_dir the model config is the run's"):
        recipes._trained_model(cfg)


@pytest.mark.parametrize(
    "override, match",
    [
        ("probe.probe_size=100000", "probe: probe_size=100000 exceeds the 400 training samples"),
        ("probe.probe_size=-5", "probe: probe_size must be a positive integer, got -5"),
        ("probe.probe_size=100 probe.probe_batch_size=0", "probe: probe_batch_size must be a positive integer, got 0"),
        ("analysis.trace_max_samples=20", "analysis: trace_max_samples must be >= 32"),
        ("probe.split=val", "probe.split: must be 'train' or 'test', got 'val'"),
        ("analysis.points_1d=4", "analysis: points_1d must be an odd integer"),
        ("+analysis.bogus=1", "analysis: .*unexpected keyword argument 'bogus'"),
    ],
)
def test_analyze_bad_values_name_the_key(override, match, tmp_path, data_dir):
    cfg = compose_config("analyze", DATA + MODEL + [f"ckpt_path={tmp_path}/fresh.ckpt", *override.split()], tmp_path,
                         data_dir)
    torch.save({"state_dict": instantiate(cfg.model).state_dict()}, tmp_path / "fresh.ckpt")
    with pytest.raises(recipes.ConfigError, match=match):
        recipes.analyze(cfg)
