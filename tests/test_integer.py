"""Integer models: onnxruntime reproduces them bit for bit, they agree with the trained model, clear errors."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP, ResidualAdd, resnet20
from lightning_hessian.quant.export import export_onnx, export_program
from lightning_hessian.quant.integer import (
    AddStep,
    ConvStep,
    DequantizeStep,
    IntegerModel,
    LinearStep,
    PermuteStep,
    PoolStep,
    QuantizeStep,
    ReluStep,
    RequantStep,
    to_integer_model,
)
from lightning_hessian.quant.modules import QuantAct, calibrate, fold_batchnorm, quantizable_layers, quantize_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.filterwarnings("error:export_onnx")  # its own check against onnxruntime must pass


def _train_bn(model: nn.Module, shape: tuple, steps: int = 3) -> nn.Module:
    """A few training-mode batches so BatchNorm statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape) * 2 + 0.5)
    return model.eval()


@torch.no_grad()
def _spread_logits(model: nn.Module) -> nn.Module:
    """A 10x larger classifier, so an untrained network's top-1 is not one class for nearly every input."""
    model.fc.weight.mul_(10)
    return model


def _pipeline(model: nn.Module, bits, x: torch.Tensor, act_bits: int | str = 8):
    """quantize -> calibrate (a few training-mode batches) -> fold BN -> (fake-quantized model, integer model)."""
    qmodel, _ = quantize_model(model, bits, act_bits)
    qmodel.train()
    with torch.no_grad():
        for chunk in x.split(max(1, len(x) // 3)):
            qmodel(chunk)
    fold_batchnorm(qmodel, x[:4])
    return qmodel.eval(), to_integer_model(qmodel, x[:8])


def _onnx_run(integer: IntegerModel, example: torch.Tensor, x: torch.Tensor, path, **kwargs) -> np.ndarray:
    path = export_onnx(integer, example, path, **kwargs)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


CASES = {  # make, input shape, weight bits, activation bits
    "cnn_bn": (lambda: _train_bn(MNIST1DCNN(batch_norm=True), (64, 40)), (300, 40),
               {"features.0": 8, "features.3": 4, "features.6": 6, "classifier": 8}, 8),
    "cnn_bn_follow": (lambda: _train_bn(MNIST1DCNN(batch_norm=True), (64, 40)), (300, 40),
                      {"features.0": 4, "features.3": 8, "features.6": 6, "classifier": 5}, "follow"),
    "mlp": (lambda: MNIST1DMLP(), (300, 40), {"net.0": 8, "net.2": 4, "net.4": 8}, 8),
    "resnet20": (lambda: _spread_logits(_train_bn(resnet20(width=16), (16, 3, 32, 32))), (32, 3, 32, 32), 8, 8),
    "resnet20_follow": (lambda: _train_bn(resnet20(width=4), (16, 3, 32, 32)), (64, 3, 32, 32),
                        {"conv1": 8, "layers.0.conv1": 4, "layers.1.conv1": 4, "layers.3.conv2": 4,
                         "layers.3.shortcut.0": 6, "fc": 6}, "follow"),
}


def _inputs(shape: tuple) -> torch.Tensor:
    """Random signals with per-sample offset and contrast (like images), so untrained models' top-1 varies."""
    per_sample = (shape[0], *([1] * (len(shape) - 1)))
    offset_shape = (shape[0], shape[1], *([1] * (len(shape) - 2))) if len(shape) > 2 else per_sample
    return torch.randn(*shape) * (torch.rand(per_sample) * 2 + 0.2) + torch.randn(offset_shape)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    make, shape, bits, act_bits = CASES[request.param]
    x = _inputs(shape)
    model = make()
    if isinstance(bits, dict) and len(bits) < len(quantizable_layers(model)):  # the rest at 8 bits
        bits = {name: bits.get(name, 8) for name in quantizable_layers(model)}
    qmodel, integer = _pipeline(model, bits, x, act_bits)
    return request.param, x, qmodel, integer, model.eval()


def test_onnxruntime_reproduces_the_integer_model(case, tmp_path):
    name, x, _, integer, _ = case
    with torch.no_grad():
        out = integer(x)
        one = integer(x[:1])
    assert out.dtype == torch.float32
    assert np.array_equal(_onnx_run(integer, x[:8], x, tmp_path / f"{name}.onnx"), out.numpy())  # another batch
    assert np.array_equal(_onnx_run(integer, x[:8], x[:1], tmp_path / f"{name}_1.onnx"), one.numpy())  # batch 1
    assert torch.equal(one, out[:1])  # one sample (an overlapping im2col view in torch)
    assert len(torch.unique(out.argmax(1))) > 1  # not a degenerate constant model


def test_the_trained_model_is_the_deployed_model(case):
    """Fake quantization rounds where the integer model rounds, with the same rounding: they differ where
    float32 accumulation order moves a value across a rounding boundary, a small fraction of what
    quantization itself changes, and top-1 agrees."""
    _, x, qmodel, integer, model = case
    with torch.no_grad():
        out, fake, ref = integer(x), qmodel(x), model(x)
    assert float((out - fake).abs().mean()) < 0.1 * float((fake - ref).abs().mean())
    assert float((out.argmax(1) == fake.argmax(1)).float().mean()) >= 0.98


def test_integer_parameters_are_integer_containers(case, tmp_path):
    name, x, _, integer, _ = case
    layers = [m for m in integer.steps if isinstance(m, (ConvStep, LinearStep))]
    assert layers
    for m in layers:
        assert m.weight.dtype == torch.int8 and m.bias.dtype == torch.int32
        assert int(m.weight.abs().max()) == 2 ** (m.weight_bits - 1) - 1  # per-channel scales reach qmax
        if name.endswith("follow"):  # b-bit weights read b-bit input codes
            assert m.in_q.qmax - m.in_q.qmin + 1 == 2**m.weight_bits
    graph = onnx.load(str(export_onnx(integer, x[:8], tmp_path / f"{name}.onnx"))).graph
    ops = {n.op_type for n in graph.node}
    assert {"QLinearConv", "QGemm"} & ops and not {"Conv", "MatMul", "Gemm", "MatMulInteger"} & ops
    int4 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == len({m.weight.data_ptr() for m in layers if m.weight_bits <= 4})  # packed 4-bit weights


def test_every_step_type_is_bit_exact_in_onnxruntime(tmp_path):
    """One small model per step type or form not in the cases above: a conv ending the model (its
    accumulators dequantized), a linear over tokens with a permute, a quantizer reading a quantizer, an
    average pool to 2x2 windows, a ReLU on signed codes and a model ending on a quantizer."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(20, 3)

        def forward(self, x):
            return self.b(self.a(x).transpose(1, 2).flatten(1))

    class SignedRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.q, self.b = nn.Linear(8, 8), QuantAct(6, signed=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.q(self.a(x))))

    models = {
        "conv_out": (nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, dilation=2)),
                     (20, 3, 12, 12), ConvStep),
        "tokens": (Tokens(), (30, 5, 6), PermuteStep),
        "requant": (nn.Sequential(QuantAct(8), nn.Linear(10, 16), nn.ReLU(), QuantAct(6, signed=False),
                                  nn.Linear(16, 3)), (100, 10), RequantStep),
        "pool2": (nn.Sequential(nn.Conv2d(3, 6, 3, padding="same"), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                nn.Linear(24, 5)), (20, 3, 8, 8), PoolStep),
        "signed_relu": (SignedRelu(), (50, 8), ReluStep),
        "quant_out": (nn.Sequential(nn.Linear(8, 4), QuantAct(8)), (50, 8), DequantizeStep),
    }
    for name, (model, shape, step_type) in models.items():
        torch.manual_seed(0)
        x = torch.randn(*shape)
        _, integer = _pipeline(model, 5 if name == "pool2" else 8, x)
        assert any(isinstance(s, step_type) for s in integer.steps), name
        with torch.no_grad():
            out = integer(x)
        assert np.array_equal(_onnx_run(integer, x[:8], x, tmp_path / f"{name}.onnx"), out.numpy()), name
        if name == "conv_out":  # its accumulators dequantized (ConvInteger in ONNX)
            last = integer.steps[integer.output - 1]
            assert isinstance(last, ConvStep) and last.out_q is None


def test_readers_at_different_bits_get_their_own_steps(tmp_path):
    """A residual block's input read at 4 bits (the conv) and at 8 bits (the addition): the producing
    addition runs once per reader, each rounding the sum once; ONNX carries both."""
    torch.manual_seed(0)
    model = _train_bn(resnet20(width=4), (16, 3, 32, 32))
    bits = {name: 4 if name == "layers.1.conv1" else 8 for name in quantizable_layers(model)}
    x = _inputs((32, 3, 32, 32))
    _, integer = _pipeline(model, bits, x, "follow")
    adds = [s for s in integer.steps if isinstance(s, AddStep)]
    assert len(adds) == 10 and len({(s.out_q.qmax, s.out_q.scale) for s in adds}) == 10  # 9 blocks + 1 extra
    assert sum(isinstance(s, ConvStep) for s in integer.steps) == 21  # layers.0's input is read at 8 bits only
    with torch.no_grad():
        assert np.array_equal(_onnx_run(integer, x[:8], x, tmp_path / "m.onnx"), integer(x).numpy())


def test_odd_channel_counts_are_padded_to_fast_kernels_exactly(tmp_path):
    """25 channels export as 28 (onnxruntime's symmetric int8 kernels take multiples of 4): zero filters, zero
    weights where the next conv and the flattened classifier read them; the logits stay bit-identical."""
    torch.manual_seed(0)
    x = _inputs((64, 40))
    _, integer = _pipeline(MNIST1DCNN(channels=25), 8, x)
    path = tmp_path / "cnn.onnx"
    out = _onnx_run(integer, x[:8], x, path)
    graph = onnx.load(str(path)).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "QLinearConv"]
    assert [shapes[n.input[3]][:2] for n in convs] == [[28, 1], [28, 28], [28, 28]]
    gemm = next(n for n in graph.node if n.op_type == "QGemm")
    assert shapes[gemm.input[3]] == [10, 28 * 5]  # 5 positions after three stride-2 convs
    with torch.no_grad():
        assert np.array_equal(out, integer(x).numpy())


def test_int8_weights_without_opset_21(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(60, 40)
    _, integer = _pipeline(MNIST1DMLP(hidden=16), 4, x)
    path = tmp_path / "m.onnx"
    out = _onnx_run(integer, x[:8], x, path, opset=17)
    graph = onnx.load(str(path)).graph
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in graph.initializer)
    with torch.no_grad():
        assert np.array_equal(out, integer(x).numpy())


def test_export_warns_when_onnxruntime_computes_otherwise(tmp_path, monkeypatch):
    """export_onnx runs the written model in onnxruntime: logits that differ from the IntegerModel's (here
    a torch requantization made to round differently) are reported, not written silently."""
    import lightning_hessian.quant.integer as integer_module

    torch.manual_seed(0)
    x = torch.randn(40, 40)
    _, integer = _pipeline(MNIST1DMLP(hidden=16), 8, x)
    export_onnx(integer, x, tmp_path / "same.onnx")  # agrees: no warning (an error under pytestmark)
    off_by_one = integer_module.requantize
    monkeypatch.setattr(integer_module, "requantize", lambda *args: off_by_one(*args).add_(1).clamp_(max=args[-1]))
    with pytest.warns(UserWarning, match=r"export_onnx: onnxruntime .* computes \d+ of 400 logits"):
        export_onnx(integer, x, tmp_path / "other.onnx")


def test_torch_export_program_agrees(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(40, 40)
    _, integer = _pipeline(MNIST1DCNN(), 8, x)
    program = torch.export.load(export_program(integer, x[:8], tmp_path / "cnn.pt2")).module()
    with torch.no_grad():
        assert torch.equal(program(x), integer(x))  # a different batch size than exported


def test_accumulator_overflow_names_the_layer():
    """A bias far above its weights' scale saturates its int32 code; the accumulator bound then passes 2^31 - 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
        model[2].bias.fill_(10.0)
    x = torch.randn(64, 4)
    with pytest.warns(UserWarning, match="bias codes exceed int32"), \
            pytest.raises(ValueError, match=r"layer '2': its int32 accumulator may overflow"):
        to_integer_model(_calibrated(model, x).eval(), x)


def _calibrated(model, x, bits=8):
    qmodel, _ = quantize_model(model, bits)
    calibrate(qmodel, [x])
    return qmodel


def test_conversion_errors_name_the_problem():
    torch.manual_seed(0)
    x = torch.randn(16, 40)
    qmodel = _calibrated(MNIST1DCNN(batch_norm=True), x)
    with pytest.raises(ValueError, match=r"BatchNorm layers \['features.1'.*fold_batchnorm"):
        to_integer_model(qmodel, x)

    with pytest.warns(UserWarning):
        partial, _ = quantize_model(MNIST1DMLP(), {"net.0": 8, "net.2": 8})
    calibrate(partial, [x])
    with pytest.raises(ValueError, match=r"left in float.*net\.4"):
        to_integer_model(partial, x)

    class FunctionalAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 5)

        def forward(self, x):
            return self.b(self.a(x) + x)

    with pytest.warns(UserWarning, match="functional add"):
        qmodel, _ = quantize_model(FunctionalAdd(), 8)
    calibrate(qmodel, [x])
    with pytest.raises(ValueError, match=r"float tensors reach the quantized modules \['b.act'\]"):
        to_integer_model(qmodel, x)

    qmodel, _ = quantize_model(MNIST1DMLP(), 8)
    with pytest.raises(ValueError, match="no calibrated range"):
        to_integer_model(qmodel, x)

    class AddOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.add = nn.Linear(40, 40), ResidualAdd()

        def forward(self, x):
            return self.add(self.a(x), x)

    qmodel = _calibrated(AddOut(), x)
    with pytest.raises(ValueError, match=r"output comes from 'add'.*end the model with a conv or linear"):
        to_integer_model(qmodel.eval(), x)


def test_float_op_after_last_layer_is_rejected():
    x = torch.randn(16, 40)
    with pytest.warns(UserWarning, match="Softmax"):
        qmodel = _calibrated(nn.Sequential(nn.Linear(40, 5), nn.Softmax(dim=1)), x)
    with pytest.raises(ValueError, match="left in float"):
        to_integer_model(qmodel, x)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(40, 5)

        def forward(self, x):
            return self.fc(x) * 2.0

    with pytest.warns(UserWarning, match="functional mul"):
        qmodel = _calibrated(Scaled(), x)
    with pytest.raises(ValueError, match="output is not produced by a quantized module"):
        to_integer_model(qmodel, x)


def test_integer_model_size_accounting():
    torch.manual_seed(0)
    x = torch.randn(32, 40)
    _, integer = _pipeline(MNIST1DMLP(hidden=16), {"net.0": 4, "net.2": 8, "net.4": 2}, x)
    assert isinstance(integer, IntegerModel) and isinstance(integer.steps[0], QuantizeStep)
    weight_bits = 40 * 16 * 4 + 16 * 16 * 8 + 16 * 10 * 2
    bias_and_scale_bits = 32 * 2 * (16 + 16 + 10)  # an int32 bias and a float32 weight scale per channel
    activation_scales = 32 * 3  # the input of each layer
    assert integer.packed_size_bytes() == (weight_bits + bias_and_scale_bits + activation_scales + 7) // 8
    assert [type(s) for s in integer.steps] == [QuantizeStep, LinearStep, LinearStep, LinearStep]  # no-op flatten
