import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.probe_set import draw_probe_indices
from tests.helpers.modules import N_TRAIN, TinyModule, tiny_dataset


def fit(callbacks, max_epochs=2, seed=0, ckpt_path=None, default_root_dir=None, enable_checkpointing=False):
    pl.seed_everything(seed)
    module = TinyModule()
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=enable_checkpointing, default_root_dir=default_root_dir,
    )
    trainer.fit(module, DataLoader(tiny_dataset(), batch_size=16, shuffle=True), ckpt_path=ckpt_path)
    return module, trainer


def dense_eval_hessian(module: TinyModule, indices: list[int]) -> torch.Tensor:
    x, y = tiny_dataset()[indices]
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    names = list(params)
    module.eval()

    def loss(*flat):
        out = torch.func.functional_call(module, ({**dict(zip(names, flat)), **buffers}), (x,))
        return F.cross_entropy(out, y)

    blocks = torch.func.hessian(loss, argnums=tuple(range(len(names))))(*params.values())
    sizes = [p.numel() for p in params.values()]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                      for i in range(len(names))], 0)


def test_logged_values_match_dense_hessian_and_leave_no_trace(tmp_path):
    cb = HessianSpectrumCallback(max_overhead=None, top_k=3, per_layer=True, probe_size=64, probe_batch_size=24, seed=5,
                                 eig_tol=1e-7, trace_rel_tol=0.02, trace_max_samples=2000, plot=True)
    module, trainer = fit([cb], default_root_dir=tmp_path)
    plain, _ = fit([])
    # the callback changed nothing: same final weights and BatchNorm statistics as a run without it
    for (name, a), b in zip(module.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert module.training
    assert [h["epoch"] for h in cb.history] == [0, 1]

    H = dense_eval_hessian(module, draw_probe_indices(N_TRAIN, 64, seed=5)).double()
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    got = torch.tensor(cb.history[-1]["eigenvalues"], dtype=torch.float64)
    assert torch.allclose(got, exact, rtol=1e-4), (got, exact)
    trace = cb.history[-1]["trace"]
    assert abs(trace - H.trace().item()) <= 4 * cb.history[-1]["trace_std_error"] + 1e-3 * abs(H.trace().item())
    # per layer: the first Linear's block is the top-left 6*8+8 square
    n0 = 6 * 8 + 8
    block = torch.linalg.eigvalsh(H[:n0, :n0]).max().item()
    assert math.isclose(cb.history[-1]["layer_eigenvalue"]["net.0"], block, rel_tol=1e-4)
    assert trainer.callback_metrics["hessian/eig_1"].item() == pytest.approx(exact[0].item(), rel=1e-4)
    assert (tmp_path / "hessian" / "spectrum_history.png").stat().st_size > 1000


def test_history_survives_checkpoint_and_resume(tmp_path):
    def callbacks():
        return [HessianSpectrumCallback(max_overhead=None, top_k=1, probe_size=48, eig_tol=1e-6),
                pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)]

    full = callbacks()
    fit(full, max_epochs=3, enable_checkpointing=True)
    first = callbacks()
    fit(first, max_epochs=2, enable_checkpointing=True)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)  # primitives only
    resumed = callbacks()
    fit(resumed, max_epochs=3, ckpt_path=str(tmp_path / "last.ckpt"), enable_checkpointing=True)
    assert any("HessianSpectrumCallback" in key for key in state["callbacks"])
    assert len(resumed[0].history) == 3
    for a, b in zip(resumed[0].history, full[0].history):  # the warm start is restored too: equal values
        assert (a["step"], a["eigenvalues"], a["trace"]) == (b["step"], b["eigenvalues"], b["trace"])


def test_max_overhead_skips_probes_beyond_the_budget():
    strict = HessianSpectrumCallback(probe_size=32, max_overhead=1e-9)
    with pytest.warns(UserWarning, match=r"0 probe\(s\) ran .* 3 scheduled probe\(s\) skipped .*max_overhead=None"):
        fit([strict], max_epochs=3)  # not even the first probe: its cost is predicted from one timed product
    assert strict.history == [] and strict.skipped == 3 and strict._probe.batches is None  # nor collated
    assert strict.state_dict()["skipped"] == 3 and strict.state_dict()["probe_seconds"] > 0  # the timing counts
    generous = HessianSpectrumCallback(probe_size=32, max_overhead=1e9)
    fit([generous], max_epochs=3)
    assert len(generous.history) == 3 and generous.skipped == generous.shrunk == 0
    assert all("trace" in h and h["hvps"] > 0 and h["seconds"] > 0 for h in generous.history)


def test_a_label_out_of_range_anywhere_in_the_probe_set_stops_the_fit_before_training():
    """The loss is checked on the first 32 probe samples at train start; the labels of the rest when the whole
    probe set is collated (here at train start too: max_overhead=None)."""
    from lightning_hessian.probe_set import DefaultLossError

    data = tiny_dataset()
    last = draw_probe_indices(N_TRAIN, N_TRAIN, seed=0)[-1]  # far past the first 32 of the probe draw
    data.tensors[1][last] = 3  # TinyModule has 3 outputs
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[HessianSpectrumCallback(max_overhead=None)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(DefaultLossError, match=r"^HessianSpectrumCallback: .*labels y in \[0, 3\).*y holds 3\.\.3"):
        trainer.fit(TinyModule(), DataLoader(data, batch_size=16))
    assert trainer.global_step == 0


def test_the_state_key_is_formatted_once_per_fit_not_at_every_hook(monkeypatch):
    """Lightning formats a callback's state_key at every hook call: ~4,800 times (2% of the demo's fit) before."""
    calls = []
    key = HessianSpectrumCallback._key
    monkeypatch.setattr(HessianSpectrumCallback, "_key", lambda self: calls.append(1) or key(self))
    cb = HessianSpectrumCallback(probe_size=32, max_overhead=None)
    fit([cb], max_epochs=2)
    assert len(cb.history) == 2 and len(calls) <= 2
    assert cb.state_key == HessianSpectrumCallback(probe_size=32, max_overhead=None).state_key


class FakeClock:
    """Seconds that pass only where the test says: training steps and Hessian-vector products."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class ClockedModule(TinyModule):
    def __init__(self, clock, step_seconds):
        super().__init__(batch_norm=False)
        self.clock, self.step_seconds = clock, step_seconds

    def training_step(self, batch, batch_idx):
        self.clock.t += self.step_seconds
        return super().training_step(batch, batch_idx)


def test_the_set_up_counts_in_the_budget(monkeypatch):
    """Checking the loss and collating the first samples at train start is the callback's cost too: here it takes
    1 s, more than 3% of the run's 1.8 s of training, so no probe runs (uncharged, every probe ran)."""
    from lightning_hessian.callbacks import budget
    from lightning_hessian.callbacks.hessian_probe import HessianProbe

    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    start = HessianProbe.on_train_start

    def slow_start(probe, *args, **kwargs):
        clock.t += 1.0
        return start(probe, *args, **kwargs)

    monkeypatch.setattr(HessianProbe, "on_train_start", slow_start)
    cb = HessianSpectrumCallback(probe_size=32)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"0 probe\(s\) ran"):
        trainer.fit(ClockedModule(clock, 0.1), DataLoader(tiny_dataset(), batch_size=16))
    assert cb.history == [] and cb.skipped == 3 and cb._budget.probe_seconds >= 1.0


@pytest.mark.parametrize("epochs, timed_at", [(5, None), (25, None), (40, 18)])
def test_the_product_is_timed_only_once_the_budget_pays_for_it(monkeypatch, epochs, timed_at):
    """The loss check at train start takes 20 ms (one forward pass), so timing a product is priced at 16 of them,
    0.32 s, and a first, cold probe at 16 more: 3% of the training time, less the check, pays for the timing after
    11.3 s, 19 epochs of 0.6 s, and the whole run's 3% for both from 37 epochs on. A 5-epoch fit never times it
    (the check is all it pays for), nor does a 25-epoch one (no probe could follow); a 40-epoch one times it at
    its 19th scheduled probe."""
    from lightning_hessian.callbacks import budget, hessian_probe

    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    check = hessian_probe.check_loss

    def forward(*args, **kwargs):
        clock.t += 0.02
        return check(*args, **kwargs)

    monkeypatch.setattr(hessian_probe, "check_loss", forward)
    epochs_timed = []
    time_product = hessian_probe.HessianProbe.time_product

    def spy(probe, module):
        if probe.timing is None:
            epochs_timed.append(module.trainer.current_epoch)
        return time_product(probe, module)

    monkeypatch.setattr(hessian_probe.HessianProbe, "time_product", spy)
    cb = HessianSpectrumCallback(plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ClockedModule(clock, 0.1), DataLoader(tiny_dataset(), batch_size=16))
    assert epochs_timed == ([] if timed_at is None else [timed_at])
    if timed_at is None:
        assert cb._probe.timing is None and cb.skipped == epochs and cb._budget.probe_seconds == pytest.approx(0.02)


def test_the_default_schedule_keeps_the_probes_within_their_budget(monkeypatch):
    """A product costs 50 us per sample (4.8 ms on the 96-sample probe set), a training step 0.1 s: 30 epochs
    train 18 s, so the default budget (3%) pays for 0.54 s of probing: full probes (trace: 30+ products),
    eigenvalue-only probes in between, the rest skipped."""
    from lightning_hessian.callbacks import budget
    from lightning_hessian.hessian import HessianOperator
    from lightning_hessian.hessian.operator import sample_count

    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    matmat = HessianOperator.matmat

    def timed(op, V):
        clock.t += 5e-5 * V.shape[0] * sum(sample_count(b) for b in op._batches)
        return matmat(op, V)

    monkeypatch.setattr(HessianOperator, "matmat", timed)
    cb = HessianSpectrumCallback(plot=False)  # the defaults
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=30, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ClockedModule(clock, 0.1), DataLoader(tiny_dataset(), batch_size=16))
    spent, trained = cb._budget.probe_seconds, cb._budget.train_seconds
    # sized for ~10 probes in 30 epochs: the first, cold probe (16 products) fits 3% of three 0.6-s epochs (54 ms)
    # on 64 samples (51 ms), not on the whole (96-sample) training set (77 ms)
    assert trained == pytest.approx(30 * 6 * 0.1) and N_TRAIN == 96 and cb._probe.size == 64
    assert spent <= cb.max_overhead * trained  # within the budget, as accounted at every decision
    full = [h for h in cb.history if "trace" in h]
    assert len(full) >= 1 and len(cb.history) - len(full) >= 2 and cb.skipped >= 5  # the budget is used, not idle
    assert len(cb.history) + cb.skipped == 30
    assert spent >= 0.6 * cb.max_overhead * trained
    warm = [h["hvps"] for h in cb.history if "trace" not in h][1:]
    assert max(warm) <= 8  # warm-started top-1 probes take a handful of products


def test_a_products_fixed_cost_is_told_apart_from_its_cost_per_sample(monkeypatch):
    """A product costs 2 ms per probe batch plus 10 us per sample (Python and dispatch overhead dominate a small
    model's product): timed on 32 and 8 samples, the prediction for the first probe on the chosen set is exact:
    79 ms on the whole training set (batches of 64 and 32), within 3% of the first 3.6-s epoch (108 ms), where 32
    samples' average alone (72.5 us per sample) would predict 111 ms and settle for 64 samples."""
    from lightning_hessian.callbacks import budget
    from lightning_hessian.callbacks.budget import EIGEN
    from lightning_hessian.hessian import HessianOperator
    from lightning_hessian.hessian.operator import sample_count

    clock = FakeClock()
    monkeypatch.setattr(budget, "now", clock)
    matmat = HessianOperator.matmat
    costs = []

    def timed(op, V):
        cost = V.shape[0] * sum(2e-3 + 1e-5 * sample_count(b) for b in op._batches)
        clock.t += cost
        costs.append(cost)
        return matmat(op, V)

    monkeypatch.setattr(HessianOperator, "matmat", timed)
    cb = HessianSpectrumCallback(trace=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    estimates = []
    prepare = HessianSpectrumCallback._prepare

    def spy(callback, *args):
        prepare(callback, *args)
        estimates.append(callback._budget.estimate[EIGEN])

    monkeypatch.setattr(HessianSpectrumCallback, "_prepare", spy)
    trainer.fit(ClockedModule(clock, 0.6), DataLoader(tiny_dataset(), batch_size=16))
    timing = cb._probe.timing
    assert timing["product_fixed"] == pytest.approx(2e-3) and timing["product_per_sample"] == pytest.approx(1e-5)
    assert cb._probe.size == N_TRAIN == 96
    assert estimates == [pytest.approx(16 * (2 * 2e-3 + 96e-5))]  # graph: none on this clock; 16 cold products
    assert len(cb.history) == 3 and cb.skipped == 0


def test_failed_probe_warns_and_training_goes_on():
    calls = {"n": 0}

    def flaky_loss(model, batch):
        calls["n"] += 1
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if calls["n"] > 1 else loss

    cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, loss_fn=flaky_loss, trace=False)
    with pytest.warns(UserWarning, match="training continues"):
        _, trainer = fit([cb], max_epochs=2)
    assert trainer.current_epoch == 2 and cb.history == []


@pytest.mark.parametrize(
    "kwargs, match",
    [({"top_k": 0}, "top_k"), ({"every_n_steps": -1}, "every_n_steps"), ({"mode": "test"}, "mode"),
     ({"trace_rel_tol": 2.0}, "trace_rel_tol"), ({"trace_method": "exact"}, "trace_method"),
     ({"max_overhead": 0}, "max_overhead"), ({"krylov_steps": 0}, "krylov_steps"), ({"eig_tol": 0.0}, "eig_tol"),
     ({"eig_tol": "1e-3"}, "eig_tol"), ({"trace_rel_tol": float("nan")}, "trace_rel_tol"),
     ({"probe_data": []}, "probe_data holds no batches")],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianSpectrumCallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"probe_size": 500}, "probe_size=500 exceeds"), ({"params": ["no_such_layer*"]}, "no_such_layer"),
     ({"probe_size": 32, "loss_fn": lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")}, "scalar"),
     ({"probe_size": 32, "top_k": 500}, "top_k=500 exceeds"), ({"params": [], "probe_size": 32}, "params is empty"),
     ({"probe_size": 32, "per_layer": True, "params": ["*.weight"]}, "per_layer=True.*select whole layers")],
)
def test_misconfiguration_fails_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit([HessianSpectrumCallback(**kwargs)], max_epochs=1)


def test_a_warm_start_of_another_size_is_ignored():
    cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False)
    cb.load_state_dict({"history": [], "warm_start": torch.ones(1, 3)})  # e.g. from another model's checkpoint
    module, _ = fit([cb], max_epochs=1)
    dim = sum(p.numel() for p in module.parameters())
    assert len(cb.history) == 1 and cb.state_dict()["warm_start"].shape == (1, dim)


def test_every_n_steps_probes_once_per_optimizer_step_under_accumulation():
    cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, every_n_steps=2)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accumulate_grad_batches=2)
    trainer.fit(TinyModule(), DataLoader(tiny_dataset(), batch_size=8))  # 12 micro-batches: 6 optimizer steps
    assert [h["step"] for h in cb.history] == [2, 4, 6]


class TwoOptimizerModule(TinyModule):
    """Manual optimization with two optimizers: ``global_step`` moves by 2 per batch."""

    def __init__(self):
        super().__init__(batch_norm=False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.SGD(self.net[4].parameters(), lr=0.05)]


def test_every_n_steps_probes_when_the_step_jumps_past_a_multiple():
    cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, every_n_steps=3, plot=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(TwoOptimizerModule(), DataLoader(tiny_dataset(), batch_size=8))  # 12 batches: steps 2, 4, ..., 24
    assert [h["step"] for h in cb.history] == [4, 6, 10, 12, 16, 18, 22, 24]  # the first step past each multiple


class ScaledInputModule(TinyModule):
    """Doubles the inputs in ``on_before_batch_transfer``: the probe must see what training_step sees."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return 2 * x, y


def test_probe_batches_get_the_precision_conversion_and_batch_hooks():
    pl.seed_everything(0)
    module = ScaledInputModule(batch_norm=False)
    cb = HessianSpectrumCallback(max_overhead=None, top_k=1, trace=False, probe_size=N_TRAIN, eig_tol=1e-8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, precision="64-true")
    trainer.fit(module, DataLoader(tiny_dataset(), batch_size=16))  # float32 data into a float64 model
    x, y = tiny_dataset()[:]
    params = {k: v.detach() for k, v in module.named_parameters()}
    names = list(params)
    module.eval()

    def loss(*flat):
        return F.cross_entropy(torch.func.functional_call(module, dict(zip(names, flat)), (2 * x.double(),)), y)

    blocks = torch.func.hessian(loss, argnums=tuple(range(len(names))))(*params.values())
    sizes = [p.numel() for p in params.values()]
    dense = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                       for i in range(len(names))], 0)
    assert cb.history[0]["eigenvalues"][0] == pytest.approx(torch.linalg.eigvalsh(dense)[-1].item(), rel=1e-8)


def test_default_probe_is_the_whole_training_set_when_smaller():
    cb = HessianSpectrumCallback(max_overhead=None, top_k=1, trace=False, eig_tol=1e-8)  # probe_size: 1024 > 96
    module, _ = fit([cb], max_epochs=1)
    exact = torch.linalg.eigvalsh(dense_eval_hessian(module, list(range(N_TRAIN))))[-1].item()
    assert cb.history[0]["eigenvalues"][0] == pytest.approx(exact, rel=1e-5)


def test_compute_on_its_own_with_probe_data():
    pl.seed_everything(0)
    module = TinyModule()
    x, y = tiny_dataset()[:32]
    cb = HessianSpectrumCallback(top_k=1, trace=False, eig_tol=1e-8, probe_data=[(x, y)],
                                 loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    exact = torch.linalg.eigvalsh(dense_eval_hessian(module, list(range(32))))[-1].item()
    assert cb.compute(module)["eigenvalues"][0] == pytest.approx(exact, rel=1e-5)
    with pytest.raises(ValueError, match="probe_data="):
        HessianSpectrumCallback().compute(module)


def test_every_n_steps_resume_does_not_probe_the_restored_step_again(tmp_path):
    def run(epochs, ckpt_path=None):
        cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, every_n_steps=2)
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb, pl.callbacks.ModelCheckpoint(dirpath=tmp_path,
                             save_last=True)], logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accumulate_grad_batches=2)
        trainer.fit(TinyModule(), DataLoader(tiny_dataset(), batch_size=8), ckpt_path=ckpt_path)
        return [h["step"] for h in cb.history]

    assert run(1) == [2, 4, 6]
    assert run(2, ckpt_path=str(tmp_path / "last.ckpt")) == [2, 4, 6, 8, 10, 12]


class InputOnlyModule(TinyModule):
    """Batches are bare input tensors (an autoencoder-style loss): ``[x1, x2]`` must read as two batches."""

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def hessian_loss(self, x):
        return self(x).square().mean()


def test_bare_tensor_batches_are_probed_and_match_the_dense_hessian():
    x = tiny_dataset().tensors[0]
    cb = HessianSpectrumCallback(max_overhead=None, probe_size=40, probe_batch_size=16, trace=False, plot=False)
    pl.seed_everything(0)
    module = InputOnlyModule(batch_norm=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(x, batch_size=16))
    assert len(cb.history) == 1 and len(cb._probe.batches) == 3  # 16 + 16 + 8 samples
    probe = torch.cat(list(cb._probe.batches))
    params = dict(module.named_parameters())
    names = list(params)

    def loss(flat):
        parts, at = {}, 0
        for n in names:
            parts[n] = flat[at : at + params[n].numel()].view_as(params[n])
            at += params[n].numel()
        return torch.func.functional_call(module.eval(), parts, (probe.double(),)).square().mean()

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()]).double()
    module.double()
    dense = torch.func.hessian(loss)(flat)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert abs(cb.history[0]["eigenvalues"][0] - top) <= 1e-3 * abs(top)


def test_bare_tensor_batches_are_timed_and_probed_under_the_budget(recwarn):
    """The budget's timed product reads a bare-tensor batch as one batch (it used to take it for an ``[x, y]`` pair,
    fail, and skip every probe with a warning)."""
    cb = HessianSpectrumCallback(max_overhead=100.0, trace=False)  # a budget that pays for every probe
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(InputOnlyModule(batch_norm=False), DataLoader(tiny_dataset().tensors[0], batch_size=16))
    assert not [w for w in recwarn if "failed" in str(w.message)]
    assert len(cb.history) == 2 and cb._probe.timing["samples"] == 32


def test_every_n_steps_writes_each_probe_to_the_logger_at_its_step(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, every_n_steps=3, plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], logger=CSVLogger(tmp_path), log_every_n_steps=50,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(TinyModule(), DataLoader(tiny_dataset(), batch_size=16))  # 6 steps per epoch
    rows = [line.split(",") for line in Path(trainer.logger.log_dir, "metrics.csv").read_text().splitlines()]
    col, step = rows[0].index("hessian/eig_1"), rows[0].index("step")
    logged = [(int(r[step]), float(r[col])) for r in rows[1:] if r[col]]
    assert logged == [(h["step"], h["eigenvalues"][0]) for h in cb.history]
    assert [h["step"] for h in cb.history] == [3, 6, 9, 12, 15, 18]


def test_two_callbacks_on_different_parameters_keep_their_own_state(tmp_path):
    whole = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, plot=False)
    head = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, plot=False, params=["net.4"])
    assert whole.state_key != head.state_key
    fit([whole, head], max_epochs=1)
    assert whole.history[0]["eigenvalues"] != head.history[0]["eigenvalues"]


class LossObject:
    def __call__(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])


def test_state_key_is_the_same_in_every_process_and_tells_configurations_apart():
    # a key holding a memory address (a loss object's or a partial's repr) differs after a restart, and
    # Lightning then drops the checkpointed history
    for loss_fn in (LossObject(), partial(F.cross_entropy), lambda m, b: F.cross_entropy(m(b[0]), b[1])):
        key = HessianSpectrumCallback(loss_fn=loss_fn).state_key
        assert " at 0x" not in key and key == HessianSpectrumCallback(loss_fn=loss_fn).state_key
    keys = {HessianSpectrumCallback(**kwargs).state_key for kwargs in (
        {}, {"trace": False}, {"density": True}, {"trace_method": "hutch++"}, {"eig_tol": 1e-6},
        {"krylov_steps": 8}, {"probe_batch_size": 64})}
    assert len(keys) == 7  # two callbacks that differ only there can run side by side


def test_a_failing_plot_warns_and_keeps_the_history(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_hessian.plots.plot_spectrum_history", broken)
    cb = HessianSpectrumCallback(max_overhead=None, probe_size=32, trace=False, plot=True)
    with pytest.warns(UserWarning, match=r"writing the plots failed \(OSError\('disk full'\)\)"):
        fit([cb], max_epochs=1, default_root_dir=tmp_path)
    assert len(cb.history) == 1


def test_a_resumed_budgeted_run_keeps_its_probe_size_and_its_accounts(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_hessian.callbacks.spectrum.MIN_AUTO_PROBE", 16)  # let the timing choose the size
    monkeypatch.setattr(HessianSpectrumCallback, "_timing_fits", lambda self, trainer: True)  # though no probe fits
    first = HessianSpectrumCallback(plot=False, trace=False, max_overhead=1e-4)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit([first, checkpoint], max_epochs=2, enable_checkpointing=True)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("HessianSpectrumCallback"))
    assert saved["probe_size"] == first._probe.size < N_TRAIN and saved["train_seconds"] > 0
    resumed = HessianSpectrumCallback(plot=False, trace=False, max_overhead=1e-4)
    fit([resumed, pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=3,
        ckpt_path=str(tmp_path / "last.ckpt"), enable_checkpointing=True)
    assert resumed._probe.size == first._probe.size  # not chosen again from a new timing: the same probe set
    assert resumed._budget.train_seconds > saved["train_seconds"] and resumed.skipped >= saved["skipped"]
