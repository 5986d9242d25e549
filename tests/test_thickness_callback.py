"""BoundaryThicknessCallback: logged values against the function on the probe set, no trace, state, bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.attacks import boundary_thickness
from lightning_hessian.callbacks.probe import draw_probe_indices
from lightning_hessian.callbacks.thickness import BoundaryThicknessCallback

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, D, LO, HI = 96, 6, -2.0, 2.0


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).clamp(LO, HI)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    y[::5] = (y[::5] + 1) % 3  # label noise: predictions and labels differ on some samples
    return TensorDataset(x, y)


class Data(pl.LightningDataModule):
    def __init__(self, layout: str = "tuple", shuffle: bool = True):
        super().__init__()
        self.layout, self.shuffle, self.input_range, self.data = layout, shuffle, (LO, HI), _data()

    def _collate(self, samples):
        x, y = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        return {"signal": x, "label": y} if self.layout == "dict" else (x, y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=self.shuffle, collate_fn=self._collate)


class Module(pl.LightningModule):
    """Dropout, BatchNorm and a shuffled loader: any RNG draw or buffer change by the callback would show."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 3))
        self.modes: list[bool] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["signal"], batch["label"]) if isinstance(batch, dict) else batch
        self.modes.append(all(m.training for m in self.modules()))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)


def fit(callbacks, epochs=2, data=None, ckpt_path=None, checkpoint=False, module=None):
    pl.seed_everything(0, verbose=False)
    module = module or Module()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=checkpoint, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data or Data(), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("classes", ["predicted", "labels"])
def test_logged_values_are_the_thickness_of_the_probe_set_and_leave_no_trace(classes):
    cb = BoundaryThicknessCallback(eps=3.0, every_n_epochs=2, probe_size=40, probe_batch_size=16, steps=5,
                                   num_points=32, classes=classes, seed=3)
    module, trainer = fit([cb], epochs=4)
    plain, _ = fit([], epochs=4)
    for (name, a), b in zip(module.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name  # same weights, BatchNorm statistics and RNG stream as without the callback
    assert all(module.modes) and module.training
    assert [h["epoch"] for h in cb.history] == [1, 3]

    x, y = _data().tensors
    rows = torch.tensor(draw_probe_indices(N, 40, seed=3))
    offsets = torch.randint(1, 3, (40,), generator=torch.Generator().manual_seed(3))  # the documented draw
    predicted = module.eval()(x[rows]).argmax(1).detach()
    assert (predicted != y[rows]).any()  # the two choices differ here
    i = predicted if classes == "predicted" else y[rows]
    direct = boundary_thickness(module, x[rows], i, 3.0, steps=5, num_points=32, clamp=(LO, HI),
                                targets=(i + offsets) % 3)
    record = cb.history[-1]
    assert record["thickness"] == pytest.approx(direct.mean.item(), rel=1e-6)
    assert record["std_error"] == pytest.approx(direct.std_error.item(), rel=1e-5)
    assert record["reached"] == pytest.approx(direct.reached.float().mean().item())
    assert trainer.callback_metrics["robust/boundary_thickness"].item() == pytest.approx(record["thickness"])
    assert trainer.callback_metrics["robust/boundary_thickness_std_error"].item() == pytest.approx(record["std_error"])
    assert record["seconds"] > 0 and 0 < record["thickness"] <= 3.0


def test_history_survives_checkpoint_and_resume(tmp_path):
    def callbacks(folder):
        return [BoundaryThicknessCallback(eps=2.0, every_n_epochs=1, probe_size=24, steps=3, num_points=16),
                pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)]

    def run(cbs, epochs, ckpt_path=None):  # no dropout, no shuffling: the training itself resumes exactly
        fit(cbs, epochs, Data(shuffle=False), ckpt_path, checkpoint=True, module=Module(dropout=0.0))

    full = callbacks("full")
    run(full, 3)
    part = callbacks("part")
    run(part, 2)
    state = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["callbacks"]  # primitives only
    assert state[part[0].state_key] == part[0].state_dict()
    resumed = callbacks("part")
    run(resumed, 3, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert [h["epoch"] for h in resumed[0].history] == [0, 1, 2]
    for a, b in zip(resumed[0].history, full[0].history):
        assert (a["step"], a["thickness"], a["std_error"], a["reached"]) == (
            b["step"], b["thickness"], b["std_error"], b["reached"])


def test_dict_batches_with_keys_and_bad_keys():
    cb = BoundaryThicknessCallback(eps=2.0, every_n_epochs=1, probe_size=16, steps=2, num_points=8,
                                   input_key="signal", target_key="label")
    fit([cb], epochs=1, data=Data("dict"))
    assert len(cb.history) == 1
    with pytest.raises(ValueError, match="input_key='x'"):
        fit([BoundaryThicknessCallback(probe_size=16)], epochs=1, data=Data("dict"))


class NoForward(Module):
    """Calls its network in training_step; has no forward of its own."""

    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])


def test_a_module_without_forward_is_told_what_is_missing():
    with pytest.raises(ValueError, match="forward"):
        fit([BoundaryThicknessCallback(probe_size=16)], epochs=1, module=NoForward())


def test_a_failed_measurement_warns_and_training_goes_on(monkeypatch):
    cb = BoundaryThicknessCallback(eps=2.0, every_n_epochs=1, probe_size=16, steps=2, num_points=8)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cb._metric, "update", broken)
    with pytest.warns(UserWarning, match="training continues"):
        _, trainer = fit([cb], epochs=2)
    assert trainer.current_epoch == 2 and cb.history == []


def test_too_small_eps_warns_that_the_segments_stop_short():
    with pytest.warns(UserWarning, match="raise eps"):
        fit([BoundaryThicknessCallback(eps=1e-3, every_n_epochs=1, probe_size=16, steps=2, num_points=8)], epochs=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eps": 0}, ValueError, "eps"), ({"alpha": 0.9}, ValueError, "alpha < beta"),
    ({"every_n_epochs": 0}, ValueError, "every_n_epochs"), ({"probe_size": 0}, ValueError, "probe_size"),
    ({"num_points": -1}, ValueError, "num_points"), ({"input_key": 1.5}, TypeError, "input_key"),
    ({"clamp": (1, 0)}, ValueError, "clamp"), ({"seed": "0"}, TypeError, "seed"),
    ({"classes": "y"}, ValueError, "classes"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BoundaryThicknessCallback(**kwargs)


def test_the_train_recipe_runs_noisy_mixup_and_logs_the_thickness(tmp_path, data_dir):
    from lightning_hessian import recipes
    from tests.conftest import compose_config

    overrides = ["callbacks=[default,adversarial_augment,boundary_thickness]", "data.num_train=400",
                 "data.num_test=100", "data.batch_size=50", "trainer.max_epochs=2",
                 "callbacks.adversarial_augment.fraction=0", "callbacks.adversarial_augment.mixup_alpha=1.0",
                 "callbacks.adversarial_augment.mixup_noise=0.5", "callbacks.boundary_thickness.every_n_epochs=1",
                 "callbacks.boundary_thickness.probe_size=64", "callbacks.boundary_thickness.steps=5"]
    recipes.train(compose_config("train", overrides, tmp_path, data_dir))
    header, *rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("robust/boundary_thickness")
    values = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert len(values) == 2 and all(0 < v <= 4.0 for v in values)
