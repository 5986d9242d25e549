import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_hessian.modes import training_mode
from lightning_hessian.no_trace import leave_no_trace
from lightning_hessian.probe_set import cross_entropy_loss, draw_probe_indices, probe_batches


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


class _Augmenting(torch.utils.data.Dataset):
    """Sample ``i`` plus noise from all three global generators (like random crops and flips)."""

    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.full((2,), float(i)) + torch.rand(2) + np.random.rand() + random.random(), i


def test_probe_of_an_augmenting_dataset_is_fixed_and_leaves_the_rng_alone():
    indices = draw_probe_indices(100, 12, seed=5)
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    expected = (torch.rand(3).tolist(), np.random.rand(), random.random())
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    first = probe_batches(_Augmenting(), indices, batch_size=5, seed=5)
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == expected
    again = probe_batches(_Augmenting(), indices, batch_size=4, seed=5)  # other batches, the same samples
    torch.testing.assert_close(torch.cat([x for x, _ in again]), torch.cat([x for x, _ in first]), rtol=0, atol=0)
    shards = [probe_batches(_Augmenting(), indices, batch_size=5, rank=r, world_size=2, seed=5) for r in range(2)]
    by_index = {int(i): x for shard in shards for xs, ids in shard for x, i in zip(xs, ids)}
    for xs, ids in first:  # a sample is the same on whichever rank reads it
        for x, i in zip(xs, ids):
            assert torch.equal(by_index[int(i)], x)
    other = probe_batches(_Augmenting(), indices, batch_size=5, seed=6)
    assert not torch.equal(other[0][0], first[0][0])


def test_a_probe_set_saves_the_generators_once_not_per_sample(monkeypatch):
    """Saving and restoring every generator around each sample took ~2 ms a sample (0.13 s of the demo's 4-s fit
    for 64 samples; 2 s for 1,024)."""
    import lightning_hessian.probe_set as probe

    entered = []
    isolate = probe.isolate_rng
    monkeypatch.setattr(probe, "isolate_rng", lambda **kw: entered.append(1) or isolate(**kw))
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("torch.manual_seed seeds every device"))
    batches = probe_batches(_Augmenting(), list(range(12)), batch_size=5, seed=5)
    assert len(entered) == 1 and sum(len(ids) for _, ids in batches) == 12


@pytest.mark.parametrize("size", [0, -5, True, 2.0])
def test_probe_sizes_must_be_positive_integers(size):
    with pytest.raises(ValueError, match=f"probe_size must be a positive integer, got {size!r}"):
        draw_probe_indices(100, size, seed=0)
    with pytest.raises(ValueError, match=f"probe_batch_size must be a positive integer, got {size!r}"):
        probe_batches(_Augmenting(), [0, 1], batch_size=size)


def test_default_loss_needs_pairs():
    with pytest.raises(ValueError, match=r"needs \(x, y\) batches.*dicts with keys \['x'\].*loss_fn=.*hessian_loss"):
        cross_entropy_loss(nn.Linear(2, 2), {"x": torch.zeros(1, 2)})
