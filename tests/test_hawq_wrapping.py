"""HAWQModule behaves as the module it wraps: batch hooks, lifecycle hooks, dataloaders, Hessian loss."""

from __future__ import annotations

from collections import Counter
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator, HessianSpectrumCallback, top_eigenvalues
from lightning_hessian.models import MNIST1DCNN, ClassificationModule
from lightning_hessian.probe_set import draw_probe_indices, probe_batches
from lightning_hessian.quant.allocation import InfeasibleBudgetError
from lightning_hessian.quant.hawq import HAWQModule
from tests.helpers.modules import TRAINER, four_class_data
from tests.helpers.problems import fit_full_batch


def net() -> MNIST1DCNN:
    return MNIST1DCNN(channels=6, num_classes=4)


def like(cls: type[ClassificationModule], module: ClassificationModule) -> ClassificationModule:
    """A ``cls`` with ``module``'s weights and optimizer."""
    other = cls(net(), optimizer=partial(torch.optim.Adam, lr=3e-3), num_classes=4)
    other.load_state_dict(module.state_dict())
    return other


@pytest.fixture(scope="module")
def trained() -> ClassificationModule:
    torch.manual_seed(0)
    module = ClassificationModule(net(), optimizer=partial(torch.optim.Adam, lr=3e-3), num_classes=4)
    return fit_full_batch(module, *four_class_data(), steps=150)


class Hooked(ClassificationModule):
    """Its data stores ``-2 x``: the batch hooks give ``x`` back exactly (negate before the transfer, halve after)."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return -x, y

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        x, y = super().transfer_batch_to_device(batch, device, dataloader_idx)
        return x.contiguous(), y

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x / 2, y


def test_batch_hooks_apply_to_the_probe_calibration_fine_tune_and_test(trained, tmp_path):
    """Hooks undoing a stored ``-2 x`` give the same plan, ranges, weights and metrics as plain ``x`` data."""
    x, y = four_class_data()
    xt, yt = four_class_data(128, seed=1)

    def run(module, scale):
        pl.seed_everything(0)
        hawq = HAWQModule(module, budgets={"size": 0.5}, metric="quadratic", probe_size=128, probe_batch_size=64,
                          act_bits="follow")
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, default_root_dir=tmp_path, **TRAINER)
        trainer.fit(hawq, DataLoader(TensorDataset(x * scale, y), 64, shuffle=True),
                    DataLoader(TensorDataset(xt * scale, yt), 64))
        val = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return hawq, val, trainer.test(hawq, DataLoader(TensorDataset(xt * scale, yt), 64), verbose=False)[0]

    plain, plain_val, plain_test = run(like(ClassificationModule, trained), 1)
    hooked, hooked_val, hooked_test = run(like(Hooked, trained), -2)
    assert plain_test["test/acc"] > 0.5
    assert hooked.weight_bits == plain.weight_bits and len(set(plain.weight_bits.values())) > 1
    # Equal up to float summation order (CPU kernels may sum differently for differently aligned inputs).
    for name, table in plain.sensitivity.quadratic.items():  # the probe went through the hooks
        assert hooked.sensitivity.quadratic[name] == pytest.approx(table, rel=1e-6)
    assert hooked_val == pytest.approx(plain_val, rel=1e-5) and hooked_test == pytest.approx(plain_test, rel=1e-5)
    for (name, a), b in zip(plain.state_dict().items(), hooked.state_dict().values()):  # ranges, fine-tuned weights
        torch.testing.assert_close(b, a, msg=name)


RECORDED = ("on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_train_epoch_start",
            "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
            "on_before_optimizer_step", "on_validation_start", "on_validation_epoch_start",
            "on_validation_batch_start", "on_validation_batch_end", "on_validation_end", "on_test_start",
            "on_test_epoch_start", "on_test_batch_start", "on_test_batch_end", "on_test_end")


class Recorder(ClassificationModule):
    """Counts its hook calls, brings its own dataloaders and differentiates twice the cross-entropy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = Counter()

    def hessian_loss(self, batch):
        return 2 * super().hessian_loss(batch)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*four_class_data()), 64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*four_class_data(128, seed=1)), 64)

    def test_dataloader(self):
        return DataLoader(TensorDataset(*four_class_data(128, seed=2)), 64)


def _recording(name):
    def hook(self, *args):
        self.calls[name] += 1
        return getattr(super(Recorder, self), name)(*args)
    return hook


for _name in RECORDED:
    setattr(Recorder, _name, _recording(_name))


def test_the_wrapped_modules_hooks_and_dataloaders_run_as_without_the_wrapper(trained, tmp_path):
    def run(module):
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                             default_root_dir=tmp_path, **TRAINER)
        trainer.fit(module)  # the wrapped module's dataloaders
        return trainer.test(module, verbose=False)[0]

    plain = like(Recorder, trained)
    run(plain)
    hawq = HAWQModule(like(Recorder, trained), bits=8, probe_size=128)
    run(hawq)
    assert hawq.module.calls == plain.calls
    assert plain.calls["on_train_batch_start"] == 4 and plain.calls["on_validation_epoch_start"] == 3  # + sanity
    assert plain.calls["on_after_backward"] == 4 and plain.calls["on_test_batch_end"] == 1


def test_hessian_callbacks_differentiate_the_wrapped_modules_hessian_loss(trained, tmp_path):
    x, y = four_class_data(64)
    hawq = HAWQModule(like(Recorder, trained), bits=8, probe_size=128)
    spectrum = HessianSpectrumCallback(trace=False, probe_data=[(x, y)], plot=False, max_overhead=None)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, default_root_dir=tmp_path,
                         callbacks=[spectrum], **TRAINER)
    trainer.fit(hawq)
    hawq.eval()
    torch.testing.assert_close(hawq.hessian_loss((x, y)), 2 * F.cross_entropy(hawq.module(x), y))
    op = HessianOperator(hawq, lambda model, batch: 2 * F.cross_entropy(model(batch[0]), batch[1]), [(x, y)])
    expected = float(top_eigenvalues(op, k=1, tol=1e-3, seed=0).eigenvalues[0])
    assert spectrum.history[-1]["eigenvalues"][0] == pytest.approx(expected, rel=1e-5)


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):
        CountingAdam.steps += 1
        return super().step(closure)


class Manual(ClassificationModule):
    """The same update as automatic optimization, stepped by hand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self._shared_step(batch, "train")
        self.manual_backward(loss)
        opt.step()


def test_a_manually_optimized_module_steps_once_per_batch_like_the_automatic_one(trained, tmp_path):
    x, y = four_class_data()

    def run(cls):
        module = cls(net(), optimizer=partial(CountingAdam, lr=1e-3), num_classes=4)
        module.load_state_dict(trained.state_dict())
        hawq = HAWQModule(module, bits=4, probe_data=[(x[:64], y[:64])])
        CountingAdam.steps = 0
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, default_root_dir=tmp_path, **TRAINER)
        trainer.fit(hawq, DataLoader(TensorDataset(x, y), 64, shuffle=True))
        return hawq, trainer.global_step, CountingAdam.steps

    auto, auto_steps, auto_calls = run(ClassificationModule)
    manual, manual_steps, manual_calls = run(Manual)
    assert (manual_steps, manual_calls) == (auto_steps, auto_calls) == (3, 3)
    assert not manual.automatic_optimization and auto.automatic_optimization
    for (name, a), b in zip(auto.state_dict().items(), manual.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"distill_weight > 0 .*\(automatic_optimization=False\)"):
        HAWQModule(manual.module, bits=4, distill_weight=0.5)


class DataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(*four_class_data()), 64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*four_class_data(128, seed=1)), 64)


def test_evaluating_without_a_fit_calibrates_on_the_training_probe_or_says_what_is_missing(trained, tmp_path):
    x, y = four_class_data()
    probe = probe_batches(TensorDataset(x, y), draw_probe_indices(len(x), 128, seed=0), 64)
    with_probe = HAWQModule(like(ClassificationModule, trained), bits=4, act_bits=3, probe_data=probe)
    expected = pl.Trainer(**TRAINER).validate(with_probe, datamodule=DataModule(), verbose=False)[0]
    hawq = HAWQModule(like(ClassificationModule, trained), bits=4, act_bits=3, probe_size=128, probe_batch_size=64)
    assert pl.Trainer(**TRAINER).validate(hawq, datamodule=DataModule(), verbose=False)[0] == expected
    float_acc = pl.Trainer(**TRAINER).validate(trained, datamodule=DataModule(), verbose=False)[0]["val/acc"]
    assert expected["val/acc"] != float_acc  # 3-bit activations do change the answer
    for name, q in hawq.module.named_modules():
        if hasattr(q, "running_max"):
            torch.testing.assert_close(q.running_max, with_probe.module.get_submodule(name).running_max, msg=name)
    test = DataLoader(TensorDataset(*four_class_data(128, seed=1)), 64)  # no training data to calibrate on
    with pytest.raises(RuntimeError, match="no ranges .* pass probe_data= .* ckpt_path="):
        pl.Trainer(**TRAINER).test(HAWQModule(like(ClassificationModule, trained), bits=4), test, verbose=False)
    # A checkpoint brings the ranges.
    trainer = pl.Trainer(max_steps=1, default_root_dir=tmp_path, **TRAINER)
    trainer.fit(HAWQModule(like(ClassificationModule, trained), bits=4), datamodule=DataModule())
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    metrics = trainer.test(trainer.lightning_module, test, verbose=False)[0]
    again = pl.Trainer(**TRAINER).test(HAWQModule(like(ClassificationModule, trained), bits=4), test,
                                       ckpt_path=tmp_path / "q.ckpt", verbose=False)[0]
    assert again == metrics


def test_validate_then_fit_calibrates_measures_costs_and_reports_as_a_plain_fit(trained, tmp_path):
    def fit(validate_first, folder):
        hawq = HAWQModule(like(ClassificationModule, trained), bits=4, act_bits=4, probe_size=128,
                          report_dir=tmp_path / folder)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path, **TRAINER)
        if validate_first:
            trainer.validate(hawq, datamodule=DataModule(), verbose=False)
        pl.seed_everything(0)
        trainer.fit(hawq, datamodule=DataModule())
        return hawq

    straight, validated = fit(False, "straight"), fit(True, "validated")
    assert validated.bit_report() == straight.bit_report()
    report = (tmp_path / "straight" / "hawq_report.md").read_text()
    assert (tmp_path / "validated" / "hawq_report.md").read_text() == report and "net.classifier" in report
    for (name, a), b in zip(straight.state_dict().items(), validated.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.cls, self.aux = nn.Linear(40, 16), nn.Linear(16, 4), nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h), self.aux(h)


class MultiOutput(ClassificationModule):
    def hessian_loss(self, batch):
        return F.cross_entropy(self(batch[0])[0], batch[1])

    def training_step(self, batch, batch_idx):
        logits, aux = self(batch[0])
        return F.cross_entropy(logits, batch[1]) + aux.square().mean()


def test_configuration_errors_come_before_the_hessian(trained, tmp_path):
    x, y = four_class_data(64)
    train = DataLoader(TensorDataset(x, y), 32)

    def fit(hawq):
        trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **TRAINER)
        try:
            trainer.fit(hawq, train)
        finally:
            assert hawq.sensitivity is None and trainer.global_step == 0

    dict_loss = lambda model, batch: F.cross_entropy(model(batch["x"]), batch["y"])  # noqa: E731
    with pytest.raises(ValueError, match="pass example_input="):
        fit(HAWQModule(trained, budgets={"size": 0.5}, loss_fn=dict_loss, probe_data=[{"x": x, "y": y}]))
    # 1,000 bits is below the all-4-bit size (4 * 366 = 1,464 bits), which the costs alone tell.
    with pytest.raises(InfeasibleBudgetError, match=r"budgets=\{'size': 1000.0\}.*smallest achievable 1464"):
        fit(HAWQModule(trained, budgets={"size": 1000.0}, probe_data=[(x, y)]))
    multi = MultiOutput(TwoHeads(), num_classes=4)
    with pytest.raises(ValueError, match="distill_weight=0.5 .* MultiOutput.forward returns a tuple"):
        fit(HAWQModule(multi, budgets={"size": 0.5}, distill_weight=0.5, probe_data=[(x, y)]))
    hawq = HAWQModule(multi, distill_weight=0.5)  # no bits yet (a resumed fit): the first step says it
    hawq.quantize(8)
    with pytest.raises(ValueError, match="distill_weight=0.5 .* returns a tuple"):
        hawq.training_step((x, y), 0)


def test_a_plan_on_unconverged_traces_warns_and_says_so_in_the_report(trained, tmp_path):
    x, y = four_class_data()

    def fit(folder, **sampling):
        hawq = HAWQModule(trained, budgets={"size": 0.5}, probe_data=[(x, y)], report_dir=tmp_path / folder, **sampling)
        pl.Trainer(max_steps=1, default_root_dir=tmp_path, **TRAINER).fit(hawq, DataLoader(TensorDataset(x, y), 64))
        return hawq.sensitivity, (tmp_path / folder / "hawq_report.md").read_text()

    knobs = r"after 32 probes \(max_samples=32\) .* error is \d+\.\d% > trace_rel_tol=0.001; raise max_samples"
    with pytest.warns(UserWarning, match="did not converge: " + knobs):
        sens, report = fit("rough", trace_rel_tol=1e-3, max_samples=32)
    worst = max(sens.trace_std_error[n] / sens.trace[n] for n in sens.trace)
    assert not sens.converged and sens.num_samples == 32 and worst > 1e-3
    assert "**Sensitivity not converged**: the Hutchinson traces did not converge: after 32 probes" in report
    assert f"relative standard error is {worst:.1%}" in report
    sens, report = fit("steady", trace_rel_tol=0.5)
    assert sens.converged and "not converged" not in report


class NoIndexWithState(ClassificationModule):
    """A validation_step without batch_idx, and extra state kept through its own checkpoint hooks."""

    def validation_step(self, batch):
        return super().validation_step(batch, 0)

    def test_step(self, batch, idx):  # batch_idx under another name
        self.test_indices = [*getattr(self, "test_indices", []), idx]
        return super().test_step(batch, idx)

    def on_train_epoch_end(self):
        self.epochs_seen = getattr(self, "epochs_seen", 0) + 1

    def on_save_checkpoint(self, checkpoint):
        checkpoint["epochs_seen"] = getattr(self, "epochs_seen", 0)

    def on_load_checkpoint(self, checkpoint):
        self.epochs_seen = checkpoint["epochs_seen"]


class CountingHAWQ(HAWQModule):
    """A subclass with its own epoch hook: it must run instead of the wrapped module's."""

    def on_train_epoch_end(self):
        self.own_calls = getattr(self, "own_calls", 0) + 1


def test_step_signatures_checkpoint_hooks_and_subclass_hooks_are_honoured(trained, tmp_path):
    x, y = four_class_data()
    wrapped = like(NoIndexWithState, trained)
    hawq = CountingHAWQ(wrapped, bits=8, probe_size=64)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, default_root_dir=tmp_path, **TRAINER)
    loader = DataLoader(TensorDataset(x, y), 64)
    trainer.fit(hawq, loader, loader)  # validation_step(batch) gets no batch_idx, as without the wrapper
    assert hawq.own_calls == 2 and not hasattr(hawq.module, "epochs_seen")  # the subclass's hook ran instead
    trainer.test(hawq, DataLoader(TensorDataset(x, y), 32), verbose=False)
    assert hawq.module.test_indices == list(range(len(x) // 32 + (len(x) % 32 > 0)))
    hawq.module.epochs_seen = 5
    trainer.save_checkpoint(tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=False)["epochs_seen"] == 5
    restored = HAWQModule(like(NoIndexWithState, trained))
    restored.on_load_checkpoint(torch.load(tmp_path / "h.ckpt", weights_only=False))
    assert restored.module.epochs_seen == 5 and set(restored.weight_bits.values()) == {8}  # on the quantized copy


def test_random_batch_hooks_in_the_probe_leave_the_training_random_stream_alone(trained, tmp_path):
    class Augmented(ClassificationModule):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return x + 0.01 * torch.randn_like(x), y

    x, y = four_class_data()

    def first_draw(callbacks):
        pl.seed_everything(0)
        module = like(Augmented, trained)
        draws = []
        module.on_train_batch_start = lambda batch, idx: draws.append(torch.rand(1).item())
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, callbacks=callbacks, default_root_dir=tmp_path,
                             **TRAINER)
        trainer.fit(module, DataLoader(TensorDataset(x, y), 64))
        return draws[0]

    assert first_draw([HessianSpectrumCallback(probe_size=64, trace=False, max_overhead=None)]) == first_draw([])
