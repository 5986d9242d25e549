"""Group-wise weight quantizers: the degenerate groups bit for bit, scales and codes on a hand-built matrix, the
quantized Linear and Embedding in QAT and in the integer simulation."""

import pytest
import torch
from torch import nn

from lightning_hessian.quant import calibrate, quantize_model, to_integer_model
from lightning_hessian.quant.layers import QuantEmbedding, QuantLinear
from lightning_hessian.quant.quantizers import (
    WeightGroups,
    group_codes,
    quantize_weight,
    weight_codes,
)
from lightning_hessian.quant.swap import resolve_groups


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_degenerate_groups_equal_per_channel_and_per_tensor_bit_for_bit(bits):
    torch.manual_seed(bits)
    w = torch.randn(12, 16) * torch.logspace(-2, 1, 12).view(-1, 1)
    qmax = 2 ** (bits - 1) - 1
    codes, scale = weight_codes(w, bits)
    row_groups = WeightGroups(rows=1, columns=16)  # one group per row, through the group-wise code path
    assert not row_groups.per_channel
    group_c, group_s = group_codes(w, bits, row_groups)
    assert torch.equal(group_s[:, 0], scale) and torch.equal(group_c, codes)
    assert torch.equal(quantize_weight(w, bits, groups=row_groups), quantize_weight(w, bits))
    tensor_c, tensor_s = group_codes(w, bits, WeightGroups.parse("tensor"))
    assert tensor_s.shape == (1, 1) and tensor_s.item() == (w.abs().max() / qmax).item()
    assert torch.equal(tensor_c, torch.clamp(torch.round(w / tensor_s), -qmax, qmax))
    assert torch.equal(quantize_weight(w, bits, groups=WeightGroups(12, 16)),
                       quantize_weight(w, bits, groups=WeightGroups(None, None)))


def test_group_scales_and_codes_on_a_hand_built_matrix():
    w = torch.tensor([[0.7, -0.1, 0.0, 0.0],
                      [0.35, 0.2, 1.4, -0.3],
                      [0.0, 0.0, 0.0, 0.0],
                      [-0.07, 0.05, 0.0, 2.1]])
    codes, scales = group_codes(w, 4, WeightGroups(rows=1, columns=2))  # qmax 7
    # row 0's right block and row 2 are zero: the row's largest scale, else the tensor's largest
    expected = torch.tensor([[0.1, 0.1], [0.05, 0.2], [0.3, 0.3], [0.01, 0.3]])
    torch.testing.assert_close(scales, expected, rtol=1e-6, atol=0)
    assert torch.equal(codes, torch.tensor([[7., -1, 0, 0], [7, 4, 7, -2], [0, 0, 0, 0], [-7, 5, 0, 7]]))
    codes, scales = group_codes(w, 4, WeightGroups(rows=2))  # Q-BERT: groups of output rows
    torch.testing.assert_close(scales, torch.tensor([[0.2], [0.3]]), rtol=1e-6, atol=0)
    assert torch.equal(codes[1], torch.tensor([2., 1, 7, -2])) and torch.equal(codes[3], torch.tensor([0., 0, 0, 7]))


def test_groups_that_do_not_tile_are_refused_or_left_per_channel():
    with pytest.raises(ValueError, match=r"lin: groups of 1 rows x 3 columns do not tile its 4 x 8 weight"):
        WeightGroups(columns=3).blocks((4, 8), "lin")
    with pytest.raises(ValueError, match="groups of input columns need a 2-D weight"):
        WeightGroups(columns=2).blocks((4, 2, 3), "conv")
    with pytest.raises(ValueError, match="must be a positive int or None"):
        WeightGroups(columns=0)
    groups, left = resolve_groups({"columns": 4}, {"a": torch.zeros(3, 8), "b": torch.zeros(3, 6)})
    assert groups == {"a": WeightGroups(columns=4)} and list(left) == ["b"]
    with pytest.raises(ValueError, match=r"groups names unknown layers \['c'\]"):
        resolve_groups({"c": "tensor"}, {"a": torch.zeros(3, 8)})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_quantized_linear_with_groups_trains_and_its_integer_model_matches():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(64, 16)
    qmodel, report = quantize_model(net, 4, groups={"a": {"columns": 4}, "b": {"rows": 2}})
    assert report.groups == {"a": WeightGroups(columns=4), "b": WeightGroups(rows=2)} and not report.embeddings
    assert isinstance(qmodel.a, QuantLinear) and "groups of 4 columns" in repr(qmodel.a)
    calibrate(qmodel, [x])
    qmodel.eval()
    loss = qmodel(x).square().mean()
    loss.backward()  # straight-through: the float weights get gradients
    assert qmodel.a.weight.grad.abs().sum() > 0
    integer = to_integer_model(qmodel, x)
    with torch.no_grad():
        deployed, fake = integer(x), qmodel(x)
    torch.testing.assert_close(deployed, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
    assert type(integer.steps[1]).__name__ == "GroupLinearStep"
    # one group per row is per-channel, bit for bit, through QAT and the integer model
    per_channel, _ = quantize_model(net, 4)
    per_row, _ = quantize_model(net, 4, groups={"a": {"rows": 1, "columns": 16}, "b": {"rows": 1, "columns": 8}})
    for q in (per_channel, per_row):
        calibrate(q, [x])
        q.eval()
    with torch.no_grad():
        assert torch.equal(per_channel(x), per_row(x))
        assert torch.equal(to_integer_model(per_channel, x)(x), to_integer_model(per_row, x)(x))


def test_quantized_embedding_gathers_quantized_rows_with_a_straight_through_gradient():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8)
    q = QuantEmbedding.from_float(emb, 4, groups=WeightGroups(columns=4))
    idx = torch.tensor([[1, 3, 3], [9, 0, 2]])
    expected = quantize_weight(emb.weight, 4, groups=WeightGroups(columns=4))[idx]
    out = q(idx)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert emb.weight.grad[3].eq(2).all() and emb.weight.grad[4].eq(0).all()
