"""Integer-only models: bit-exact with the simulation, integer ops only, clear errors, exports that agree."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP, resnet20
from lightning_hessian.quant.export import export_onnx, export_program
from lightning_hessian.quant.integer import IntegerConv, IntegerLinear, IntegerModel, Requantizer, to_integer_model
from lightning_hessian.quant.modules import (
    QuantAct,
    calibrate,
    fold_batchnorm,
    quantizable_layers,
    quantize_model,
    set_integer_simulation,
)


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
    """quantize -> calibrate (a few training-mode batches) -> fold BN -> simulation and integer model."""
    qmodel, _ = quantize_model(model, bits, act_bits)
    qmodel.train()
    with torch.no_grad():
        for chunk in x.split(len(x) // 3):
            qmodel(chunk)
    fold_batchnorm(qmodel, x[:4])
    integer = to_integer_model(qmodel, x[:8])
    return set_integer_simulation(qmodel.eval()), integer


CASES = {  # make, input shape, weight bits, activation bits
    "cnn_bn": (lambda: _train_bn(MNIST1DCNN(batch_norm=True), (64, 40)), (300, 40),
               {"features.0": 8, "features.3": 4, "features.6": 6, "classifier": 8}, 8),
    "cnn_bn_follow": (lambda: _train_bn(MNIST1DCNN(batch_norm=True), (64, 40)), (300, 40),
                      {"features.0": 4, "features.3": 8, "features.6": 6, "classifier": 5}, "follow"),
    "mlp": (lambda: MNIST1DMLP(), (300, 40), {"net.0": 8, "net.2": 4, "net.4": 8}, 8),
    "resnet20": (lambda: _spread_logits(_train_bn(resnet20(width=16), (16, 3, 32, 32))), (64, 3, 32, 32), 8, 8),
    "resnet20_follow": (lambda: _train_bn(resnet20(width=4), (16, 3, 32, 32)), (64, 3, 32, 32),
                        {"conv1": 8, "layers.1.conv1": 4, "layers.3.conv2": 4, "layers.3.shortcut.0": 6, "fc": 6},
                        "follow"),
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
    sim, integer = _pipeline(model, bits, x, act_bits)
    with torch.no_grad():
        return request.param, x, sim(x), integer


def test_integer_logits_bit_identical_to_simulation(case):
    name, x, sim_out, integer = case
    with torch.no_grad():
        out = integer(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, sim_out.float())
    assert torch.equal(integer(x[:1]), sim_out[:1].float())  # one sample (an overlapping im2col view)
    assert torch.equal(out.argmax(1), sim_out.argmax(1))  # top-1 agreement 100%
    assert len(torch.unique(out.argmax(1))) > 1  # not a degenerate constant model


def test_integer_parameters_are_integer_containers(case):
    name, _, _, integer = case
    layers = [m for m in integer.modules() if isinstance(m, (IntegerConv, IntegerLinear))]
    assert layers
    for m in layers:
        assert m.weight.dtype == torch.int8 and m.bias.dtype == torch.int32
        qmax = 2 ** (m.weight_bits - 1) - 1
        assert int(m.weight.abs().max()) == qmax  # per-channel scales: every channel's max hits qmax
        if name.endswith("follow") and m.requant is not None:  # b-bit weights read b-bit input codes
            assert m.requant.qmax + m.offset in (2**m.weight_bits - 1, 2 ** (m.weight_bits - 1) - 1)
    for m in integer.modules():
        if isinstance(m, Requantizer):
            assert m.mantissa.dtype == torch.int32 and bool((m.mantissa < 2**30).all())
            assert m.shift.dtype == torch.int8


class _DtypeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), t.dtype))
        return out


def test_no_float_op_inside_the_integer_graph(case):
    _, x, _, integer = case
    codes = integer.quantize_input(x[:16])
    assert codes.dtype == torch.int32
    with torch.no_grad(), _DtypeRecorder() as rec:
        out = integer.body(codes)
    floats = sorted({op for op, dtype in rec.ops if dtype.is_floating_point})
    assert floats == []
    assert any("_int_mm" in op for op, _ in rec.ops) and len(rec.ops) > 20
    assert torch.equal(integer.dequantize_output(out), integer(x[:16]))


def test_dtype_recorder_sees_float_ops():
    # the checker above is not vacuous: the simulation (float64 carriers) trips it
    torch.manual_seed(0)
    x = torch.randn(32, 40)
    sim, _ = _pipeline(MNIST1DMLP(), 8, x)
    with torch.no_grad(), _DtypeRecorder() as rec:
        sim(x)
    assert any(dtype == torch.float64 for _, dtype in rec.ops)


def test_onnx_export_bit_identical(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    name, x, _, integer = case
    path = export_onnx(integer, x[:8], tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]  # a different batch size than exported
    with torch.no_grad():
        assert np.array_equal(out, integer(x).numpy())
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ("ConvInteger" in ops or "MatMulInteger" in ops) and not {"Conv", "MatMul", "Gemm"} & set(ops)
    # float values only at the entry (Cast, Div, Round, Clip) and the exit (Cast, Mul, Cast, Identity)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.output)}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    float_nodes = [i for i, n in enumerate(graph.node) if types.get(n.output[0]) in float_types]
    assert float_nodes == [0, 1, 2, 3, len(ops) - 4, len(ops) - 3, len(ops) - 2, len(ops) - 1]


class _Tokens(nn.Module):
    """Linear over (N, L, F) tokens, then the axes swapped in one of the call forms torch accepts."""

    def __init__(self, swap):
        super().__init__()
        self.a, self.b, self.swap = nn.Linear(6, 4), nn.Linear(20, 3), swap

    def forward(self, x):
        return self.b(self.swap(self.a(x)).flatten(1))


@pytest.mark.parametrize("swap", [lambda h: h.transpose(1, 2), lambda h: h.transpose(dim0=1, dim1=2),
                                  lambda h: torch.transpose(h, dim1=2, dim0=1), lambda h: h.permute(dims=(0, 2, 1)),
                                  lambda h: torch.permute(h, (0, 2, 1))])
def test_onnx_export_reads_axes_given_by_keyword(swap, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(30, 5, 6)
    _, integer = _pipeline(_Tokens(swap), 8, x)
    session = ort.InferenceSession(str(export_onnx(integer, x[:8], tmp_path / "t.onnx")),
                                   providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.array_equal(session.run(None, {"input": x.numpy()})[0], integer(x).numpy())


def test_torch_export_program_agrees(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(40, 40)
    _, integer = _pipeline(MNIST1DCNN(), 8, x)
    program = torch.export.load(export_program(integer, x[:8], tmp_path / "cnn.pt2")).module()
    with torch.no_grad():
        assert torch.equal(program(x), integer(x))  # a different batch size than exported


def test_standalone_quantacts_convert():
    torch.manual_seed(2)
    model = nn.Sequential(QuantAct(8), nn.Linear(10, 16), nn.ReLU(), QuantAct(6, signed=False), nn.Linear(16, 3))
    x = torch.randn(100, 10)
    sim, integer = _pipeline(model, 5, x)
    with torch.no_grad():
        assert torch.equal(integer(x), sim(x).float())


class _ConvPool(nn.Module):
    """Conv accumulators (no requantization) straight into an average pool: the pool sums int32 accumulators."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(64, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2)
        with torch.no_grad():
            self.conv.weight.uniform_(0.0, 1.0)  # positive filters on positive inputs: accumulators near their bound

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize("size", [4, 24])
def test_average_pool_window_sum_fits_int32(size):
    """A window sum that may pass 2^31 - 1 is refused at conversion (it would wrap in int32); one that fits is exact."""
    torch.manual_seed(0)
    x = torch.rand(2, 64, size, size) * 0.2 + 0.8
    qmodel = _calibrated(_ConvPool(), x).eval()
    if size == 24:  # 576 accumulators of up to 64 * 9 * 127 * 255 each
        with pytest.raises(ValueError, match=r"'pool'.*576.*overflow int32.*QuantAct"):
            to_integer_model(qmodel, x)
        return
    integer = to_integer_model(qmodel, x)
    with torch.no_grad():
        assert torch.equal(integer(x), set_integer_simulation(qmodel)(x).float())


def test_accumulator_overflow_names_the_layer():
    """A bias far above its weights' scale saturates its int32 code; the accumulator bound then passes 2^31 - 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
        model[2].bias.fill_(10.0)
    x = torch.randn(64, 4)
    with pytest.raises(ValueError, match=r"layer '2': its int32 accumulator may overflow"):
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
    assert isinstance(integer, IntegerModel)
    weight_bits = 40 * 16 * 4 + 16 * 16 * 8 + 16 * 10 * 2
    bias_bits = 32 * (16 + 16 + 10)
    requant_bits = (32 + 8) * (16 + 16)  # per-channel int32 mantissa + int8 shift at net.2 and net.4 inputs
    scale_bits = 64 * (1 + 10)
    assert integer.packed_size_bytes() == (weight_bits + bias_bits + requant_bits + scale_bits + 7) // 8
