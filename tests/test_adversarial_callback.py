"""AdversarialAugmentCallback: what reaches training_step, robust accuracy, state, bad input, ABSA."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.attacks import fgsm, pgd, robust_accuracy
from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback
from tests.helpers.schedules import script_probe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, D, B, LO, HI = 64, 6, 16, -1.5, 1.5


def _data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class task with inputs inside [LO, HI]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g).clamp(LO, HI)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()


class Views:
    """A loader yielding ``(x[i:j], y[i:j])`` tuples that share the dataset's storage."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return len(self.y) // self.batch_size

    def __iter__(self):
        b = self.batch_size
        return ((self.x[i:i + b], self.y[i:i + b]) for i in range(0, len(self.y), b))


class Data(pl.LightningDataModule):
    """``(x, y)`` tuples, views of the data or dicts ``{"signal", "label"}``, with an ``input_range``."""

    def __init__(self, batch_size: int = B, layout: str = "tuple", shuffle: bool = False):
        super().__init__()
        self.batch_size, self.layout, self.shuffle = batch_size, layout, shuffle
        self.input_range = (LO, HI)
        self.x, self.y = _data()
        self.x_val, self.y_val = _data(400, seed=1)

    def _collate(self, samples):
        x, y = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        return {"signal": x, "label": y} if self.layout == "dict" else (x, y)

    def train_dataloader(self):
        if self.layout == "views":  # tuples of slices of the dataset tensors: writing into them would corrupt it
            return Views(self.x, self.y, self.batch_size)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=self.shuffle,
                          collate_fn=self._collate)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=50, collate_fn=self._collate)


class Module(pl.LightningModule):
    """Records, per training step, which rows of the batch are not clean dataset rows."""

    def __init__(self, dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.BatchNorm1d(32) if batch_norm else nn.Identity(), nn.Tanh(),
                                 nn.Dropout(dropout), nn.Linear(32, 3))
        self.steps: list[dict] = []  # per step: epoch, rows, changed row mask, the batch as seen

    def forward(self, x):
        return self.net(x)

    def _unpack(self, batch):
        return (batch["signal"], batch["label"]) if isinstance(batch, dict) else batch

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        clean = self.trainer.datamodule.x
        in_data = (x[:, None, :] == clean[None]).all(-1).any(1)
        self.steps.append({"epoch": self.current_epoch, "idx": batch_idx, "x": x.clone(), "y": y.clone(),
                           "changed": ~in_data, "training": [m.training for m in self.modules()]})
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)


def fit(callbacks, epochs=2, module=None, data=None, ckpt_path=None, root=None, checkpoint=False):
    module, data = module or Module(), data or Data()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=checkpoint, default_root_dir=root,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


class Snapshot(pl.Callback):
    """The model (state, grads, train/eval modes) at every batch start; placed before the adversarial callback
    it sees the model before the attack, placed after it the model as training_step will see it."""

    def __init__(self):
        self.records: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.records.append({
            "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
            "training": [m.training for m in pl_module.modules()],
        })


def test_replace_on_tuple_batches_is_fgsm_on_exactly_the_chosen_rows():
    eps, fraction = 0.4, 0.3
    snap, adv, after = Snapshot(), AdversarialAugmentCallback("fgsm", eps=eps, fraction=fraction), Snapshot()
    module, trainer = fit([snap, adv, after], module=Module(batch_norm=True), data=Data(layout="views"))
    data = Data()
    assert torch.equal(trainer.datamodule.x, data.x)  # the loader's tensors were not written into
    assert len(module.steps) == 2 * (N // B)
    for step, before, post in zip(module.steps, snap.records, after.records):
        rows = slice(step["idx"] * B, (step["idx"] + 1) * B)
        clean, y = data.x[rows], data.y[rows]
        changed = step["changed"]
        assert int(changed.sum()) in (4, 5)  # fraction * B = 4.8, rounded up with probability 0.8
        torch.testing.assert_close(step["x"][~changed], clean[~changed], rtol=0, atol=0)
        assert torch.equal(step["y"], y)
        delta = (step["x"] - clean).abs().amax(1)
        assert delta.max() <= eps + 1e-6 and step["x"].min() >= LO and step["x"].max() <= HI
        # exactly FGSM (in eval mode, clamped to the datamodule's input_range) on the weights of this step
        model = Module(batch_norm=True)
        model.load_state_dict(before["state"])
        expected = fgsm(model, clean[changed], y[changed], eps, clamp=(LO, HI))
        torch.testing.assert_close(step["x"][changed], expected, rtol=0, atol=0)
        # the attack left no trace: modes, BatchNorm buffers, parameters, their .grad
        assert all(post["training"]) and all(step["training"])
        for k, v in before["state"].items():
            assert torch.equal(v, post["state"][k]), k
        for g0, g1 in zip(before["grads"], post["grads"]):
            assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert any((step["x"] == HI).any() or (step["x"] == LO).any() for step in module.steps)  # clamp was active
    assert adv.samples_attacked == sum(int(step["changed"].sum()) for step in module.steps)


def test_append_on_dict_batches_with_custom_keys():
    eps, fraction = 0.1, 0.25
    adv = AdversarialAugmentCallback("pgd", eps=eps, steps=3, fraction=fraction, mode="append",
                                     input_key="signal", target_key="label", norm="l2")
    module, _ = fit([adv], epochs=1, data=Data(layout="dict"))
    data = Data()
    k = round(fraction * B)
    for step in module.steps:
        rows = slice(step["idx"] * B, (step["idx"] + 1) * B)
        x, y = step["x"], step["y"]
        assert x.shape == (B + k, D) and y.shape == (B + k,)
        assert torch.equal(x[:B], data.x[rows]) and torch.equal(y[:B], data.y[rows])
        # every appended row is an L2-eps perturbation of a distinct clean row, with that row's label
        dist = torch.cdist(x[B:], data.x[rows])
        nearest = dist.argmin(1)
        assert len(set(nearest.tolist())) == k
        assert (dist.min(1).values <= eps + 1e-6).all() and (dist.min(1).values > 0).all()
        assert torch.equal(y[B:], data.y[rows][nearest])


def test_trust_region_and_callable_attacks():
    eps = 0.5
    adv = AdversarialAugmentCallback("trust_region", eps=eps, norm="l2", fraction=0.5)
    module, trainer = fit([adv], epochs=1)
    data = Data()
    for step in module.steps:
        clean = data.x[step["idx"] * B:(step["idx"] + 1) * B]
        moved = (step["x"] - clean).norm(dim=1)
        assert 0 < int(step["changed"].sum()) <= B // 2 and moved.max() <= eps + 1e-5
    assert float(trainer.callback_metrics["adv/success_rate"]) > 0.5  # a minimal-perturbation attack mostly fools

    shift = AdversarialAugmentCallback(lambda model, x, y: (x + 0.25).clamp(LO, HI), fraction=0.25, clamp=None)
    module, _ = fit([shift], epochs=1)
    for step in module.steps:
        clean = data.x[step["idx"] * B:(step["idx"] + 1) * B]
        changed = step["changed"]
        assert int(changed.sum()) == 4
        torch.testing.assert_close(step["x"][changed], (clean[changed] + 0.25).clamp(LO, HI), rtol=0, atol=0)


def test_fraction_set_from_outside_and_by_schedules():
    adv = AdversarialAugmentCallback("fgsm", eps=0.2, fraction=0.5)

    class Driver(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                adv.fraction = 0.0
            if trainer.global_step == 5:
                adv.fraction = 1.0

    module, _ = fit([adv, Driver()], epochs=2)
    assert [int(s["changed"].sum()) for s in module.steps] == [8, 8, 0, 0, 0, B, B, B]

    sched = AdversarialAugmentCallback("fgsm", eps=0.2, fraction=0.5, fraction_schedule={1: 0.25, 2: 0.0},
                                       eps_schedule=lambda epoch: 0.1 * (epoch + 1))
    module, trainer = fit([sched], epochs=3)
    assert [int(s["changed"].sum()) for s in module.steps] == [8] * 4 + [4] * 4 + [0] * 4
    data = Data()
    for s in module.steps[:8]:
        clean = data.x[s["idx"] * B:(s["idx"] + 1) * B]
        moved = (s["x"] - clean).abs().amax(1)[s["changed"]]
        assert moved.max() == pytest.approx(0.1 * (s["epoch"] + 1), abs=1e-6)
    assert sched.eps == pytest.approx(0.3) and trainer.callback_metrics["adv/fraction"] == 0.0
    with pytest.raises(ValueError, match="fraction"):
        adv.fraction = 1.5


def test_fraction_zero_is_bit_identical_to_no_callback():
    def run(callbacks):
        pl.seed_everything(3)
        module, _ = fit(callbacks, epochs=3, module=Module(dropout=0.3), data=Data(shuffle=True))
        return module.state_dict()

    plain = run([])
    with_callback = run([AdversarialAugmentCallback("pgd", eps=0.3, steps=2, fraction=0.0, robust_eval=True)])
    attacked = run([AdversarialAugmentCallback("pgd", eps=0.3, steps=2, fraction=0.5)])
    for name, value in plain.items():
        assert torch.equal(value, with_callback[name]), name
    assert any(not torch.equal(v, attacked[k]) for k, v in plain.items())


def test_logged_robust_accuracy_equals_direct_pgd_on_the_validation_data():
    eps, steps, seed = 0.5, 1, 7  # one L2 step: the random start matters, so the seed handling is checked
    adv = AdversarialAugmentCallback("pgd", eps=0.3, steps=2, norm="l2", fraction=0.5, robust_eval=True,
                                     robust_eval_eps=eps, robust_eval_steps=steps, seed=seed)
    module, trainer = fit([adv], epochs=6)
    data = Data()
    module.eval()
    attack = partial(pgd, eps=eps, steps=steps, norm="l2", clamp=(LO, HI),
                     generator=torch.Generator().manual_seed(seed))
    direct = robust_accuracy(module, attack, data.val_dataloader())
    logged = trainer.callback_metrics["adv/robust_acc"]
    assert float(logged) == pytest.approx(float(direct), abs=1e-6)
    clean = float(trainer.callback_metrics["val/acc"])
    assert 0 < float(direct) < clean - 0.1  # the attack bites: the check compares a non-trivial number
    assert 0 < float(trainer.callback_metrics["adv/success_rate"]) <= 1


def test_state_survives_a_checkpoint_and_resume_is_exact(tmp_path):
    def callbacks(folder):
        return [AdversarialAugmentCallback("pgd", eps=0.2, steps=2, fraction=0.5, eps_schedule={2: 0.3}),
                AdversarialAugmentCallback("fgsm", eps=0.05, fraction=0.0),
                pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)]

    full_cbs = callbacks("full")
    full, _ = fit(full_cbs, epochs=4, checkpoint=True)
    part_cbs = callbacks("part")
    fit(part_cbs, epochs=2, checkpoint=True)
    state = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["callbacks"]
    assert part_cbs[0].state_key != part_cbs[1].state_key
    assert state[part_cbs[0].state_key] == part_cbs[0].state_dict()
    assert state[part_cbs[1].state_key] == {"fraction": 0.0, "eps": 0.05, "batches_seen": 8, "samples_attacked": 0,
                                            "samples_fooled": 0, "train_counts": [64.0, 0.0, 0.0], "counts_epoch": 1}
    assert {k: v for k, v in part_cbs[0].state_dict().items() if k not in ("samples_fooled", "train_counts")} == {
        "fraction": 0.5, "eps": 0.2, "batches_seen": 8, "samples_attacked": 64, "counts_epoch": 1}
    resumed_cbs = callbacks("part")
    resumed, _ = fit(resumed_cbs, epochs=4, ckpt_path=str(tmp_path / "part" / "last.ckpt"), checkpoint=True)
    assert resumed_cbs[0].state_dict() == full_cbs[0].state_dict()
    assert resumed_cbs[0].eps == 0.3 and resumed_cbs[0].batches_seen == 16
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eps": 0.0}, "eps"), ({"eps": -1}, "eps"), ({"eps": float("inf")}, "eps"), ({"fraction": 1.5}, "fraction"),
     ({"fraction": -0.1}, "fraction"), ({"mode": "insert"}, "mode"), ({"norm": "l1"}, "norm"),
     ({"attack": "cw"}, "attack"), ({"attack": "fgsm", "norm": "l2"}, "norm='linf'"), ({"steps": 0}, "steps"),
     ({"step_size": 0}, "step_size"), ({"clamp": (1, 0)}, "clamp"), ({"robust_eval_attack": "x"}, "robust_eval_attack"),
     ({"fraction_schedule": {0: 2.0}}, "fraction_schedule"), ({"eps_schedule": {-1: 0.1}}, "eps_schedule"),
     ({"robust_eval_eps": 0}, "robust_eval_eps"), ({"seed": "0"}, "seed must be an integer >= 0"),
     ({"seed": True}, "seed"), ({"input_key": 1.5}, "input_key must be an int"), ({"target_key": [0]}, "target_key")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialAugmentCallback(**kwargs)


class NoGradModule(Module):
    def forward(self, x):
        return self.net(x.detach())


@pytest.mark.parametrize(
    "kwargs, layout, module, error, match",
    [
        ({}, "dict", Module, ValueError, "no inputs at input_key='x'.*signal"),
        ({"input_key": "signal", "target_key": "y"}, "dict", Module, ValueError, "no targets at target_key='y'"),
        ({"target_key": 0}, "tuple", Module, ValueError, "target_key=0 must be integer class labels"),
        ({}, "tuple", NoGradModule, ValueError, "attack: .* does not depend on x"),
        ({"fraction": 0.0, "robust_eval": True}, "tuple", NoGradModule, ValueError,
         "robust_eval_attack: .* does not depend on x"),
        ({"clamp": (-1.0, 1.0)}, "tuple", Module, ValueError, "clamp"),
        ({"attack": lambda model, x, y: x[:1]}, "tuple", Module, TypeError, "attack must return .* shape"),
    ],
)
def test_bad_batches_and_models_fail_on_first_use(kwargs, layout, module, error, match):
    with pytest.raises(error, match=match):
        fit([AdversarialAugmentCallback(**kwargs)], epochs=1, module=module(), data=Data(layout=layout))


def test_absa_adds_the_callback_and_halves_its_fraction_at_growth(monkeypatch):
    eigs = [10, 8, 4.9, 4, 3, 3, 3, 3]  # halved at epoch 2: the batch grows from 8 to 16
    script_probe(monkeypatch, eigs.__getitem__)
    abs_cb = AdaptiveBatchSizeCallback(max_batch_size=32, adversarial=True, adversarial_fraction=0.5, probe_size=16,
                                       plot=False)
    module, trainer = fit([abs_cb], epochs=8, data=Data(batch_size=8, shuffle=True))
    added = [cb for cb in trainer.callbacks if isinstance(cb, AdversarialAugmentCallback)]
    assert len(added) == 1 and added[0].attack == "fgsm" and added[0]._range == (LO, HI)
    per_epoch = {}
    for s in module.steps:
        per_epoch.setdefault(s["epoch"], set()).add((len(s["y"]), int(s["changed"].sum())))
    # fraction 0.5 at batch 8, halved to 0.25 at batch 16, then 0 from the second half of training on
    assert [per_epoch[e] for e in range(8)] == [{(8, 4)}] * 3 + [{(16, 4)}] + [{(16, 0)}] * 4
    assert [h["adversarial_fraction"] for h in abs_cb.history] == [0.5] * 3 + [0.25] + [0.0] * 4  # as trained


def test_fraction_holds_at_any_batch_size_and_is_logged_as_attacked():
    # fraction * 1 = 0.5 rounded to even attacked nothing before; the logged value was the setting, not the share
    adv = AdversarialAugmentCallback("fgsm", eps=0.1, fraction=0.5)
    module, trainer = fit([adv], epochs=1, data=Data(batch_size=1))
    attacked = sum(int(step["changed"].sum()) for step in module.steps)
    assert adv.samples_attacked == attacked and 20 < attacked < 44  # of 64, binomial sd 4
    assert float(trainer.callback_metrics["adv/fraction"]) == attacked / N


class FailingAttack:
    """FGSM that raises on the calls listed in ``fail_on`` (0-based)."""

    def __init__(self, *fail_on: int):
        self.calls, self.fail_on = 0, fail_on

    def __call__(self, model, x, y):
        self.calls += 1
        if self.calls - 1 in self.fail_on:
            raise RuntimeError("transient failure")
        return fgsm(model, x, y, 0.1, clamp=(LO, HI))


def test_a_failed_attack_warns_and_leaves_the_batch_clean_after_the_first():
    adv = AdversarialAugmentCallback(FailingAttack(2), fraction=0.5)
    with pytest.warns(RuntimeWarning, match=r"attack on training batch 2 failed on rank 0 .*transient failure"):
        module, _ = fit([adv], epochs=1)
    assert [int(step["changed"].sum()) for step in module.steps] == [8, 8, 0, 8]
    assert adv.samples_attacked == 24
    with pytest.raises(RuntimeError, match="transient failure"):  # the first batch: a misconfiguration, raised
        fit([AdversarialAugmentCallback(FailingAttack(0), fraction=0.5)], epochs=1)


def test_epoch_counts_carry_on_after_a_mid_epoch_restore():
    adv = AdversarialAugmentCallback("fgsm", fraction=0.5)
    adv._train_counts += torch.tensor([32.0, 16.0, 5.0])
    adv._counts_epoch = 3
    restored = AdversarialAugmentCallback("fgsm", fraction=0.5)
    restored.load_state_dict(adv.state_dict())
    trainer = type("T", (), {"current_epoch": 3})()
    restored.on_train_epoch_start(trainer, None)  # the resumed epoch keeps the batches before the checkpoint
    assert restored._train_counts.tolist() == [32.0, 16.0, 5.0]
    trainer.current_epoch = 4
    restored.on_train_epoch_start(trainer, None)
    assert restored._train_counts.tolist() == [0.0, 0.0, 0.0]
