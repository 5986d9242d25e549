"""Per-layer Hessian sensitivity against a dense Hessian, the perturbation against hand values, the cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from lightning_hessian.hessian.operator import HessianOperator
from lightning_hessian.models import MNIST1DCNN
from lightning_hessian.quant.sensitivity import Sensitivity, layer_sensitivity, weight_perturbation
from tests.helpers.modules import tiny_data, tiny_model
from tests.helpers.problems import fit_full_batch, loss_fn


def dense_block_traces(model: nn.Module, batch) -> dict[str, float]:
    """``Tr(H_ll)`` of every layer's weight block from the dense Hessian (torch.func.hessian)."""
    names = {"0": "0.weight", "3": "3.weight"}
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(weights):
        return loss_fn(lambda x: functional_call(model, {**params, **weights}, (x,)), batch)

    H = hessian(loss)({p: params[p] for p in names.values()})
    return {layer: float(H[p][p].reshape(params[p].numel(), -1).diagonal().sum()) for layer, p in names.items()}


def test_layer_traces_match_dense_hessian_blocks_within_standard_errors():
    model, batch = tiny_model(), tiny_data()
    exact = dense_block_traces(model, batch)
    sens = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), rel_tol=1e-9, max_samples=1500, batch=100)
    assert sens.num_samples == sens.num_hvps == 1500 and not sens.converged  # rel_tol unreachable: ran to the cap
    assert sens.params == {"0": 9, "3": 48}
    for layer, tr in exact.items():
        err = sens.trace_std_error[layer]
        assert 0 < err < 0.05 * abs(tr), (layer, err, tr)
        assert abs(sens.trace[layer] - tr) <= 4 * err, (layer, sens.trace[layer], tr, err)
        assert sens.avg_trace[layer] == pytest.approx(sens.trace[layer] / sens.params[layer])
    # A layer alone gives the same block (the other layer's weights are simply not probed).
    alone = layer_sensitivity(model, loss_fn, batch, layers=["3"], rel_tol=1e-9, max_samples=1500, batch=100)
    assert list(alone.trace) == ["3"]
    assert abs(alone.trace["3"] - exact["3"]) <= 4 * alone.trace_std_error["3"]


def test_top_eigenvalue_per_layer_matches_dense_block():
    model, batch = tiny_model(), tiny_data()
    params = {k: v.detach() for k, v in model.named_parameters()}
    sens = layer_sensitivity(model, loss_fn, batch, metrics=["eigenvalue"], eig_tol=1e-8, max_samples=64)
    assert sens.metrics == ("eigenvalue",) and sens.trace == {}  # only what was asked for
    for layer in ("0", "3"):
        p = f"{layer}.weight"
        op = HessianOperator(model, loss_fn, batch, params=[p])
        dense = op.matmat(torch.eye(op.dim, dtype=torch.float64))
        assert sens.top_eigenvalue[layer] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)
        assert params[p].numel() == sens.params[layer]
    omega = sens.omega("eigenvalue")
    assert omega["3"][4] == pytest.approx(sens.top_eigenvalue["3"] * sens.perturbation["3"][4])


def test_perturbation_and_omega_equal_a_hand_computation():
    # Per output channel, scale = max|w| / (2^(b-1) - 1); Q = clamp(round(w / scale)) * scale.
    w = torch.tensor([[0.9, -0.25, 0.5], [0.1, 0.4, -0.7]])
    pert = weight_perturbation(w, (2, 3))
    # b=2: qmax=1, scales 0.9 and 0.7: row 1 -> [0.9, 0, 0.9] (0.5/0.9 rounds to 1), row 2 -> [0, 0.7, -0.7].
    b2 = (0.25**2 + 0.4**2) + (0.1**2 + 0.3**2)
    # b=3: qmax=3, scales 0.3 and 0.7/3: row 1 -> [0.9, -0.3, 0.6], row 2 -> [0, 1.4/3, -0.7].
    b3 = (0.05**2 + 0.1**2) + (0.1**2 + (1.4 / 3 - 0.4) ** 2)
    assert pert[2] == pytest.approx(b2, rel=1e-6)
    assert pert[3] == pytest.approx(b3, rel=1e-6)
    sens = Sensitivity(params={"fc": 6}, trace={"fc": 1.5}, trace_std_error={"fc": 0.1},
                       perturbation={"fc": pert})
    assert sens.omega() == {"fc": {2: pytest.approx(1.5 / 6 * b2, rel=1e-6), 3: pytest.approx(1.5 / 6 * b3, rel=1e-6)}}
    with pytest.raises(ValueError, match=r"metric='eigenvalue' was not measured .*metrics=\['eigenvalue'\]"):
        sens.omega("eigenvalue")
    with pytest.raises(ValueError, match="metric must be one of"):
        sens.omega("hessian")


def test_omega_decreases_with_bits_on_every_layer():
    torch.manual_seed(0)
    model = MNIST1DCNN(channels=8)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    fit_full_batch(model, x, y, steps=60)  # near a minimum, where the Hessian blocks are PSD (HAWQ's setting)
    sens = layer_sensitivity(model, loss_fn, (x, y), bit_choices=range(2, 9), max_samples=32)
    assert list(sens.trace) == ["features.0", "features.2", "features.4", "classifier"]
    for layer, table in sens.omega().items():
        values = [table[b] for b in range(2, 9)]
        assert all(a > b > 0 for a, b in zip(values, values[1:])), (layer, values)
        # Each bit halves the step: the error shrinks about 4x per bit (x2 in the step, squared).
        assert 2.5 < values[4] / values[5] < 6, (layer, values)


def test_cache_hit_returns_identical_values_without_hessian_products(tmp_path, monkeypatch):
    model, batch = tiny_model(), tiny_data()
    first = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), max_samples=64, cache_dir=tmp_path)
    assert not first.cached and first.num_hvps >= 32
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1

    def no_hvps(self, V):
        raise AssertionError("a cache hit must not compute Hessian-vector products")

    monkeypatch.setattr(HessianOperator, "matmat", no_hvps)
    again = layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), max_samples=64, cache_dir=tmp_path)
    assert again.cached and again.num_hvps == 0
    assert again.trace == first.trace and again.trace_std_error == first.trace_std_error
    assert again.omega() == first.omega() and again.num_samples == first.num_samples
    # Other bit widths re-plan from the same cached Hessian: perturbations need no HVP.
    more = layer_sensitivity(model, loss_fn, batch, bit_choices=(2, 3, 4, 8), max_samples=64, cache_dir=tmp_path)
    assert more.cached and more.trace == first.trace and set(more.perturbation["0"]) == {2, 3, 4, 8}
    # New weights, new data or new settings are a miss (here: the products are requested and fail).
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    with pytest.raises(AssertionError, match="must not compute"):
        layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), max_samples=64, cache_dir=tmp_path)
    with torch.no_grad():
        model[0].weight.div_(1.01)
    with pytest.raises(AssertionError, match="must not compute"):
        layer_sensitivity(model, loss_fn, batch, bit_choices=(4, 8), max_samples=64, seed=1, cache_dir=tmp_path)
    x, y = batch
    with pytest.raises(AssertionError, match="must not compute"):
        layer_sensitivity(model, loss_fn, (x + 1, y), bit_choices=(4, 8), max_samples=64, cache_dir=tmp_path)


def _scaled_loss(scale: float):
    def loss(model, batch):  # one __qualname__ for every scale
        return scale * loss_fn(model, batch)
    return loss


def test_cache_misses_on_other_code_and_reads_generators_and_damaged_files(tmp_path):
    """The key sees what parameters do not: the activation, the loss's code and the values it closes over."""
    batch = tiny_data()
    first = layer_sensitivity(tiny_model(), loss_fn, batch, metrics=["quadratic"], cache_dir=tmp_path)
    relu = tiny_model()
    relu[1] = nn.ReLU()  # the same parameters
    fresh = layer_sensitivity(relu, loss_fn, batch, metrics=["quadratic"])
    again = layer_sensitivity(relu, loss_fn, batch, metrics=["quadratic"], cache_dir=tmp_path)
    assert not again.cached and again.quadratic["3"] != pytest.approx(first.quadratic["3"], rel=1e-3)
    for name, table in fresh.quadratic.items():  # equal up to the HVP form the operator picks
        assert again.quadratic[name] == pytest.approx(table, rel=1e-9)
    for loss, factor in ((_scaled_loss(1.0), 1.0), (_scaled_loss(3.0), 3.0), (lambda m, b: 3.0 * loss_fn(m, b), 3.0)):
        got = layer_sensitivity(tiny_model(), loss, batch, metrics=["quadratic"], cache_dir=tmp_path)
        assert not got.cached  # each loss measures once (the 1.0 one has other code than loss_fn)
        for name, table in got.quadratic.items():
            assert table == pytest.approx({b: factor * q for b, q in first.quadratic[name].items()}, rel=1e-9)
    # A generator is read once: for the key and the measurement alike.
    split = [(batch[0][:16], batch[1][:16]), (batch[0][16:], batch[1][16:])]
    listed = layer_sensitivity(tiny_model(), loss_fn, split, metrics=["quadratic"], cache_dir=tmp_path / "g")
    generated = layer_sensitivity(tiny_model(), loss_fn, iter(split), metrics=["quadratic"], cache_dir=tmp_path / "g")
    assert generated.cached and generated.quadratic == listed.quadratic
    # A file that is JSON but not a measurement is a miss, measured again and rewritten.
    (cached,) = (tmp_path / "g").glob("sensitivity-*.json")
    cached.write_text("{}")
    redone = layer_sensitivity(tiny_model(), loss_fn, split, metrics=["quadratic"], cache_dir=tmp_path / "g")
    assert not redone.cached and redone.quadratic["3"] == pytest.approx(listed.quadratic["3"], rel=1e-9)
    assert layer_sensitivity(tiny_model(), loss_fn, split, metrics=["quadratic"], cache_dir=tmp_path / "g").cached


def test_same_seed_gives_the_same_estimate_and_dict_round_trip():
    model, batch = tiny_model(), tiny_data()
    a = layer_sensitivity(model, loss_fn, batch, max_samples=48)
    b = layer_sensitivity(model, loss_fn, batch, max_samples=48)
    # Same probes; only the HVP form the operator times and picks may differ in the last bits.
    assert a.trace == pytest.approx(b.trace, rel=1e-12)
    back = Sensitivity.from_dict(a.to_dict())
    assert back == a
    assert all(math.isfinite(v) for v in a.trace.values())


def test_bad_inputs_raise_clear_errors():
    model, batch = tiny_model(), tiny_data()
    with pytest.raises(ValueError, match="no quantizable layer"):
        layer_sensitivity(nn.Sequential(nn.Tanh()), loss_fn, batch)
    with pytest.raises(ValueError, match="not quantizable layers"):
        layer_sensitivity(model, loss_fn, batch, layers=["1"])
    with pytest.raises(TypeError, match="list of module paths"):
        layer_sensitivity(model, loss_fn, batch, layers="0")
    with pytest.raises(ValueError, match="outside the supported bit widths"):
        layer_sensitivity(model, loss_fn, batch, bit_choices=(1, 4))
    with pytest.raises(ValueError, match="rel_tol must be > 0"):
        layer_sensitivity(model, loss_fn, batch, rel_tol=0)
    with pytest.raises(ValueError, match=r"metrics: \['hessian'\]; choose one or more of"):
        layer_sensitivity(model, loss_fn, batch, metrics=["trace", "hessian"])
    with pytest.raises(TypeError, match="list of metric names"):
        layer_sensitivity(model, loss_fn, batch, metrics="quadratic")
