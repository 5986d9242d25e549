"""HAWQModule: plans against brute force, fine-tune and test, checkpoint round trip, distillation, bad input."""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.models import MNIST1DCNN, ClassificationModule
from lightning_hessian.probe_set import draw_probe_indices, probe_batches
from lightning_hessian.quant.allocation import InfeasibleBudgetError
from lightning_hessian.quant.hawq import HAWQModule
from lightning_hessian.quant.layers import QuantConv1d, QuantLinear
from tests.helpers.allocation import best_allocation
from tests.helpers.modules import LAYERS, TRAINER, float_module, four_class_data
from tests.helpers.problems import fit_full_batch


@pytest.fixture(scope="module")
def trained() -> ClassificationModule:
    """A briefly trained float module (plain loop: near a minimum, so the Hessian traces are positive)."""
    return fit_full_batch(float_module(), *four_class_data(), steps=150)


def loaders() -> tuple[DataLoader, DataLoader]:
    x, y = four_class_data()
    xt, yt = four_class_data(128, seed=1)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), DataLoader(TensorDataset(xt, yt), 64)


@pytest.mark.parametrize("metric", ["trace", "quadratic"])
def test_planned_bits_meet_the_budget_and_equal_brute_force(trained, metric):
    x, y = four_class_data()
    hawq = HAWQModule(trained, budgets={"size": 0.5}, bit_choices=(2, 4, 8), probe_data=[(x, y)], metric=metric)
    bits = hawq.plan([(x, y)])
    sens = hawq.sensitivity.omega(metric)
    assert hawq.sensitivity.metrics == (metric,)
    assert all(v > 0 for table in sens.values() for v in table.values())
    params = {name: s.params for name, s in hawq.stats.items()}
    assert params == {"net.features.0": 30, "net.features.2": 108, "net.features.4": 108, "net.classifier": 120}
    size = {name: {b: n * b for b in (2, 4, 8)} for name, n in params.items()}
    budget = sum(params.values()) * (2 + 0.5 * (8 - 2))  # halfway from all-2 to all-8 bits
    assert sum(size[name][b] for name, b in bits.items()) <= budget
    assert bits == best_allocation(sens, {"size": size}, {"size": budget}, [[name] for name in LAYERS])[1]
    assert len(set(bits.values())) > 1  # a real mix, not a uniform answer


def test_activation_aware_plan_adds_the_input_rounding_and_equals_brute_force(trained):
    x, y = four_class_data()
    hawq = HAWQModule(trained, budgets={"size": 0.5}, bit_choices=(2, 4, 8), act_bits="follow", metric="quadratic+act")
    bits = hawq.plan([(x, y)])
    sens = hawq.sensitivity
    assert sens.metrics == ("quadratic", "quadratic+act")
    omega = sens.omega("quadratic+act")
    for name in LAYERS:
        assert omega[name] == {b: sens.quadratic[name][b] + sens.act_quadratic[name][b] for b in (2, 4, 8)}
        assert sens.act_quadratic[name][2] > sens.act_quadratic[name][8] > 0
    size = {name: {b: s.params * b for b in (2, 4, 8)} for name, s in hawq.stats.items()}
    budget = sum(s.params for s in hawq.stats.values()) * 5
    assert bits == best_allocation(omega, {"size": size}, {"size": budget}, [[name] for name in LAYERS])[1]


def test_plan_with_ties_and_two_budgets_equals_brute_force(trained):
    x, y = four_class_data()
    ties = [("net.features.2", "net.features.4")]
    hawq = HAWQModule(trained, budgets={"size": 0.6, "bops": 0.3}, bit_choices=(2, 4, 8), ties=ties)
    bits = hawq.plan([(x, y)])
    assert bits["net.features.2"] == bits["net.features.4"]
    stats = hawq.stats
    size = {n: {b: s.params * b for b in (2, 4, 8)} for n, s in stats.items()}
    bops = {n: {b: s.macs * b * 8 for b in (2, 4, 8)} for n, s in stats.items()}  # W b-bit x A 8-bit
    budgets = {
        "size": sum(size[n][2] + 0.6 * (size[n][8] - size[n][2]) for n in stats),
        "bops": sum(bops[n][2] + 0.3 * (bops[n][8] - bops[n][2]) for n in stats),
    }
    groups = [["net.features.0"], ["net.features.2", "net.features.4"], ["net.classifier"]]
    assert bits == best_allocation(hawq.sensitivity.omega(), {"size": size, "bops": bops}, budgets, groups)[1]


def test_fine_tune_test_and_checkpoint_round_trip_into_a_fresh_module(trained, tmp_path):
    train, test = loaders()
    hawq = HAWQModule(trained, budgets={"size": 0.5}, probe_size=128, probe_batch_size=64, cache_dir=tmp_path / "c",
                      act_bits="follow")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, default_root_dir=tmp_path, **TRAINER)
    trainer.fit(hawq, train)
    assert trainer.global_step == 3
    assert set(hawq.weight_bits) == set(LAYERS) and set(hawq.weight_bits.values()) <= {4, 8}
    assert isinstance(hawq.module.net.features[0], QuantConv1d) and isinstance(hawq.module.net.classifier, QuantLinear)
    assert not isinstance(trained.net.classifier, QuantLinear)  # the float module is left as it was
    acts = {name: hawq.module.get_submodule(name).act.bits for name in LAYERS}
    assert acts == hawq.weight_bits and hawq.hawq_bits[-1] == -1  # W4A4 / W8A8
    rows = hawq.bit_report().rows  # BOPS: MACs * b_w * b_a with b_a = b_w
    assert [r.bops for r in rows] == [hawq.stats[r.name].macs * r.bits**2 for r in rows]
    # The allocation is the plan of the float module on the probe set (cached, so no second Hessian).
    x, y = train.dataset.tensors
    probe = probe_batches(train.dataset, draw_probe_indices(len(x), 128, seed=0), 64)
    again = HAWQModule(trained, budgets={"size": 0.5}, cache_dir=tmp_path / "c")
    assert again.plan(probe) == hawq.weight_bits and again.sensitivity.cached
    assert (tmp_path / "hawq" / "hawq_report.md").exists() and (tmp_path / "hawq" / "hawq_report.png").exists()
    assert "net.classifier" in (tmp_path / "hawq" / "hawq_report.md").read_text()
    metrics = trainer.test(hawq, test, verbose=False)[0]
    assert 0.3 < metrics["test/acc"] <= 1 and math.isfinite(metrics["test/loss"])
    path = tmp_path / "hawq.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hawq"]["bits"] == hawq.weight_bits and all(type(b) is int for b in ckpt["hawq"]["bits"].values())
    assert ckpt["hawq"]["act_bits"] == "follow"
    fresh = HAWQModule(float_module(seed=5))  # other weights, no bit configuration: all from the checkpoint
    reloaded = pl.Trainer(**TRAINER).test(fresh, test, ckpt_path=path, verbose=False)[0]
    assert reloaded == metrics
    assert fresh.weight_bits == hawq.weight_bits and fresh.sensitivity.trace == hawq.sensitivity.trace
    assert fresh.act_bits == "follow" and {n: fresh.module.get_submodule(n).act.bits for n in LAYERS} == acts
    loaded = HAWQModule.load_from_checkpoint(path, module=float_module(seed=6)).eval()
    hawq.eval()
    torch.testing.assert_close(loaded(x), hawq(x), rtol=0, atol=0)


def test_resume_from_a_checkpoint_into_a_bare_module_continues_exactly(trained, tmp_path):
    x, y = four_class_data()
    train = DataLoader(TensorDataset(x, y), batch_size=64)  # fixed order: the resumed epoch sees the same batches
    opts = dict(probe_data=[(x[:64], y[:64])], optimizer=partial(torch.optim.Adam, lr=1e-3), act_bits="follow",
                metric="quadratic")

    def fit(module, epochs, ckpt_path=None):
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=2, default_root_dir=tmp_path, **TRAINER)
        trainer.fit(module, train, ckpt_path=ckpt_path)
        return trainer

    straight = HAWQModule(trained, budgets={"size": 0.5}, **opts)
    fit(straight, 2)
    first = HAWQModule(trained, budgets={"size": 0.5}, **opts)
    fit(first, 1).save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = HAWQModule(trained, optimizer=opts["optimizer"])  # bits, quantizer ranges, Adam state: all restored
    assert fit(resumed, 2, tmp_path / "epoch1.ckpt").global_step == 4
    assert resumed.weight_bits == straight.weight_bits and resumed.act_bits == "follow"
    assert resumed.sensitivity.quadratic == straight.sensitivity.quadratic
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_fixed_and_uniform_bits_and_layers_left_in_float(trained):
    hawq = HAWQModule(trained, bits=4)
    hawq.configure_model()  # no Trainer: a fixed configuration quantizes at once
    assert hawq.weight_bits == dict.fromkeys(LAYERS, 4)
    assert hawq.module.net.features[2].weight_bits == 4
    assert hawq.hawq_bits.tolist() == [4, 4, 4, 4, 8]
    mixed = HAWQModule(trained, bits={"net.features.0": 8, "net.features.2": 2, "net.features.4": 6})
    with pytest.warns(UserWarning, match=r"left in float: net.classifier \(Linear not in bits\)"):
        mixed.configure_model()
    assert mixed.hawq_bits.tolist() == [8, 2, 6, 0, 8]
    assert type(mixed.module.net.classifier) is nn.Linear
    x, _ = four_class_data(8)
    mixed.measure_costs(x)
    report = mixed.bit_report()
    assert [r.bits for r in report.rows] == [8, 2, 6, None]
    assert report.rows[3].size_bits == report.rows[3].float_size_bits == (120 + 4) * 32
    assert report.rows[1].size_bits == 108 * 2 + 6 * 32
    # A state dict rebuilds its own quantized network, even into a module planned differently.
    other = HAWQModule(float_module(seed=3), bits=8)
    with pytest.warns(UserWarning, match="left in float"):
        other.load_state_dict(mixed.state_dict())
    assert other.weight_bits == mixed.weight_bits
    torch.testing.assert_close(other.eval()(x), mixed.eval()(x), rtol=0, atol=0)
    # Activation bits that follow the weights travel in the state dict too (code -1).
    follow = HAWQModule(trained, bits=dict(zip(LAYERS, (8, 4, 6, 2))), act_bits="follow")
    follow.configure_model()
    assert follow.hawq_bits.tolist() == [8, 4, 6, 2, -1]
    other.load_state_dict(follow.state_dict())
    assert other.act_bits == "follow" and [other.module.get_submodule(n).act.bits for n in LAYERS] == [8, 4, 6, 2]


def test_distillation_loss_is_the_weighted_task_loss_plus_scaled_kl(trained):
    w, t = 0.25, 2.0
    hawq = HAWQModule(trained, bits=4, distill_weight=w, temperature=t)
    hawq.configure_model()
    x, y = four_class_data(32)
    hawq.calibrate([(x, y)])
    with pytest.warns(UserWarning, match="not registered"):  # self.log without a Trainer is a no-op
        loss = hawq.training_step((x, y), 0)
    with torch.no_grad():
        student, teacher = hawq.module(x), trained(x)
    kl = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    expected = (1 - w) * F.cross_entropy(student, y) + w * kl
    assert float(kl) > 1e-6
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)

    class DirectNet(ClassificationModule):  # computes its logits without self(...): no input to distil on
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

    direct = DirectNet(MNIST1DCNN(channels=6, num_classes=4), num_classes=4)
    hawq = HAWQModule(direct, bits=8, distill_weight=0.5)
    hawq.configure_model()
    with pytest.raises(RuntimeError, match=r"self\(\.\.\.\)"):
        hawq.training_step((x, y), 0)


def test_bad_inputs_raise_one_clear_error_each(trained, tmp_path):
    x, y = four_class_data(64)
    with pytest.raises(ValueError, match="no quantizable layer"):
        HAWQModule(ClassificationModule(nn.Sequential(nn.Flatten(), nn.ReLU()), num_classes=4), bits=8)
    with pytest.raises(ValueError, match=r"ties: unknown layer names \['net.fc'\]"):
        HAWQModule(trained, budgets={"size": 0.5}, ties=[("net.classifier", "net.fc")])
    with pytest.raises(TypeError, match="groups of layer names"):
        HAWQModule(trained, budgets={"size": 0.5}, ties=["net.classifier"])
    with pytest.raises(ValueError, match="bits=9 is outside the supported bit widths 2..8"):
        HAWQModule(trained, bits=9)
    with pytest.raises(ValueError, match=r"bits\['net.classifier'\]=1 is outside"):
        HAWQModule(trained, bits={"net.classifier": 1})
    with pytest.raises(ValueError, match="bit_choices=16 is outside"):
        HAWQModule(trained, budgets={"size": 0.5}, bit_choices=(4, 16))
    with pytest.raises(ValueError, match="metric='quadratic\\+act' .* needs act_bits='follow'"):
        HAWQModule(trained, budgets={"size": 0.5}, metric="quadratic+act")
    with pytest.raises(ValueError, match="act_bits=1 is outside"):
        HAWQModule(trained, bits=8, act_bits=1)
    with pytest.raises(ValueError, match="max_samples=20 is below the 32"):
        HAWQModule(trained, budgets={"size": 0.5}, max_samples=20)
    with pytest.raises(ValueError, match="act_bits='weights' is not supported.*'follow'"):
        HAWQModule(trained, bits=8, act_bits="weights")
    with pytest.raises(ValueError, match="metric must be one of"):
        HAWQModule(trained, budgets={"size": 0.5}, metric="diagonal")
    with pytest.raises(ValueError, match="unknown layers"):
        HAWQModule(trained, bits={"net.head": 4})
    with pytest.raises(ValueError, match="either bits= .* or budgets="):
        HAWQModule(trained, bits=8, budgets={"size": 0.5})
    with pytest.raises(ValueError, match="unknown resource 'latency'"):
        HAWQModule(trained, budgets={"latency": 0.5})
    with pytest.raises(ValueError, match=r"budgets\['size'\] must be a finite number >= 0"):
        HAWQModule(trained, budgets={"size": -1})
    with pytest.raises(ValueError, match="pass module_class="):
        HAWQModule(str(tmp_path / "float.ckpt"), bits=8)
    with pytest.raises(TypeError, match="must be a LightningModule or a checkpoint path"):
        HAWQModule(nn.Linear(2, 2), bits=8)
    for kwargs, match in (({"distill_weight": 2}, r"distill_weight .* in \[0, 1\]"),
                          ({"distill_weight": True}, "distill_weight"), ({"temperature": 0}, "temperature"),
                          ({"momentum": 2.0}, "momentum"), ({"trace_rel_tol": -1}, "trace_rel_tol"),
                          ({"seed": "a"}, "seed")):  # at construction, before any Hessian is measured
        with pytest.raises(ValueError, match=match):
            HAWQModule(trained, bits=8, **kwargs)
    # 10 bits is below the all-4-bit size (1,464 bits): the error gives the smallest achievable size.
    hawq = HAWQModule(trained, budgets={"size": 10.0})
    with pytest.raises(InfeasibleBudgetError, match=r"budgets=\{'size': 10.0\}.*size.*1464") as err:
        hawq.plan([(x, y)])
    assert err.value.minimums["size"] == 4 * 366 and hawq.sensitivity is None  # known from the costs alone
    _, test = loaders()
    with pytest.raises(RuntimeError, match="no bit configuration"):
        pl.Trainer(**TRAINER).test(HAWQModule(trained), test, verbose=False)


def test_module_from_a_checkpoint_path_and_a_factory(trained, tmp_path):
    train, _ = loaders()
    module = float_module()
    trainer = pl.Trainer(max_steps=1, default_root_dir=tmp_path, **TRAINER)
    trainer.fit(module, train)
    path = tmp_path / "float.ckpt"
    trainer.save_checkpoint(path)
    factory = partial(ClassificationModule.load_from_checkpoint, net=MNIST1DCNN(channels=6, num_classes=4))
    hawq = HAWQModule(str(path), module_class=factory, bits=8)
    torch.testing.assert_close(hawq.module.net.classifier.weight, module.net.classifier.weight)


class Stateful(ClassificationModule):
    """Keeps a counter in the checkpoint through its own hooks, reads the Trainer in forward and builds a
    layer in configure_model."""

    def configure_model(self):
        if not hasattr(self, "extra"):
            self.extra = nn.Identity()

    def forward(self, x):
        assert self.trainer.state.fn is not None  # attached to the run (the quantized copy too)
        return super().forward(self.extra(x))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["counter"] = getattr(self, "counter", 0)

    def on_load_checkpoint(self, checkpoint):
        self.counter = checkpoint["counter"]


def stateful(seed: int = 0) -> Stateful:
    torch.manual_seed(seed)
    return Stateful(MNIST1DCNN(channels=6, num_classes=4), num_classes=4)


def test_wrapped_module_keeps_its_hooks_trainer_and_checkpoint_state(trained, tmp_path):
    train, test = loaders()
    source = stateful()
    source.load_state_dict(trained.state_dict())
    hawq = HAWQModule(source, bits=4, probe_size=64)
    trainer = pl.Trainer(max_steps=2, **TRAINER)
    trainer.fit(hawq, train)  # configure_model ran on the wrapped module; its forward reads self.trainer
    assert isinstance(hawq.module.extra, nn.Identity)
    hawq.module.counter = 5
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    # the checkpoint's bits (4) replace the constructor's (8): the re-quantized module keeps the counter
    fresh = HAWQModule(stateful(seed=1), bits=8)
    with pytest.warns(UserWarning, match="checkpoint's bits"):
        pl.Trainer(**TRAINER).test(fresh, test, ckpt_path=str(tmp_path / "q.ckpt"), verbose=False)
    assert set(fresh.weight_bits.values()) == {4} and fresh.module.counter == 5


class SkipsOddBatches(ClassificationModule):
    def training_step(self, batch, batch_idx):
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_distillation_runs_in_true_precision_and_on_skipped_batches(trained, precision):
    source = SkipsOddBatches(MNIST1DCNN(channels=6, num_classes=4), num_classes=4)
    source.load_state_dict(trained.state_dict())
    hawq = HAWQModule(source, bits=8, distill_weight=0.5, probe_size=64)
    train, _ = loaders()
    pl.Trainer(max_steps=4, precision=precision, **TRAINER).fit(hawq, train)
    dtype = torch.float64 if precision == "64-true" else torch.bfloat16
    assert hawq._teacher.net.classifier.weight.dtype == dtype  # the run's precision: a copy
    assert source.net.classifier.weight.dtype == torch.float32  # the user's float module is left as it is


def test_a_resumed_planned_fit_takes_the_checkpoints_bits_and_reports_them(trained, tmp_path):
    train, _ = loaders()
    first = HAWQModule(trained, budgets={"size": 0.0}, probe_size=64, report_dir=tmp_path / "a")  # all 4-bit
    trainer = pl.Trainer(max_steps=1, **TRAINER)
    trainer.fit(first, train)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    resumed = HAWQModule(trained, budgets={"size": 1.0}, probe_size=64, report_dir=tmp_path / "b")  # plans 8-bit
    with pytest.warns(UserWarning, match=r"checkpoint's bits .* replace this run's plan"):
        pl.Trainer(max_steps=2, **TRAINER).fit(resumed, train, ckpt_path=str(tmp_path / "q.ckpt"))
    assert set(resumed.weight_bits.values()) == {4}
    assert (tmp_path / "b" / "hawq_report.md").read_text() == (tmp_path / "a" / "hawq_report.md").read_text()
