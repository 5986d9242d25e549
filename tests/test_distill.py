"""distill_data (ZeroQ): distilled inputs reproduce every BatchNorm layer's running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hessian.quant.distill import batchnorm_mismatch, distill_data

# the input distribution the BatchNorm statistics come from: per-channel means and standard deviations
CHANNEL_MEAN = torch.tensor([0.5, -1.0, 2.0])
CHANNEL_STD = torch.tensor([1.0, 0.5, 2.0])


def conv2d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5),
    )


def conv1d_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 6, 3, stride=2, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6, 4),
    )


def sample(n: int, shape: tuple[int, ...], seed: int, mean: torch.Tensor | None = None,
           std: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` inputs from the known distribution (independent pixels with the channel's mean and std)."""
    g = torch.Generator().manual_seed(seed)
    view = (1, 3) + (1,) * (len(shape) - 1)
    mean = CHANNEL_MEAN.view(view) if mean is None else mean
    std = CHANNEL_STD.view(view) if std is None else std
    return mean + std * torch.randn((n, *shape), generator=g)


def with_statistics(model: nn.Module, shape: tuple[int, ...], **distribution: torch.Tensor) -> nn.Module:
    """``model`` (eval mode) whose BatchNorm running statistics are the population averages over 4,096 inputs
    (of ``sample``, with ``distribution``'s mean and std if given)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in sample(4096, shape, seed=1, **distribution).split(256):
            model(batch)
    return model.eval()


CASES = [(conv2d_model, (3, 8, 8)), (conv1d_model, (3, 12))]


@pytest.mark.parametrize(("make", "shape"), CASES, ids=["conv2d+linear", "conv1d"])
def test_distilled_batch_matches_every_batchnorm_layer(make, shape):
    """Within ``tol=0.02`` running standard deviations at every layer; Gaussian noise is off by more than 10x
    as much, and a real batch of the same size (its sampling error) by more than twice."""
    model = with_statistics(make(), shape)
    distilled = distill_data(model, shape, 64, input_prior=None, tol=0.02, seed=0)
    assert distilled.shape == (64, *shape)
    ours = batchnorm_mismatch(model, distilled)
    noise = batchnorm_mismatch(model, torch.randn((64, *shape), generator=torch.Generator().manual_seed(5)))
    real = batchnorm_mismatch(model, sample(64, shape, seed=7))
    assert len(ours) == (3 if len(shape) == 3 else 2)
    for name in ours:
        assert ours[name] <= 0.02 + 1e-6, (name, ours[name])
        assert noise[name] > 10 * ours[name], (name, noise[name], ours[name])
    assert max(real.values()) > 2 * max(ours.values())


def test_mismatch_is_zero_for_the_statistics_themselves():
    """batchnorm_mismatch against a closed form: BatchNorm statistics set from the batch itself give 0; a batch
    shifted by one running standard deviation in every channel gives exactly 1 at that first layer."""
    model = nn.Sequential(nn.BatchNorm1d(3))
    x = sample(500, (3,), seed=0)
    model[0].running_mean.copy_(x.mean(0))
    model[0].running_var.copy_(x.var(0, unbiased=False) - model[0].eps)
    assert batchnorm_mismatch(model, x)["0"] == pytest.approx(0.0, abs=1e-5)
    shifted = x + (model[0].running_var + model[0].eps).sqrt()
    assert batchnorm_mismatch(model, shifted)["0"] == pytest.approx(1.0, abs=1e-5)


def test_deterministic_given_a_seed():
    model = with_statistics(conv2d_model(), (3, 8, 8))
    a = distill_data(model, (3, 8, 8), 40, batch_size=16, max_steps=10, seed=3)
    b = distill_data(model, (3, 8, 8), 40, batch_size=16, max_steps=10, seed=3, device="cpu")
    c = distill_data(model, (3, 8, 8), 40, batch_size=16, max_steps=10, seed=4)
    assert a.shape == (40, 3, 8, 8)  # batches of 16, 16 and 8
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_input_prior():
    """Statistics from inputs N(1, 0.5^2): the right prior brings the inputs' own per-channel statistics close to
    it with every BatchNorm layer still matched; ZeroQ's standardised prior (0, 1) pulls against the layers."""
    view = (1, 3, 1, 1)
    model = with_statistics(conv2d_model(), (3, 8, 8), mean=torch.ones(3).view(view), std=torch.full(view, 0.5))
    x = distill_data(model, (3, 8, 8), 32, input_prior=(1.0, 0.5), seed=0)
    per_channel = x.transpose(0, 1).flatten(1)
    assert per_channel.mean(1) == pytest.approx(torch.ones(3), abs=0.1)
    assert per_channel.std(1) == pytest.approx(torch.full((3,), 0.5), abs=0.1)
    assert max(batchnorm_mismatch(model, x).values()) <= 0.05
    wrong = distill_data(model, (3, 8, 8), 32, input_prior=(0.0, 1.0), seed=0, max_steps=100)
    assert max(batchnorm_mismatch(model, wrong).values()) > 0.05


def test_leaves_the_model_as_found():
    model = with_statistics(conv2d_model(), (3, 8, 8))
    model.train()
    model[4].eval()  # a mixed mode survives
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    distill_data(model, (3, 8, 8), 8, max_steps=5)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight)) and model[7].weight.grad is None


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics.*calibrate on real data"):
        distill_data(nn.Sequential(nn.Linear(4, 2)), (4,), 8)
    with pytest.raises(ValueError, match="no BatchNorm"):
        distill_data(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)), (4,), 8)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.unused = nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    with pytest.raises(ValueError, match=r"\['unused'\] did not run"):
        distill_data(Skips().eval(), (4,), 8)
    model = conv1d_model()
    with pytest.raises(ValueError, match="input_shape must be the shape of one sample"):
        distill_data(model, 12, 8)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        distill_data(model, (3, 12), 0)
    with pytest.raises(ValueError, match="input_prior std"):
        distill_data(model, (3, 12), 8, input_prior=(0.0, 0.0))


def test_progress_bar(capsys):
    model = with_statistics(conv1d_model(), (3, 12))
    distill_data(model, (3, 12), 8, max_steps=3, tol=0.0, progress=True)
    assert "distill_data" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_matches_cpu():
    """The same starts on any device: the CUDA result is the CPU result up to float rounding of the steps."""
    model = with_statistics(conv2d_model(), (3, 8, 8))
    cpu = distill_data(model, (3, 8, 8), 16, max_steps=3, tol=0.0, seed=1)
    cuda = distill_data(model, (3, 8, 8), 16, max_steps=3, tol=0.0, seed=1, device="cuda")
    assert cuda.device.type == "cuda" and next(model.parameters()).device.type == "cpu"
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-3)
