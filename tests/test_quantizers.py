"""Quantizer math: round-trip bounds, per-channel scales, STE gradients, ranges, bias, the float32 arithmetic."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_hessian.quant.quantizers import (
    INT32_MAX,
    ActivationQuantizer,
    bias_codes,
    fake_quantize,
    fma32,
    qrange,
    quantize_bias,
    quantize_weight,
    validate_bit_choices,
    validate_bits,
    weight_codes,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_roundtrip_per_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 4, 3) * torch.logspace(-3, 1, 6).view(-1, 1, 1)
    codes, scale = weight_codes(w, bits)
    qmax = 2 ** (bits - 1) - 1
    expected = torch.stack([w[c].abs().max() / qmax for c in range(6)])
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= qmax
    wq = quantize_weight(w, bits)
    half = (scale / 2).view(-1, 1, 1)
    assert bool(((wq - w).abs() <= half * (1 + 1e-5)).all())
    # the largest weight of each channel is reproduced by the code +-qmax
    flat = codes.flatten(1)
    assert torch.equal(flat.abs().amax(1), torch.full((6,), float(qmax)))


@pytest.mark.parametrize("signed", [True, False])
def test_activation_roundtrip_and_clamp(signed):
    bits, scale = 4, torch.tensor(0.1)
    qmin, qmax = qrange(bits, signed)
    assert (qmin, qmax) == ((-7, 7) if signed else (0, 15))
    x = torch.linspace(qmin * 0.1 - 1, qmax * 0.1 + 1, 1001)
    y = fake_quantize(x, scale, qmin, qmax)
    inside = (x >= qmin * 0.1) & (x <= qmax * 0.1)
    assert bool(((y - x)[inside].abs() <= 0.05 + 1e-6).all())
    torch.testing.assert_close(y[x < qmin * 0.1], torch.full_like(y[x < qmin * 0.1], qmin * 0.1))
    torch.testing.assert_close(y[x > qmax * 0.1], torch.full_like(y[x > qmax * 0.1], qmax * 0.1))


def test_ste_gradients():
    scale = torch.tensor(0.25)
    x = torch.tensor([-5.0, -1.6, -0.3, 0.0, 0.6, 1.7, 4.0], requires_grad=True)
    upstream = torch.arange(1.0, 8.0)
    fake_quantize(x, scale, -7, 7).backward(upstream)
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 0], dtype=torch.float32)
    assert torch.equal(x.grad, upstream * inside)  # identity inside [-1.75, 1.75], zero outside

    w = torch.randn(4, 3, requires_grad=True)
    quantize_weight(w, 3).sum().backward()
    assert torch.equal(w.grad, torch.ones(4, 3))

    b = torch.randn(4, requires_grad=True)
    quantize_bias(b, torch.full((4,), 1e-3)).sum().backward()
    assert torch.equal(b.grad, torch.ones(4))


@pytest.mark.parametrize("bad", [1, 9, 0, 16])
def test_bit_width_validation_names_argument(bad):
    with pytest.raises(ValueError, match="act_bits"):
        ActivationQuantizer(bits=bad)
    with pytest.raises(ValueError, match="weight_bits"):
        validate_bits(bad, "weight_bits")
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(2, 2), bad)


@pytest.mark.parametrize("bad", [2.5, True, "8", None])
def test_bit_width_type_validation(bad):
    with pytest.raises(TypeError, match="act_bits"):
        ActivationQuantizer(bits=bad)
    with pytest.raises(TypeError, match=r"bit_choices must be an int in 2\.\.8"):
        validate_bit_choices((4, bad))


def test_bit_widths_accept_any_integer_and_choices_are_sorted_distinct():
    assert type(validate_bits(np.int64(4))) is int
    assert validate_bit_choices([8, np.int32(4), 8]) == [4, 8]
    with pytest.raises(ValueError, match="at least one bit width"):
        validate_bit_choices([])


def test_other_argument_validation():
    with pytest.raises(ValueError, match="momentum"):
        ActivationQuantizer(momentum=1.5)
    with pytest.raises(TypeError, match="signed"):
        ActivationQuantizer(signed="yes")


def test_running_minmax_and_freeze():
    q = ActivationQuantizer(bits=8, signed=True)
    x = torch.randn(3, 50)
    assert torch.equal(q.eval()(x), x)  # uncalibrated: pass-through
    q.train()
    for row in x:
        q(row)
    assert q.running_min == x.min() and q.running_max == x.max()
    torch.testing.assert_close(q.scale(), x.abs().max() / 127, rtol=0, atol=0)
    assert q.qrange() == (-128, 127)  # the whole int8 container: the bound maps to 127, -128 is beyond it
    q.eval()
    q(10 * torch.randn(100))
    assert q.running_min == x.min() and q.running_max == x.max()  # frozen in eval


def test_ema_range():
    q = ActivationQuantizer(bits=8, momentum=0.1).train()
    batches = [torch.randn(20) * (i + 1) for i in range(4)]
    lo, hi = batches[0].min(), batches[0].max()
    for i, b in enumerate(batches):
        q(b)
        if i:
            lo, hi = 0.9 * lo + 0.1 * b.min(), 0.9 * hi + 0.1 * b.max()
    torch.testing.assert_close(q.running_min, lo)
    torch.testing.assert_close(q.running_max, hi)


def test_unsigned_after_relu_auto():
    q = ActivationQuantizer(bits=8).train()
    x = torch.relu(torch.randn(100))
    y = q(x)
    assert not q.is_signed and q.qrange() == (0, 255)
    torch.testing.assert_close(q.scale(), x.max() / 255, rtol=0, atol=0)
    assert bool(((y - x).abs() <= q.scale() / 2 + 1e-7).all())
    q.train()(torch.tensor([-1.0]))
    assert q.is_signed  # a negative value flips the auto code to signed


def test_bias_codes_int32():
    scale = torch.tensor([1e-3, 2e-4, 5e-2], dtype=torch.float64)
    b = torch.tensor([0.1234, -0.05, 3.0])
    codes = bias_codes(b, scale)
    assert codes.dtype == torch.int64
    assert torch.equal(codes, torch.round(b.double() / scale).long())
    assert bool(((codes * scale - b.double()).abs() <= scale / 2).all())
    with pytest.warns(UserWarning, match="bias codes exceed int32"):
        assert bias_codes(torch.tensor([1e6]), torch.tensor([1e-6])).item() == INT32_MAX  # clamped to int32


def test_all_zero_channel_and_range_keep_a_usable_scale():
    # a pruned channel codes to zeros at any scale: it takes the largest channel's, so its bias stays exact
    w = torch.tensor([[0.0, 0.0], [0.5, -1.27]])
    torch.testing.assert_close(weight_codes(w, 8)[1], torch.tensor([0.01, 0.01]))
    assert torch.equal(weight_codes(torch.zeros(2, 3), 8)[1], torch.ones(2))
    codes = bias_codes(torch.tensor([2.0, 2.0]), weight_codes(w, 8)[1].double() * 0.05)
    assert torch.equal(codes, torch.tensor([4000, 4000]))  # was clamped at int32 with a 1e-8 scale
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # 1e-8 underflows to 0 in half precision
        q = ActivationQuantizer(8).train()
        out = q(torch.zeros(3, dtype=dtype))
        assert torch.equal(out, torch.zeros(3, dtype=dtype)) and q.scale().item() == 1.0
        assert torch.equal(quantize_weight(torch.zeros(2, 3, dtype=dtype), 4), torch.zeros(2, 3, dtype=dtype))


def test_weight_ste_passes_the_channel_maximum():
    # qmax * (max|w| / qmax) can round below max|w|: a value-domain clamp there would zero its gradient
    torch.manual_seed(0)
    w = torch.randn(1000, 64, requires_grad=True)
    for bits in (2, 4, 8):
        w.grad = None
        quantize_weight(w, bits).sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))


def test_fma32_rounds_once():
    """``fma32`` equals the exactly rounded ``x * y + z`` (exact rationals), also where the float64 sum is
    inexact (``z`` far from ``x * y``) and where rounding ``x * y`` first would differ."""
    rng = np.random.default_rng(0)
    x, y = (torch.from_numpy(rng.standard_normal(4000).astype(np.float32)) for _ in range(2))
    z = torch.from_numpy((rng.standard_normal(4000) * np.exp2(rng.uniform(-80, 80, 4000))).astype(np.float32))
    # near-cancellations: z = -round32(x * y) leaves only the rounding error of the product
    z[:1000] = -(x[:1000] * y[:1000])
    exact = [Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)) for a, b, c in
             zip(x.tolist(), y.tolist(), z.tolist())]
    expected = torch.tensor([float(np.float32(_round_to_float32(e))) for e in exact])
    out = fma32(x, y, z)
    assert torch.equal(out, expected)
    assert not torch.equal(out, x * y + z)  # two roundings differ somewhere


def _round_to_float32(v: Fraction) -> float:
    """``v`` rounded half to even to float32, exactly (no intermediate float64 rounding)."""
    if v == 0:
        return 0.0
    lo = np.float32(float(v))  # within an ulp; step to the float32 neighbours and pick the nearest
    candidates = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - v), int(np.float32(c).view(np.int32)) & 1))
    return float(best)
