"""unpack_attention: the same function as torch's attention, with the projections as layers that quantize."""

import pytest
import torch
from torch import nn

from lightning_hessian.models.transformer import MNIST1DTransformer
from lightning_hessian.quant import calibrate, quantizable_layers, quantize_model, to_integer_model
from lightning_hessian.quant.attention import MultiheadAttention, unpack_attention
from lightning_hessian.quant.layers import QuantLinear


@pytest.mark.parametrize("batch_first", [False, True])
def test_unpacked_attention_equals_torch_with_masks_and_weights(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    unpacked = unpack_attention(mha)
    assert isinstance(unpacked, MultiheadAttention)
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)  # 3 sequences of 5 tokens
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    for kwargs in ({}, {"attn_mask": causal}, {"key_padding_mask": padding}, {"need_weights": False},
                   {"average_attn_weights": False}):
        expected, got = mha(x, x, x, **kwargs), unpacked(x, x, x, **kwargs)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        assert (got[1] is None) == (expected[1] is None)
        if got[1] is not None:
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_transformer_layers_are_all_quantized_and_convert_with_float_islands():
    torch.manual_seed(0)
    model = MNIST1DTransformer(dim=8, heads=2, layers=1, mlp=16).eval()
    x = torch.randn(16, 40)
    names = quantizable_layers(model)
    assert names == ["embed", "position", "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
                     "encoder.layers.0.self_attn.v_proj", "encoder.layers.0.self_attn.out_proj",
                     "encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"]
    with torch.no_grad():  # eval mode without gradients: torch's fused encoder path, which unpacking switches off
        torch.testing.assert_close(unpack_attention(model)(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="left in float") as caught:
        qmodel, report = quantize_model(model, 8)
    assert not report.float_layers and "encoder.layers.0.norm1" in report.float_ops
    assert "embed" not in str(caught[0].message)
    assert isinstance(qmodel.encoder.layers[0].self_attn.q_proj, QuantLinear)
    calibrate(qmodel, [x])
    qmodel.eval()
    with pytest.raises(ValueError, match="float_ops=True"):
        to_integer_model(qmodel, x)
    integer = to_integer_model(qmodel, x, float_ops=True)
    assert sorted(set(integer.float_islands)) == ["AttentionStep", "FloatAddStep", "GeluStep", "LayerNormStep"]
    with torch.no_grad():
        deployed, fake = integer(x), qmodel(x)
    torch.testing.assert_close(deployed, fake, rtol=0, atol=1e-4 * float(fake.abs().max()))
