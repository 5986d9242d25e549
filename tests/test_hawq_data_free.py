"""HAWQModule with calibration="distilled" (ZeroQ): planned and calibrated with no training data, end to end; the
exact Pareto frontier in its report."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.models import MNIST1DCNN, ClassificationModule
from lightning_hessian.quant.allocation import allocate_bits, allocation_total
from lightning_hessian.quant.costs import budget_between, size_costs
from lightning_hessian.quant.distill import batchnorm_mismatch
from lightning_hessian.quant.hawq import HAWQModule
from lightning_hessian.quant.modules import QuantAct
from lightning_hessian.quant.sensitivity import layer_sensitivity
from tests.conftest import fit_full_batch

TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False)
DISTILL = {"batch_size": 32, "max_steps": 150}


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    return x, (x[:, :20].sum(1) > 0).long() + 2 * (x[:, 20:].sum(1) > 0).long()


class NoTrainingData(ClassificationModule):
    """A module whose training data cannot be reached: any attempt to read it fails the test."""

    def train_dataloader(self):
        raise AssertionError("the data-free path asked for training data")


@pytest.fixture(scope="module")
def trained() -> ClassificationModule:
    """The MNIST-1D CNN with BatchNorm, trained in training mode (so the running statistics are the data's)."""
    torch.manual_seed(0)
    module = NoTrainingData(MNIST1DCNN(channels=6, num_classes=4, batch_norm=True),
                            optimizer=partial(torch.optim.Adam, lr=3e-3), num_classes=4)
    fit_full_batch(module, *make_data(512, 0), steps=150)
    return module.eval()


def accuracy(module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(-1) == y).float().mean())


def test_test_run_plans_and_calibrates_on_distilled_data_only(trained, tmp_path):
    """``trainer.test`` on test data alone: the plan is the MIP's optimum of the KL sensitivity measured on the
    distilled batches, the activation ranges come from them, and the quantized model stays close to float."""
    hawq = HAWQModule(trained, budgets={"size": 0.5}, bit_choices=(2, 8), metric="kl", calibration="distilled",
                      input_shape=(40,), probe_size=64, probe_batch_size=32, distill=DISTILL, report_dir=tmp_path)
    x, y = make_data(256, 1)
    pl.Trainer(**TRAINER).test(hawq, DataLoader(TensorDataset(x, y), batch_size=128), verbose=False)
    batches = hawq.distilled_batches()
    assert [tuple(b[0].shape) for b in batches] == [(32, 40), (32, 40)]
    assert max(batchnorm_mismatch(trained, torch.cat([b[0] for b in batches])).values()) <= 0.05
    assert torch.equal(batches[0][1], trained(batches[0][0]).argmax(-1))  # labelled with the float prediction

    expected = layer_sensitivity(trained, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batches,
                                 bit_choices=(2, 8), metrics=["kl"])
    assert hawq.sensitivity.kl == expected.kl
    costs = {"size": size_costs(hawq.stats, (2, 8))}
    assert hawq.weight_bits == allocate_bits(expected.kl, costs, {"size": budget_between(costs["size"], 0.5, 2, 8)})
    assert set(hawq.weight_bits.values()) == {2, 8}

    acts = [m for m in hawq.module.modules() if isinstance(m, QuantAct)]
    assert acts and all(bool(q.calibrated) for q in acts)
    distilled_x = torch.cat([b[0] for b in batches])
    first = hawq.module.net.features[0].act  # the input range is the distilled inputs' own
    assert (float(first.running_min), float(first.running_max)) == (float(distilled_x.min()), float(distilled_x.max()))
    real = HAWQModule(trained, bits=hawq.weight_bits)  # the same bits, calibrated on real training samples
    real.quantize(hawq.weight_bits)
    real.calibrate([make_data(64, 0)])
    assert accuracy(hawq.module.eval(), x, y) >= accuracy(real.module.eval(), x, y) - 0.03

    frontier = hawq.bit_report().frontier  # the MIP's plan lies on the exact frontier
    assert frontier.resource == "size" and len(frontier.costs) >= 4
    assert frontier.chosen_objective == pytest.approx(frontier.least_within(frontier.chosen_cost), rel=1e-12)
    text = (tmp_path / "hawq_report.md").read_text()
    assert "Pareto frontier (size against summed Omega)" in text and (tmp_path / "hawq_report.png").exists()


def test_prepare_data_free_needs_no_trainer_and_matches_the_test_run(trained, tmp_path):
    """No Trainer, no data: the same plan and activation ranges as a test run, and deterministic."""
    kwargs = dict(bits=None, budgets={"size": 0.5}, bit_choices=(4, 8), calibration="distilled", input_shape=(40,),
                  probe_size=32, probe_batch_size=32, distill=DISTILL, metric="quadratic", seed=3)
    free = HAWQModule(trained, **kwargs)
    bits = free.prepare_data_free()
    assert bits == free.weight_bits and free.stats is not None
    other = HAWQModule(trained, **kwargs)
    x, y = make_data(64, 2)
    pl.Trainer(**TRAINER).test(other, DataLoader(TensorDataset(x, y), batch_size=64), verbose=False)
    assert other.weight_bits == bits
    assert torch.equal(other.distilled_batches()[0][0], free.distilled_batches()[0][0])
    ranges = [(q.running_min, q.running_max) for q in free.module.modules() if isinstance(q, QuantAct)]
    assert ranges == [(q.running_min, q.running_max) for q in other.module.modules() if isinstance(q, QuantAct)]

    fixed = HAWQModule(trained, bits=8, calibration="distilled", input_shape=(40,), probe_size=32, distill=DISTILL,
                       report_dir=tmp_path)
    assert set(fixed.prepare_data_free().values()) == {8} and (tmp_path / "hawq_report.md").exists()
    assert fixed.sensitivity is None  # nothing to plan, nothing measured
    assert accuracy(fixed.module.eval(), x, y) >= accuracy(trained, x, y) - 0.05


def test_data_free_errors_name_the_argument(trained):
    with pytest.raises(ValueError, match="calibration must be one of"):
        HAWQModule(trained, bits=8, calibration="noise")
    with pytest.raises(ValueError, match="input_shape="):
        HAWQModule(trained, bits=8, calibration="distilled")
    plain = ClassificationModule(MNIST1DCNN(channels=4))
    with pytest.raises(ValueError, match="has no BatchNorm layer.*calibration='data'"):
        HAWQModule(plain, bits=8, calibration="distilled", input_shape=(40,))
    with pytest.raises(ValueError, match=r"distill: \['seed'\] are set by HAWQModule"):
        HAWQModule(trained, bits=8, calibration="distilled", input_shape=(40,), distill={"seed": 1})
    with pytest.raises(ValueError, match=r"distill: unknown options \['steps'\]"):
        HAWQModule(trained, bits=8, calibration="distilled", input_shape=(40,), distill={"steps": 1})
    with pytest.raises(ValueError, match="calibration='distilled'"):
        HAWQModule(trained, bits=8).prepare_data_free()
    with pytest.raises(ValueError, match="needs bits= .* or budgets="):
        HAWQModule(trained, calibration="distilled", input_shape=(40,)).prepare_data_free()
    example = HAWQModule(trained, bits=8, calibration="distilled", example_input=torch.zeros(2, 40))
    assert example.input_shape == (40,)

    class NoForward(ClassificationModule):
        forward = nn.Module.forward

    bare = NoForward(MNIST1DCNN(channels=4, batch_norm=True))
    with pytest.raises(ValueError, match="has none: give it a forward"):
        HAWQModule(bare, bits=8, calibration="distilled", input_shape=(40,), probe_size=8,
                   distill={"max_steps": 1}).distilled_batches()


def test_bit_report_plots_the_frontier_beside_the_bits(tmp_path):
    """The report's frontier text and figure from plain tables (no module): the chosen plan is marked."""
    from lightning_hessian.quant.allocation import pareto_frontier
    from lightning_hessian.quant.costs import LayerStats
    from lightning_hessian.quant.report import bit_report, frontier_of

    stats = {f"l{i}": LayerStats("Linear", 100 * (i + 1), 0, 1000) for i in range(4)}
    sens = {name: {4: 1.0 / (i + 1), 8: 0.01} for i, name in enumerate(stats)}
    costs = {"size": size_costs(stats, (4, 8))}
    points = pareto_frontier(sens, costs, "size", "all")
    plan = {"l0": 4, "l1": 4, "l2": 4, "l3": 8}  # not the best at its size: l0 and l2 at 8 bits cost as much
    frontier = frontier_of(points, "size", costs["size"], sens, plan)
    assert frontier.chosen_cost == allocation_total(costs["size"], plan) == 600 * 4 + 400 * 8
    assert frontier.least_within(frontier.chosen_cost) < frontier.chosen_objective
    assert frontier.least_within(points[0].budget - 1) == float("inf")
    report = bit_report(stats, plan, frontier=frontier)
    assert f"{len(points)} non-dominated allocations" in report.to_markdown()
    table, png = report.save(tmp_path)
    assert png.stat().st_size > 0 and "Pareto frontier" in table.read_text()


def test_quantize_recipe_data_free_reads_no_data(tmp_path, data_dir):
    """``hawq.calibration=distilled test=false``: no data config is instantiated (its folder does not exist), the
    plan meets the budget, the report and the integer-only export are written."""
    import json

    from hydra.utils import instantiate

    from lightning_hessian import recipes
    from tests.conftest import compose_config

    overrides = [f"ckpt_path={tmp_path}/fresh.ckpt", "model.net.batch_norm=true", "hawq.calibration=distilled",
                 "hawq.input_shape=[40]", "hawq.metric=kl", "hawq.probe_size=32", "hawq.probe_batch_size=32",
                 "hawq.distill.max_steps=30", "test=false", f"data.data_dir={tmp_path}/no_such_folder"]
    cfg = compose_config("quantize", overrides, tmp_path / "out", data_dir)
    torch.manual_seed(0)
    torch.save({"state_dict": instantiate(cfg.model).state_dict()}, tmp_path / "fresh.ckpt")
    report = recipes.quantize(cfg)
    assert not (tmp_path / "no_such_folder").exists()
    assert report["calibration"] == "distilled" and report["quantized"] == {} and report["integer"]["test/acc"] is None
    assert set(report["weight_bits"].values()) == {4, 8}
    assert json.loads((tmp_path / "out" / "quantize_report.json").read_text())["weight_bits"] == report["weight_bits"]
    assert "Pareto frontier" in (tmp_path / "out" / "hawq" / "hawq_report.md").read_text()
    assert (tmp_path / "out" / "model_int.onnx").stat().st_size > 0
    plain = compose_config("quantize", [f"ckpt_path={tmp_path}/plain.ckpt", *overrides[2:]], tmp_path / "out2",
                           data_dir)
    torch.save({"state_dict": instantiate(plain.model).state_dict()}, tmp_path / "plain.ckpt")
    with pytest.raises(recipes.ConfigError, match="hawq: .*has no BatchNorm layer"):
        recipes.quantize(plain)


@pytest.mark.slow
def test_quantize_recipe_data_free_from_a_train_run(tmp_path, data_dir):
    """A trained run with BatchNorm quantized data-free from its run_dir: the input shape comes from the test split,
    the test accuracy at W8A8 stays within a point of float, the integer-only export agrees with the simulation."""
    from lightning_hessian import recipes
    from tests.conftest import compose_config

    data = ["data.num_train=1000", "data.num_test=500", "data.batch_size=50", "model.net.batch_norm=true"]
    train_dir = tmp_path / "train"
    recipes.train(compose_config("train", [*data, "trainer.max_epochs=5", "test=false"], train_dir, data_dir))
    overrides = [*data, f"ckpt_path={train_dir}/checkpoints/last.ckpt", "hawq.calibration=distilled",
                 "hawq.budgets=null", "hawq.bits=8", "hawq.probe_size=64"]
    report = recipes.quantize(compose_config("quantize", overrides, tmp_path / "quantize", data_dir))
    assert set(report["weight_bits"].values()) == {8} and report["act_bits"] == 8
    assert report["float"]["test/acc"] > 0.5
    assert abs(report["quantized"]["test/acc"] - report["float"]["test/acc"]) <= 0.01
    assert abs(report["integer"]["test/acc"] - report["quantized"]["test/acc"]) <= 0.01
