"""Quantized modules: swapping on any model, reports and warnings, fake-quant forward, BN folding."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP, ResidualAdd, resnet20
from lightning_hessian.quant.modules import (
    QuantAct,
    QuantAdaptiveAvgPool,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    QuantResidualAdd,
    calibrate,
    fold_batchnorm,
    quantizable_layers,
    quantize_model,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def test_swap_keeps_names_and_parameters():
    model = resnet20(width=8)
    names = quantizable_layers(model)
    assert names[0] == "conv1" and names[-1] == "fc" and "layers.3.shortcut.0" in names and len(names) == 22
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resnet20 is fully quantizable: no warning
        qmodel, report = quantize_model(model, 4)
    modules = dict(qmodel.named_modules())
    assert report.weight_bits == dict.fromkeys(names, 4) and report.float_layers == {}
    assert "layers.3.shortcut.1" in report.batchnorms and len(report.batchnorms) == 21
    assert isinstance(modules["conv1"], QuantConv2d) and isinstance(modules["fc"], QuantLinear)
    assert isinstance(modules["layers.4.add"], QuantResidualAdd)
    assert isinstance(modules["pool"], QuantAdaptiveAvgPool)
    assert quantizable_layers(qmodel) == names
    float_state = model.state_dict()
    for key, value in float_state.items():
        assert torch.equal(qmodel.state_dict()[key], value)
    assert type(model.conv1) is nn.Conv2d  # the float model is untouched
    assert {modules[n].weight_bits for n in names} == {4}


def test_bits_dict_and_errors():
    model = MNIST1DCNN()
    bits = {"features.0": 8, "features.2": 4, "features.4": 6, "classifier": 2}
    qmodel, report = quantize_model(model, bits, act_bits=6)
    assert {n: qmodel.get_submodule(n).weight_bits for n in bits} == bits
    assert qmodel.features[0].act.bits == 6
    with pytest.raises(ValueError, match="features.9"):
        quantize_model(model, {"features.9": 8})
    with pytest.raises(ValueError, match=r"bits\['classifier'\]"):
        quantize_model(model, {"classifier": 9})
    with pytest.raises(ValueError, match="act_bits"):
        quantize_model(model, 8, act_bits=1)
    with pytest.raises(ValueError, match=r"act_bits='same' is not supported: use an int in 2..8 .* or 'follow'"):
        quantize_model(model, 8, act_bits="same")
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize_model(nn.Sequential(nn.ReLU()), 8)
    with pytest.warns(UserWarning, match="classifier"):
        qmodel, report = quantize_model(model, {"features.0": 8, "features.2": 8, "features.4": 8})
    assert type(qmodel.classifier) is nn.Linear and "classifier" in report.float_layers


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc1(x)
        h = self.lstm(h)[0]
        return self.fc2(h + x)  # a functional add


def test_float_leftovers_are_warned():
    with pytest.warns(UserWarning, match="left in float") as record:
        qmodel, report = quantize_model(_Odd(), 8)
    message = str(record[0].message)
    assert "lstm (LSTM: unsupported layer type)" in message and "functional add" in message
    assert set(report.float_layers) == {"lstm"} and set(report.float_ops) == {"<add>"}
    assert isinstance(qmodel.fc1, QuantLinear) and isinstance(qmodel.lstm, nn.LSTM)
    assert report.fx_error is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference models trace: nothing to warn about
        assert quantize_model(MNIST1DCNN(), 8)[1].fx_error is None


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else torch.sigmoid(self.fc(x))


def test_untraceable_model_is_scanned_by_module_and_warned():
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace the model \(TraceError.*not checked") as record:
        qmodel, report = quantize_model(_Branching(), 8)
    assert len(record) == 1 and report.fx_error.startswith("TraceError") and report.float_layers == {}
    assert isinstance(qmodel.fc, QuantLinear)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.again = self.block  # one layer at two module paths
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.again(torch.relu(self.block(x))))


def test_shared_layer_is_quantized_at_every_path():
    qmodel, report = quantize_model(_Shared(), {"block": 4, "head": 8})
    assert isinstance(qmodel.again, QuantLinear) and qmodel.again is qmodel.block
    assert report.weight_bits == {"block": 4, "head": 8} and report.float_layers == {}


def test_fake_quant_forward_is_the_quantized_formula():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    x = torch.randn(30, 12)
    qmodel, _ = quantize_model(nn.Sequential(layer), 3, act_bits=4)
    q = qmodel[0]
    calibrate(qmodel, [x])
    act = q.act
    assert act.is_signed and act.running_max == x.max()
    # written out here, not with the library's quantizers: 3-bit weights per output channel (codes -3..3),
    # 4-bit signed input (codes -7..7) on the calibrated range, the bias on the grid s_w * s_x
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    s_w = w.abs().amax(1, keepdim=True) / 3
    s_x = torch.maximum(-x.min(), x.max()).double() / 7
    wq = torch.clamp(torch.round(w / s_w), -3, 3) * s_w
    xq = torch.clamp(torch.round(x.double() / s_x), -7, 7) * s_x
    bq = torch.round(b / (s_w.squeeze(1) * s_x)) * s_w.squeeze(1) * s_x
    assert torch.equal(wq.abs().amax(1), w.abs().amax(1))  # each channel's largest weight is a code +-3
    torch.testing.assert_close(qmodel(x).double(), F.linear(xq, wq, bq), rtol=1e-6, atol=1e-6)
    # gradients reach the float weights through the STE
    qmodel.train()
    qmodel(x).square().mean().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


def test_quantized_model_close_to_float_at_8_bits():
    torch.manual_seed(0)
    model = MNIST1DMLP().eval()
    x = torch.randn(200, 40)
    qmodel, _ = quantize_model(model, 8)
    calibrate(qmodel, [x])
    with torch.no_grad():
        out, ref = qmodel.eval()(x), model(x)
    assert float((out - ref).abs().max()) < 0.03 * float(ref.abs().max())
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.95


def test_calibrate_leaves_no_trace():
    model = _randomize_bn(MNIST1DCNN(batch_norm=True))
    qmodel, _ = quantize_model(model, 8)
    qmodel.train()
    bn_before = copy.deepcopy(qmodel.features[1].state_dict())
    calibrate(qmodel, [torch.randn(16, 40), torch.randn(16, 40)])
    assert qmodel.training and all(m.training for m in qmodel.modules())
    for key, value in qmodel.features[1].state_dict().items():
        assert torch.equal(value, bn_before[key])
    assert all(bool(m.act.calibrated) for m in qmodel.modules() if isinstance(m, (QuantConv1d, QuantLinear)))


def test_calibrate_runs_batches_through_forward():
    qmodel, _ = quantize_model(MNIST1DMLP(), 8)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    seen = []

    def loss_fn(model, batch):
        seen.append(batch)
        return F.cross_entropy(model(batch[0]), batch[1])

    calibrate(qmodel, [(x, y)], loss_fn)
    assert len(seen) == 1 and all(bool(m.act.calibrated) for m in qmodel.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("conv, shape", [(nn.Conv1d(3, 5, 3, padding=1), (4, 3, 11)),
                                         (nn.Conv2d(3, 5, 3, stride=2, bias=False), (4, 3, 9, 9)),
                                         (nn.Linear(6, 5), (4, 6))])
def test_fold_batchnorm_float_exact(conv, shape):
    bn = nn.BatchNorm1d(5) if conv.weight.dim() < 4 else nn.BatchNorm2d(5)
    model = _randomize_bn(nn.Sequential(conv, bn, nn.ReLU()), seed=3)
    x = torch.randn(*shape)
    ref = model(x)
    pairs = fold_batchnorm(model, x[:1])
    assert pairs == {"1": "0"} and isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make, shape", [(lambda: MNIST1DCNN(batch_norm=True), (32, 40)),
                                         (lambda: resnet20(width=8), (8, 3, 16, 16))])
def test_fold_batchnorm_whole_float_models(make, shape):
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(*shape)
    ref = model(x)
    pairs = fold_batchnorm(model, x[:2])
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    assert len(pairs) in (3, 21)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


def test_fold_batchnorm_warns_on_unfoldable():
    model = _randomize_bn(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4)))
    with pytest.warns(UserWarning, match=r"\['0', '3'\]"):
        assert fold_batchnorm(model, torch.randn(2, 4)) == {}


class _SharedConv(nn.Module):
    """One conv called twice: after each call its own BN (``both``) or a BN after the first call only."""

    def __init__(self, both: bool):
        super().__init__()
        self.conv, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4) if both else nn.Identity()

    def forward(self, x):
        return self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x)))))


class _FunctionalConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _ShapeRead(_FunctionalConsumer):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y).view(y.shape[0], -1)  # reading y's shape does not consume its values


@pytest.mark.parametrize("make, shape, folded", [
    (lambda: _SharedConv(both=True), (2, 4, 6, 6), {}),
    (lambda: _SharedConv(both=False), (2, 4, 6, 6), {}),
    (_FunctionalConsumer, (2, 4, 6, 6), {}),
    (_ShapeRead, (2, 4, 6, 6), {"bn": "conv"}),
    # BatchNorm1d on (N, L, F) tokens normalises dim 1 (the tokens), not the Linear's features (dim -1)
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), (2, 6, 4), {}),
])
def test_fold_batchnorm_only_where_exact(make, shape, folded):
    """A BN is folded only when it alone consumes every output of its layer, along the layer's channels."""
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(*shape)
    ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fold_batchnorm(model, x) == folded
    assert bool(caught) == (not folded)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_fold_batchnorm_quantized_model_matches_unfolded():
    torch.manual_seed(0)
    model = _randomize_bn(MNIST1DCNN(batch_norm=True))
    x = torch.randn(300, 40)
    qmodel, _ = quantize_model(model, 8)
    calibrate(qmodel, [x])
    before = qmodel.eval()(x)
    codes_before = qmodel.features[0].integer_params()[0]
    fold_batchnorm(qmodel, x[:4])
    after = qmodel(x)
    # per-channel weight codes are invariant under folding a positive per-channel factor
    assert torch.equal(qmodel.features[0].integer_params()[0], codes_before)
    # the bias is requantized on the folded grid (a shift below s_w * s_in / 2 per channel) and flips a few
    # activation codes: about 10% of the quantization error itself (a fold that drops the bias: 100x)
    assert float((after - before).abs().mean()) < 0.3 * float((before - model(x)).abs().mean())
    assert (after.argmax(1) == before.argmax(1)).float().mean() > 0.98


def test_residual_add_rounds_each_input_on_its_own_grid():
    """Fake-quantized ``a + b`` is the exact sum of each input rounded by its own quantizer (straight-through),
    what the deployed ``QLinearAdd`` reads; the sum itself is rounded by whoever reads it."""
    torch.manual_seed(0)
    add = QuantResidualAdd(bits=8)
    a, b = (torch.randn(6, 5) * 3).requires_grad_(), torch.relu(torch.randn(6, 5))
    add.train()(a, b)
    assert add.act_a.is_signed and not add.act_b.is_signed  # decided from what each input holds
    sa, sb = add.act_a.scale(), add.act_b.scale()
    out = add.eval()(a, b)
    expected = torch.clamp(torch.round(a / sa), -128, 127) * sa + torch.clamp(torch.round(b / sb), 0, 255) * sb
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))  # every input inside its calibrated range: straight through


def test_standalone_quantact_and_residual_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = QuantAct(8)
            self.fc1, self.relu, self.add, self.fc2 = nn.Linear(6, 6), nn.ReLU(), ResidualAdd(), nn.Linear(6, 2)

        def forward(self, x):
            x = self.inp(x)
            return self.fc2(self.add(self.relu(self.fc1(x)), x))

    qmodel, report = quantize_model(Block(), 8)
    assert isinstance(qmodel.add, QuantResidualAdd) and isinstance(qmodel.inp, QuantAct)
    assert report.float_layers == {}


def test_activation_bits_follow_the_weight_bits():
    model = resnet20(width=4)
    bits = {name: 4 if i % 3 else 8 for i, name in enumerate(quantizable_layers(model))}
    qmodel, report = quantize_model(model, bits, act_bits="follow")
    modules = dict(qmodel.named_modules())
    assert {name: modules[name].act.bits for name in bits} == bits == report.layer_act_bits
    others = [q.bits for m in qmodel.modules() if isinstance(m, (QuantResidualAdd, QuantAdaptiveAvgPool))
              for q in m.children()]
    assert len(others) == 2 * 9 + 1 and set(others) == {8}  # the inputs of additions and the pool: 8 bits
    assert report.act_bits == "follow" and "as the weights" in str(report)
    _, fixed = quantize_model(model, bits, act_bits=6)
    assert set(fixed.layer_act_bits.values()) == {6}


def test_quantized_model_moves_like_any_module():
    from lightning_hessian.models import MNIST1DCNN
    from lightning_hessian.quant import quantize_model

    qmodel, _ = quantize_model(MNIST1DCNN(), 8)
    x = torch.randn(4, 40)
    qmodel(x)  # calibrate
    qmodel.eval()
    before = qmodel(x)
    moved = qmodel.double().float().to("cpu")
    assert all(p.dtype == torch.float32 for p in moved.parameters())
    torch.testing.assert_close(moved(x), before, rtol=1e-6, atol=1e-6)  # ranges and scales survived the casts


def test_ignored_module_types_are_not_reported():
    import warnings

    from lightning_hessian.quant import quantize_model

    class Gain(nn.Module):  # a parameter the swap does not handle
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.g

    model = nn.Sequential(nn.Linear(4, 3), Gain())
    with pytest.warns(UserWarning, match=r"left in float: .*1 \(Gain"):
        _, report = quantize_model(model, 8)
    assert "1" in report.float_layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = quantize_model(model, 8, ignore=(Gain,))
    assert "1" not in report.float_layers and not any("Gain" in str(w.message) for w in caught)
