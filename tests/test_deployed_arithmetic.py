"""The arithmetic of ``quantizers`` against onnxruntime's own kernels, exhaustively or on wide random draws.

Each test builds one small ONNX graph of many nodes (one per random scale set) and compares every output
with ``quantize_input`` / ``requantize`` / ``requantize_sum`` / ``dequantize``: these functions are what
``IntegerModel`` computes, so these tests are what makes it the deployed model.
"""

import numpy as np
import pytest
import torch

from lightning_hessian.quant.quantizers import dequantize, quantize_input, requantize, requantize_sum

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


def _run(nodes: list, initializers: dict, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
    """Run a graph of ``nodes`` on the numpy ``inputs`` (opset 21 and com.microsoft) in onnxruntime."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info(k) for k in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, inputs)


def _scales(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    return np.exp2(rng.uniform(low, high, n)).astype(np.float32)


@pytest.mark.parametrize("in_channels", [4, 3])  # 4: onnxruntime's symmetric conv kernel; 3: its GEMM path
def test_requantize_is_qlinearconv(in_channels):
    """int32 accumulators up to 2^31 (past float32's 2^24 integers), per-channel scales, signed and unsigned
    codes in and out: ``requantize`` equals ``QLinearConv`` on every output."""
    rng = np.random.default_rng(in_channels)
    out_channels, trials = 16, 12
    x = rng.integers(0, 256, size=(2, in_channels, 6, 6)).astype(np.uint8)
    nodes, inits, outs, expected = [], {}, [], []
    for t in range(trials):
        zp_in, zp_out = 128 * (t % 2), 128 * (t // 2 % 2)
        w = rng.integers(-127, 128, size=(out_channels, in_channels, 1, 1)).astype(np.int8)
        bias = (rng.integers(-(2**30), 2**30, size=out_channels) >> rng.integers(0, 24, out_channels)).astype(np.int32)
        sx, sy, sw = _scales(rng, 1, -8, 0)[0], _scales(rng, 1, -4, 8)[0], _scales(rng, out_channels, -16, -4)
        names = [f"{k}{t}" for k in ("sx", "zx", "w", "sw", "zw", "sy", "zy", "b")]
        values = [np.array(sx), np.array(zp_in, np.uint8), w, sw, np.zeros(out_channels, np.int8), np.array(sy),
                  np.array(zp_out, np.uint8), bias]
        inits.update(zip(names, values))
        nodes.append(helper.make_node("QLinearConv", ["x", *names], [f"y{t}"]))
        outs.append(f"y{t}")
        codes = torch.from_numpy(x.astype(np.int64)) - zp_in
        acc = torch.nn.functional.conv2d(codes.double(), torch.from_numpy(w).double()).long()
        acc += torch.from_numpy(bias.astype(np.int64)).view(1, -1, 1, 1)
        acc_scale = (torch.tensor(sx) * torch.from_numpy(sw)).view(1, -1, 1, 1)  # float32, as onnxruntime forms it
        lo, hi = (-128, 127) if zp_out else (0, 255)
        expected.append(requantize(acc, acc_scale, torch.tensor(sy), lo, hi) + zp_out)
    for got, want in zip(_run(nodes, inits, {"x": x}, outs), expected):
        assert np.array_equal(got, want.numpy().astype(np.uint8))


def test_requantize_rounds_like_qlinearconv_at_the_edges():
    """Accumulators that float32 cannot hold (2^25 + 2^19 + 1 becomes 2^25 + 2^19, a tie at multiplier 2^-20)
    and exact ties: the conversion to float32 and round-half-to-even both show in the result."""
    k = np.arange(-40, 40, dtype=np.int64)
    acc = np.concatenate([k * 2**21 + 2**19 + 1, (2 * k + 1) * 2**19, k * 2**21 + 2**20 - 1]).astype(np.int32)
    channels = acc.size  # a zero input and zero weights: each channel's accumulator is its bias
    inits = {"sx": np.array(1.0, np.float32), "zx": np.array(0, np.uint8), "w": np.zeros((channels, 1, 1, 1), np.int8),
             "sw": np.full(channels, 2.0**-10, np.float32), "zw": np.zeros(channels, np.int8),
             "sy": np.array(2.0**10, np.float32), "zy": np.array(128, np.uint8), "b": acc}
    node = helper.make_node("QLinearConv", ["x", *inits], ["y"])
    (y,) = _run([node], inits, {"x": np.zeros((1, 1, 1, 1), np.uint8)}, ["y"])
    got = y.reshape(-1).astype(np.int64) - 128
    want = requantize(torch.from_numpy(acc), torch.tensor(2.0**-10), torch.tensor(2.0**10), -128, 127)
    assert np.array_equal(got, want.numpy())
    exact_half_up = np.clip(np.floor(acc / 2**20 + 0.5), -128, 127)
    assert (got != exact_half_up).sum() > 40


def test_requantize_and_dequantize_are_qgemm():
    """``QGemm`` with a uint8 output is ``requantize``; without an output scale, ``dequantize`` of the
    accumulator at ``s_a * s_b``."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(64, 40)).astype(np.uint8)
    nodes, inits, outs, expected = [], {}, [], []
    for t in range(8):
        zp = 128 * (t % 2)
        w = rng.integers(-127, 128, size=(10, 40)).astype(np.int8)
        bias = rng.integers(-(2**26), 2**26, size=10).astype(np.int32)
        sa, sy, sw = _scales(rng, 1, -8, 0)[0], _scales(rng, 1, -4, 8)[0], _scales(rng, 10, -16, -4)
        names = [f"{k}{t}" for k in ("sa", "za", "w", "sw", "zw", "b", "sy", "zy")]
        inits.update(zip(names, [np.array(sa), np.array(zp, np.uint8), w, sw, np.zeros(10, np.int8), bias,
                                 np.array(sy), np.array(0, np.uint8)]))
        nodes += [helper.make_node("QGemm", ["a", *names], [f"q{t}"], domain="com.microsoft", transB=1),
                  helper.make_node("QGemm", ["a", *names[:6]], [f"f{t}"], domain="com.microsoft", transB=1)]
        outs += [f"q{t}", f"f{t}"]
        acc = (torch.from_numpy(a.astype(np.int64)) - zp) @ torch.from_numpy(w.astype(np.int64)).t()
        acc += torch.from_numpy(bias.astype(np.int64))
        acc_scale = torch.tensor(sa) * torch.from_numpy(sw)
        expected += [requantize(acc, acc_scale, torch.tensor(sy), 0, 255), dequantize(acc, acc_scale)]
    for got, want in zip(_run(nodes, inits, {"a": a}, outs), expected):
        assert np.array_equal(got, want.numpy().astype(got.dtype))


def test_requantize_sum_is_qlinearadd_on_every_pair_of_codes():
    """All 65,536 pairs of uint8 containers, for 32 random scale triples spanning 2^-12..2^12 of each other
    and every combination of signed (zero point 128) and unsigned codes; the last 8 put one input's scale
    2^-30 below the other's, where float64 sums round too (the exactly rounded ``fma32`` path)."""
    rng = np.random.default_rng(2)
    a, b = (g.reshape(1, -1) for g in np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)))
    nodes, inits, outs, expected = [], {}, [], []
    for t in range(32):
        za, zb, zc = (128 * bit for bit in ((t >> 0) & 1, (t >> 1) & 1, (t >> 2) & 1))
        sa, sb, sc = _scales(rng, 3, -6, 6)
        if t >= 24:
            sa, sb = (sa, sb * np.float32(2.0**-30)) if t % 2 else (sa * np.float32(2.0**-30), sb)
        names = [f"{k}{t}" for k in ("sa", "za", "sb", "zb", "sc", "zc")]
        inits.update(zip(names, [np.array(sa), np.array(za, np.uint8), np.array(sb), np.array(zb, np.uint8),
                                 np.array(sc), np.array(zc, np.uint8)]))
        nodes.append(helper.make_node("QLinearAdd", ["a", names[0], names[1], "b", *names[2:]], [f"c{t}"],
                                      domain="com.microsoft"))
        outs.append(f"c{t}")
        qmin, qmax = (-128, 127) if zc else (0, 255)
        codes_a, codes_b = torch.from_numpy(a.astype(np.int64)) - za, torch.from_numpy(b.astype(np.int64)) - zb
        expected.append(requantize_sum(codes_a, codes_b, torch.tensor(sa), torch.tensor(sb), za, zb,
                                       torch.tensor(sc), qmin, qmax) + zc)
    for got, want in zip(_run(nodes, inits, {"a": a, "b": b}, outs), expected):
        assert np.array_equal(got, want.numpy().astype(np.uint8))


def test_quantize_input_and_dequantize_are_quantizelinear_and_dequantizelinear():
    """Float inputs with exact ties (k + 1/2 times the scale) and values past the range, 12 scales."""
    rng = np.random.default_rng(3)
    nodes, inits, outs, expected = [], {}, [], []
    ties = np.arange(-100, 100) + 0.5
    x = np.concatenate([rng.standard_normal(5000) * 4, ties, ties * 3, ties * 0.3]).astype(np.float32)
    codes = rng.integers(0, 256, size=5000).astype(np.uint8)
    for t in range(12):
        zp = 128 * (t % 2)
        s = np.float32([1.0, 3.0, 0.3][t % 3]) if t < 6 else _scales(rng, 1, -8, 2)[0]
        inits.update({f"s{t}": np.array(s), f"z{t}": np.array(zp, np.uint8)})
        nodes += [helper.make_node("QuantizeLinear", ["x", f"s{t}", f"z{t}"], [f"q{t}"]),
                  helper.make_node("DequantizeLinear", ["codes", f"s{t}", f"z{t}"], [f"d{t}"])]
        outs += [f"q{t}", f"d{t}"]
        lo, hi = (-128, 127) if zp else (0, 255)
        expected += [quantize_input(torch.from_numpy(x), torch.tensor(s), lo, hi) + zp,
                     dequantize(torch.from_numpy(codes.astype(np.int64)) - zp, torch.tensor(s))]
    for got, want in zip(_run(nodes, inits, {"x": x, "codes": codes}, outs), expected):
        assert np.array_equal(got, want.numpy().astype(got.dtype))


def test_pool_requantization_is_qlinearglobalaveragepool():
    """The window sum requantized by ``s_in / (s_out * window)`` (float32) equals ``QLinearGlobalAveragePool``,
    windows of 1 to 256 values, signed and unsigned codes."""
    rng = np.random.default_rng(4)
    nodes, inits, feeds, outs, expected = [], {}, {}, [], []
    for t in range(20):
        zp_in, zp_out, side = 128 * (t % 2), 128 * (t // 2 % 2), [1, 4, 7, 8, 16][t % 5]
        x = rng.integers(0, 256, size=(4, 16, side, side)).astype(np.uint8)
        s_in, s_out = _scales(rng, 2, -6, 2)
        names = [f"{k}{t}" for k in ("si", "zi", "so", "zo")]
        inits.update(zip(names, [np.array(s_in), np.array(zp_in, np.uint8), np.array(s_out),
                                 np.array(zp_out, np.uint8)]))
        feeds[f"x{t}"] = x
        nodes.append(helper.make_node("QLinearGlobalAveragePool", [f"x{t}", *names], [f"y{t}"], domain="com.microsoft"))
        outs.append(f"y{t}")
        sums = torch.from_numpy(x.astype(np.int64) - zp_in).sum((2, 3), keepdim=True)
        lo, hi = (-128, 127) if zp_out else (0, 255)
        expected.append(requantize(sums, torch.tensor(s_in), torch.tensor(s_out) * side**2, lo, hi) + zp_out)
    for got, want in zip(_run(nodes, inits, feeds, outs), expected):
        assert np.array_equal(got, want.numpy().astype(np.uint8))
