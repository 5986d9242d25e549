"""Mixup and noisy mixup in AdversarialAugmentCallback (the training side of the boundary-thickness comparison):
batches against hand-computed mixtures, label probabilities, noise images, resume, no trace, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, K = 24, 4  # samples per batch (= features: sample r is 3 e_r, so a mixture shows its parts), classes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(N, K)

    def forward(self, x):
        return self.linear(x.flatten(1)[:, :N])


def _mixed_batches(cb: AdversarialAugmentCallback, batches: int, layout: str = "tuple"):
    """The callback's batches, each built from x = 3 I (row r: 3 e_r) and labels r % K, with what went in."""
    trainer = SimpleNamespace(global_rank=0, datamodule=None, current_epoch=0)
    net = Net()
    cb.setup(trainer, net, "fit")
    out = []
    for _ in range(batches):
        x, y = 3 * torch.eye(N), torch.arange(N) % K
        batch = {"x": x, "y": y} if layout == "dict" else (x, y)
        cb.on_train_batch_start(trainer, net, batch, 0)
        out.append((batch["x"], batch["y"]) if layout == "dict" else batch)
    return out


def _parts(x_mixed: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """From a mixed batch of 3 I: lam, and per row its partner (-1: a noise image, r itself: unmixed)."""
    own = x_mixed.diagonal() / 3
    others = (x_mixed - torch.diag(x_mixed.diagonal())) / 3
    pure_partner = (others != 0).sum(1) == 1  # a sample partner shows as one other coordinate
    lam = own[pure_partner].unique()
    assert len(lam) <= 1, lam
    partner = torch.where(pure_partner, others.argmax(1), torch.full((N,), -1))
    partner = torch.where((others == 0).all(1), torch.arange(N), partner)
    return (lam.item() if len(lam) else float("nan")), partner, others


def test_mixup_batches_are_the_hand_computed_mixtures_and_labels_follow_lam():
    cb = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, clamp=None, seed=3)
    x0, y0 = 3 * torch.eye(N), torch.arange(N) % K
    kept = expected_kept = 0.0
    lams = []
    for x, y in _mixed_batches(cb, 60):
        lam, partner, _ = _parts(x)
        assert (partner >= 0).all() and sorted(partner.tolist()) == list(range(N))  # a permutation of the batch
        assert torch.allclose(x, lam * x0 + (1 - lam) * x0[partner], atol=1e-6, rtol=0)  # x~ = lam x + (1-lam) x_p
        assert bool(((y == y0) | (y == y0[partner])).all())
        differ = y0 != y0[partner]  # rows whose two labels differ: the label is y_r with probability lam
        kept += float((y == y0)[differ].sum())
        expected_kept += lam * float(differ.sum())
        lams.append(lam)
    lams = torch.tensor(lams)
    assert 0.35 < lams.mean() < 0.65 and 0.05 < lams.var() < 0.12  # Beta(1, 1): mean 1/2, variance 1/12
    spread = (0.25 * 60 * N) ** 0.5  # the binomial standard deviation of the kept count, at most
    assert abs(kept - expected_kept) < 4 * spread, (kept, expected_kept)
    assert cb.batches_seen == 60


def test_noisy_mixup_partners_are_uniform_noise_in_range_with_uniform_labels():
    cb = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=2.0, mixup_noise=0.4, clamp=(-1.0, 4.0), seed=1)
    x0, y0 = 3 * torch.eye(N), torch.arange(N) % K
    noise_rows = rows = 0
    noise_values, noise_labels = [], []
    for x, y in _mixed_batches(cb, 40, layout="dict"):
        lam, partner, others = _parts(x)
        noisy = partner == -1
        noise_rows, rows = noise_rows + int(noisy.sum()), rows + N
        assert lam == lam  # some row has a sample partner in every batch here
        u = others[noisy] * 3 / (1 - lam)  # the noise image off the diagonal, undone from the mixture
        off_diagonal = ~torch.eye(N, dtype=torch.bool)[noisy]
        noise_values.append(u[off_diagonal])
        assert torch.allclose(x[~noisy], (lam * x0 + (1 - lam) * x0[partner.clamp_min(0)])[~noisy], atol=1e-6)
        noise_labels.append(y[noisy & (y != y0)])
    values, labels = torch.cat(noise_values), torch.cat(noise_labels)
    assert values.min() >= -1.0 - 1e-5 and values.max() <= 4.0 + 1e-5
    assert abs(values.mean().item() - 1.5) < 0.05 and abs(values.var().item() - 25 / 12) < 0.1  # uniform on [-1, 4]
    assert abs(noise_rows / rows - 0.4) < 0.05
    counts = torch.bincount(labels, minlength=K).double()  # labels other than the own: uniform over classes
    assert (counts - counts.mean()).abs().max() < 4 * counts.mean().sqrt()


def test_per_channel_ranges_bound_each_channels_noise():
    cb = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, mixup_noise=1.0, clamp=((-10.0, 0.0), (0.0, 10.0)))
    trainer = SimpleNamespace(global_rank=0, datamodule=None)
    cb.setup(trainer, Net(), "fit")
    x, y = torch.zeros(200, 2, 3), torch.zeros(200, dtype=torch.long)
    cb.on_train_batch_start(trainer, nn.Sequential(nn.Flatten(), nn.Linear(6, K)), (x, y), 0)
    # every partner is noise and x = 0, so x~ = (1 - lam) u: channel 0 drawn in [-10, 0], channel 1 in [0, 10]
    assert x[:, 0].max() <= 0 and x[:, 1].min() >= 0
    assert x[:, 0].min() < -0.5 and x[:, 1].max() > 0.5 and x[:, 0].min() >= -10 and x[:, 1].max() <= 10


def test_mixup_resumes_exactly_and_changes_the_state_key(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, N, generator=g) * 3
    data = TensorDataset(x, (x.sum(1) > 36).long() + (x[:, 0] > 1.5).long())

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(epochs, folder, ckpt_path=None):
        cb = AdversarialAugmentCallback("fgsm", eps=0.1, fraction=0.5, clamp=(0.0, 3.0), mixup_alpha=0.5,
                                        mixup_noise=0.5)
        module = Module()
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[cb, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)])
        trainer.fit(module, DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        return module, cb

    full, full_cb = run(4, "full")
    run(2, "part")
    resumed, resumed_cb = run(4, "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed_cb.state_dict() == full_cb.state_dict() and full_cb.samples_attacked > 0
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert full_cb.state_key != AdversarialAugmentCallback("fgsm", eps=0.1, fraction=0.5).state_key
    assert AdversarialAugmentCallback().state_key == AdversarialAugmentCallback(mixup_alpha=0.0).state_key


def test_mixup_leaves_the_global_rng_and_the_model_alone():
    cb = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, mixup_noise=0.5, clamp=(-1.0, 4.0))
    net = Net().train()
    before = (torch.get_rng_state(), {k: v.clone() for k, v in net.state_dict().items()})
    trainer = SimpleNamespace(global_rank=0, datamodule=None)
    cb.setup(trainer, net, "fit")
    cb.on_train_batch_start(trainer, net, (3 * torch.eye(N), torch.arange(N) % K), 0)
    assert torch.equal(torch.get_rng_state(), before[0]) and net.training
    assert all(torch.equal(v, before[1][k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_fraction_zero_without_mixup_leaves_batches_untouched():
    cb = AdversarialAugmentCallback(fraction=0.0, clamp=None)
    (x, y), = _mixed_batches(cb, 1)
    assert torch.equal(x, 3 * torch.eye(N)) and torch.equal(y, torch.arange(N) % K)


@pytest.mark.parametrize("kwargs, match", [
    ({"mixup_alpha": -1.0}, "mixup_alpha"), ({"mixup_noise": 1.5}, "mixup_noise"),
    ({"mixup_noise": 0.5}, "mixup_alpha > 0"), ({"mixup_alpha": float("inf")}, "mixup_alpha"),
])
def test_bad_mixup_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialAugmentCallback(**kwargs)


def test_noisy_mixup_without_a_finite_range_fails_at_fit_start():
    cb = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, mixup_noise=0.5, clamp=None)
    trainer = SimpleNamespace(global_rank=0, datamodule=None)
    cb.setup(trainer, Net(), "fit")
    with pytest.raises(ValueError, match="finite clamp"):
        cb.on_fit_start(trainer, None)
    cb = AdversarialAugmentCallback(fraction=0.0, mixup_alpha=1.0, mixup_noise=0.5, clamp=(0.0, float("inf")))
    cb.setup(trainer, Net(), "fit")
    with pytest.raises(ValueError, match="finite clamp"):
        cb.on_fit_start(trainer, None)
