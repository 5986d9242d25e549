import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_hessian.callbacks.no_trace import leave_no_trace
from lightning_hessian.callbacks.probe import cross_entropy_loss, draw_probe_indices, probe_batches
from lightning_hessian.modes import training_mode


def make_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_leave_no_trace_restores_everything():
    model = make_bn_model()
    model.train()
    model[4].eval()  # mixed modes must come back per module
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    model[4].bias.requires_grad_(False)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    with torch.inference_mode():
        with leave_no_trace(model, mode="train"):
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert model[3].training and model[4].training
            loss = cross_entropy_loss(model, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
            loss.backward()  # moves BN stats, writes grads, consumes RNG
            np.random.rand(), random.random()
    assert model.training and model[1].training and not model[4].training
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[0].bias.grad is None and not model[4].bias.requires_grad
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == (expected[0].tolist(), *expected[1:])


def test_leave_no_trace_eval_mode_and_restores_after_error():
    model = make_bn_model().train()
    with pytest.raises(RuntimeError, match="boom"):
        with leave_no_trace(model, mode="eval"):
            assert not model.training and not model[1].training
            raise RuntimeError("boom")
    assert model.training
    with pytest.raises(ValueError, match="mode"):
        with leave_no_trace(model, mode="test"):
            pass


@pytest.mark.parametrize("train", [True, False])
def test_training_mode_restores_each_flag_after_error(train):
    model = make_bn_model().train()
    model[1].eval()  # mixed modes come back per module
    with pytest.raises(RuntimeError, match="boom"):
        with training_mode(model, train):
            assert all(m.training == train for m in model.modules())
            model[3].train(not train)  # whatever the block does is undone too
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


def test_probe_indices_fixed_and_sharded_union():
    a = draw_probe_indices(1000, 64, seed=3)
    assert a == draw_probe_indices(1000, 64, seed=3) and a != draw_probe_indices(1000, 64, seed=4)
    assert len(set(a)) == 64 and max(a) < 1000
    with pytest.raises(ValueError, match="probe_size=2000 exceeds the 1000"):
        draw_probe_indices(1000, 2000, seed=0)
    data = torch.utils.data.TensorDataset(torch.arange(1000.0), torch.arange(1000))
    shards = [probe_batches(data, a, batch_size=10, rank=r, world_size=2) for r in range(2)]
    seen = sorted(int(v) for shard in shards for x, _ in shard for v in x)
    assert seen == a
    assert sum(len(y) for _, y in shards[0]) == sum(len(y) for _, y in shards[1]) == 32


def test_default_loss_needs_pairs():
    with pytest.raises(TypeError, match="hessian_loss"):
        cross_entropy_loss(nn.Linear(2, 2), {"x": torch.zeros(1, 2)})
