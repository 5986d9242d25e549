"""Layer parameter counts and MACs against hand formulas; size/BOPS tables, budgets and float baselines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hessian.models import MNIST1DCNN, resnet20
from lightning_hessian.quant.allocation import allocate_bits, allocation_total
from lightning_hessian.quant.costs import (
    LayerStats,
    bops_costs,
    budget_between,
    layer_costs,
    layer_stats,
    model_bops,
    model_size,
    size_costs,
)
from lightning_hessian.quant.report import bit_report
from lightning_hessian.quant.swap import quantizable_layers, quantize_model


def conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def test_mnist1d_cnn_params_and_macs_match_formula():
    stats = layer_stats(MNIST1DCNN(channels=25), torch.randn(3, 40))
    assert list(stats) == ["features.0", "features.2", "features.4", "classifier"]
    l1 = conv_out(40, 5, 2, 1)  # 19
    l2 = conv_out(l1, 3, 2, 1)  # 10
    l3 = conv_out(l2, 3, 2, 1)  # 5
    assert stats["features.0"] == LayerStats("Conv1d", 25 * 1 * 5, 25, 25 * l1 * 1 * 5)
    assert stats["features.2"] == LayerStats("Conv1d", 25 * 25 * 3, 25, 25 * l2 * 25 * 3)
    assert stats["features.4"] == LayerStats("Conv1d", 25 * 25 * 3, 25, 25 * l3 * 25 * 3)
    assert stats["classifier"] == LayerStats("Linear", 25 * l3 * 10, 10, 25 * l3 * 10)
    assert (l1, stats["features.0"].macs) == (19, 2375)
    # With batch norm the conv paths shift; (N, 1, L) input gives the same counts.
    bn = layer_stats(MNIST1DCNN(channels=25, batch_norm=True), torch.randn(2, 1, 40))
    assert list(bn) == ["features.0", "features.3", "features.6", "classifier"]
    assert [s.macs for s in bn.values()] == [s.macs for s in stats.values()]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model, x = resnet20(), torch.randn(2, 3, 32, 32)
    return model, x, layer_stats(model, x)


def test_resnet20_params_and_macs_match_formula(resnet):
    model, _, stats = resnet
    assert len(stats) == 1 + 18 + 2 + 1  # stem, 9 blocks x 2 convs, 2 downsample shortcuts, fc
    assert stats["conv1"] == LayerStats("Conv2d", 16 * 3 * 9, 0, 16 * 32 * 32 * 3 * 9)
    assert stats["layers.3.conv1"] == LayerStats("Conv2d", 32 * 16 * 9, 0, 32 * 16 * 16 * 16 * 9)  # stride 2
    assert stats["layers.3.shortcut.0"] == LayerStats("Conv2d", 32 * 16, 0, 32 * 16 * 16 * 16)
    assert stats["layers.8.conv2"] == LayerStats("Conv2d", 64 * 64 * 9, 0, 64 * 8 * 8 * 64 * 9)
    assert stats["fc"] == LayerStats("Linear", 64 * 10, 10, 64 * 10)
    # Whole network: stem + per stage (first conv, 5 more 3x3 convs, 1x1 shortcut) + fc.
    stage = lambda cin, c, hw: c * hw * hw * cin * 9 + 5 * c * hw * hw * c * 9 + (c * hw * hw * cin if cin != c else 0)
    total = 16 * 32 * 32 * 3 * 9 + stage(16, 16, 32) + stage(16, 32, 16) + stage(32, 64, 8) + 640
    assert sum(s.macs for s in stats.values()) == total == 40_813_184
    conv_linear = sum(p.numel() for n, p in model.named_parameters() if "bn" not in n and "shortcut.1" not in n)
    assert sum(s.params + s.bias for s in stats.values()) == conv_linear


def test_macs_of_grouped_conv_shared_layer_and_sequence_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, (3, 2), stride=1, padding=0, groups=2)
            self.head = nn.Linear(5, 7)
            self.unused = nn.Linear(3, 3)

        def forward(self, x, seq):
            self.head(seq.new_zeros(1, 5))  # a second call of the same layer, on one row
            return self.conv(x).sum() + self.head(seq).sum()

    with pytest.warns(UserWarning, match=r"\['unused'\] did not run"):
        stats = layer_stats(Net(), {"x": torch.randn(2, 4, 8, 8), "seq": torch.randn(2, 9, 5)})
    assert stats["conv"].macs == 6 * 6 * 7 * (4 // 2) * 3 * 2
    # head runs twice: on a (1, 5) tensor and on (2, 9, 5); per sample of the batch of 2.
    assert stats["head"].macs == (1 * 7 * 5 + 2 * 9 * 7 * 5) // 2
    assert stats["unused"].macs == 0
    only = layer_stats(Net(), (torch.randn(2, 4, 8, 8), torch.randn(2, 9, 5)), layers=["conv"])
    assert list(only) == ["conv"] and only["conv"] == stats["conv"]


def test_layer_stats_leaves_modes_and_buffers_untouched():
    model = MNIST1DCNN(batch_norm=True).train()
    model.features[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    layer_stats(model, torch.randn(4, 40) * 3 + 1)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_size_and_bops_tables_and_float_baselines():
    stats = {"a": LayerStats("Conv2d", 100, 10, 5000), "b": LayerStats("Linear", 40, 0, 40)}
    assert size_costs(stats, (4, 8)) == {"a": {4: 400.0, 8: 800.0}, "b": {4: 160.0, 8: 320.0}}
    assert size_costs(stats, (8, 4), unit="bytes") == {"a": {4: 50.0, 8: 100.0}, "b": {4: 20.0, 8: 40.0}}
    assert bops_costs(stats, (2, 8)) == {"a": {2: 5000 * 4.0, 8: 5000 * 64.0}, "b": {2: 160.0, 8: 2560.0}}
    assert bops_costs(stats, (2, 8), activation_bits=8)["a"] == {2: 5000 * 16.0, 8: 5000 * 64.0}
    assert model_size(stats) == 32 * (100 + 10 + 40)
    assert model_size(stats, {"a": 4, "b": 8}, unit="bytes") == (100 * 4 + 10 * 32 + 40 * 8) / 8
    assert model_size(stats, {"a": 4}) == 100 * 4 + 10 * 32 + 40 * 32  # b stays float
    assert model_bops(stats) == 32 * 32 * (5000 + 40)
    assert model_bops(stats, {"a": 4, "b": 8}) == 5000 * 16 + 40 * 64
    assert model_bops(stats, {"a": 4, "b": 8}, activation_bits=8) == 5000 * 32 + 40 * 64


@pytest.mark.parametrize("count", [model_size, model_bops, bit_report])
def test_bit_widths_are_checked_by_every_count(count):
    stats = {"a": LayerStats("Linear", 100, 10, 5000)}
    with pytest.raises(ValueError, match=r"bits\['a'\].* 2\.\.8"):
        count(stats, {"a": 40})
    with pytest.raises(ValueError, match=r"bits names layers \['c'\] that stats does not have; stats has \['a'\]"):
        count(stats, {"c": 4})


def test_budget_between_is_hawq_v3_fraction():
    costs = size_costs({"a": LayerStats("Linear", 100, 0, 1), "b": LayerStats("Linear", 300, 0, 1)}, (2, 4, 8))
    assert budget_between(costs, 0.0) == 400 * 4
    assert budget_between(costs, 1.0) == 400 * 8
    assert budget_between(costs, 0.25) == 400 * 4 + 0.25 * 400 * 4
    assert budget_between(costs, 0.5, low_bits=2, high_bits=4) == 400 * 3


def test_layer_costs_feed_allocate_bits_on_resnet20(resnet):
    model, x, stats = resnet
    costs = layer_costs(model, x, bit_choices=(4, 8))
    assert costs["size"]["conv1"] == {4: 432 * 4.0, 8: 432 * 8.0}
    assert costs["bops"]["fc"] == {4: 640 * 16.0, 8: 640 * 64.0}
    # Sensitivity proportional to parameters: the budget decides how many parameters get 8 bits.
    sens = {name: {4: float(s.params), 8: 0.0} for name, s in stats.items()}
    budget = budget_between(costs["size"], 0.5)
    bits = allocate_bits(sens, costs, {"size": budget})
    assert allocation_total(costs["size"], bits) <= budget
    eight = sum(stats[n].params for n, b in bits.items() if b == 8)
    total = sum(s.params for s in stats.values())
    assert allocation_total(sens, bits) == total - eight  # objective = parameters left at 4 bits
    # Budget 6 * total bits allows 8 bits on at most half the parameters: a subset-sum, solved by bitset DP.
    reachable = 1
    for s in stats.values():
        reachable |= reachable << s.params
    best = (reachable & ((2 << (total // 2)) - 1)).bit_length() - 1  # largest reachable sum <= total / 2
    assert eight == best


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: layer_stats(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), torch.randn(2, 3)), ValueError,
         "no quantizable layer"),
        (lambda: layer_stats(MNIST1DCNN(), torch.randn(2, 40), layers=["features.1"]), ValueError,
         r"\['features.1'\] are not quantizable layers"),
        (lambda: layer_stats(MNIST1DCNN(), torch.randn(2, 40), layers="classifier"), TypeError, "list of module paths"),
        (lambda: layer_stats(MNIST1DCNN(), torch.tensor(1.0)), ValueError, "example_input must be a batched"),
        (lambda: layer_costs(MNIST1DCNN(), torch.randn(2, 40), bit_choices=(1, 8)), ValueError,
         r"bit_choices=1 is outside the supported bit widths 2..8"),
        (lambda: bops_costs({}, (4,), activation_bits=64), ValueError, "activation_bits must be None"),
        (lambda: size_costs({}, (4,), unit="kb"), ValueError, "unit must be one of"),
        (lambda: budget_between({"a": {4: 1.0, 8: 2.0}}, 1.5), ValueError, r"fraction must be in \[0, 1\]"),
        (lambda: budget_between({"a": {2: 1.0, 8: 2.0}}, 0.5), ValueError, r"no 4-bit cost for layers \['a'\]"),
        (lambda: model_size({"a": LayerStats("Linear", 1, 0, 1)}, {"b": 4}), ValueError, r"\['b'\]"),
    ],
)
def test_bad_input_raises_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


class ScaledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_costs_and_quantize_model_agree_on_quantizable_layers():
    # A subclass stays float in quantize_model (a swap would drop its forward), so it has no cost either.
    model = nn.Sequential(ScaledConv(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(2, 1, 8, 8)
    assert list(layer_stats(model, x)) == quantizable_layers(model) == ["1", "3"]
    with pytest.warns(UserWarning, match="ScaledConv: unsupported layer type"):
        qmodel, _ = quantize_model(model, 8)
    assert list(layer_stats(qmodel, x)) == quantizable_layers(qmodel) == ["1", "3"]


class _Gated(nn.Module):
    """A head that runs only for 4-feature inputs (an early-exit branch)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x) if x.shape[-1] == 4 else x


def test_report_of_a_layer_that_never_ran(tmp_path):
    with pytest.warns(UserWarning, match="MACs are 0"):
        stats = layer_stats(_Gated(), torch.randn(2, 3))
    report = bit_report(stats, {"head": 4})
    total = report.to_markdown().splitlines()[3]  # size: 8 x 4 + 2 x 32 bits against 8 x 32 + 2 x 32
    assert total.endswith("0.01 (0.04), 3.33x | 0.00 (0.00), n/a |"), total
    assert report.plot(tmp_path / "bits.png").stat().st_size > 0
