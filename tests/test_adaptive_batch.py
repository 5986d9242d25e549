import time

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.hessian_probe import HessianProbe
from tests.helpers.schedules import Data, Module, N, script_probe, scripted_record

EIGS = [10, 8, 4.9, 4, 2.4, 2.5, 2.3, 2.2, 2.0, 1.0]


@pytest.fixture
def scripted_eigenvalues(monkeypatch):
    script_probe(monkeypatch, EIGS.__getitem__)


def fit(callback, epochs=9, batch_size=8, milestones=None, ckpt_path=None, extra=(), root=None, scheduler=None,
        **trainer_kwargs):
    pl.seed_everything(0)
    module, data = Module(milestones, scheduler), Data(batch_size)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback, *extra], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(extra), default_root_dir=root,
                         **trainer_kwargs)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("mode", ["dataloader", "accumulate"])
def test_abs_schedule_matches_hand_computed_sequence(mode, scripted_eigenvalues, tmp_path):
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, duration=3, mode=mode, probe_size=16, plot=True)
    module, trainer = fit(cb, root=tmp_path)
    # ref 10 -> 4.9 halves (grow, ref 4.9) -> 2.4 halves (grow, ref 2.4) -> 3 epochs flat (grow) -> cap 64; each
    # epoch records the batch and LR it trained with (a growth decided at an epoch's end shows from the next)
    assert [h["batch_size"] for h in cb.history] == [8, 8, 8, 16, 16, 32, 32, 32, 64]
    assert [h["lr"] for h in cb.history] == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.2, 0.4, 0.4, 0.4, 0.8])
    assert [h["eigenvalue"] for h in cb.history] == EIGS[:8] + [None]  # no probing once capped
    # optimizer steps: 3 epochs x 16 + 2 x 8 + 3 x 4 + 1 x 2
    assert trainer.global_step == 78
    rows = {}
    for epoch, n, _ in module.seen:
        rows.setdefault(epoch, set()).add(n)
    expected_rows = {8: 8, 16: 16, 32: 32, 64: 64} if mode == "dataloader" else dict.fromkeys((8, 16, 32, 64), 8)
    assert [rows[e] for e in range(9)] == [{expected_rows[h["batch_size"]]} for h in cb.history]
    assert (tmp_path / "hessian" / "batch_schedule.png").exists()


def test_fb_trains_large_batch_with_linear_warmup(scripted_eigenvalues):
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, schedule="fb", fb_warmup_epochs=2)
    module, trainer = fit(cb, epochs=4)
    assert [h["batch_size"] for h in cb.history] == [64] * 4
    assert trainer.global_step == 4 * 2
    lrs = [lr for _, _, lr in module.seen]
    # warmup from the base LR 0.1 to 0.8 over two epochs (4 steps), then flat
    assert lrs == pytest.approx([0.1, 0.1 + 0.7 / 4, 0.1 + 0.7 / 2, 0.1 + 0.7 * 3 / 4, 0.8, 0.8, 0.8, 0.8])


def test_gg_grows_the_batch_where_the_lr_would_decay():
    cb = AdaptiveBatchSizeCallback(max_batch_size=32, schedule="gg")
    module, _ = fit(cb, epochs=6, milestones=[2, 4])
    assert [h["batch_size"] for h in cb.history] == [8, 8, 16, 16, 32, 32]  # each epoch's own batch
    assert [{n for e, n, _ in module.seen if e == epoch} for epoch in range(6)] == [{b} for b in (8, 8, 16, 16, 32, 32)]
    per_epoch_lr = {epoch: lr for epoch, _, lr in module.seen}
    assert [per_epoch_lr[e] for e in range(6)] == pytest.approx([0.1] * 6)


def test_bl_changes_nothing():
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, schedule="bl")
    _, trainer = fit(cb, epochs=2)
    assert trainer.global_step == 2 * 16 and {h["batch_size"] for h in cb.history} == {8}


@pytest.mark.parametrize("mode", ["dataloader", "accumulate"])
def test_resume_mid_schedule_equals_uninterrupted(mode, scripted_eigenvalues, tmp_path):
    def run(epochs, ckpt=None, folder="a"):
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        cb = AdaptiveBatchSizeCallback(max_batch_size=64, duration=3, mode=mode, probe_size=16, plot=False)
        module, trainer = fit(cb, epochs=epochs, ckpt_path=ckpt, extra=[checkpoint])
        return cb, module, trainer

    full_cb, full_module, full_trainer = run(9, folder="full")
    run(5, folder="part")
    state = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert any("AdaptiveBatchSizeCallback" in k for k in state["callbacks"])
    cb, module, trainer = run(9, ckpt=str(tmp_path / "part" / "last.ckpt"), folder="part")
    assert cb.history == full_cb.history
    assert trainer.global_step == full_trainer.global_step
    resumed_rows = [n for e, n, _ in module.seen]
    assert resumed_rows == [n for e, n, _ in full_module.seen if e >= 5]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"max_batch_size": 64, "factor": 1.5}, "factor"), ({"max_batch_size": 0}, "max_batch_size"),
     ({"max_batch_size": 64, "schedule": "xyz"}, "schedule"), ({"max_batch_size": 64, "mode": "x"}, "mode"),
     ({"max_batch_size": 64, "adversarial_fraction": 1.5}, "adversarial_fraction"),
     ({"max_batch_size": 64, "adversarial_fraction": None}, "adversarial_fraction"),
     ({"max_batch_size": 64, "decay_ratio": "2"}, "decay_ratio"),
     ({"max_batch_size": 64, "warmup_epochs": float("nan")}, "warmup_epochs"),
     ({"max_batch_size": 64, "fb_warmup_epochs": float("nan")}, "fb_warmup_epochs"),
     ({"max_batch_size": 64, "warmup_epochs": "1"}, "warmup_epochs")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSizeCallback(**kwargs)


@pytest.mark.parametrize(
    "max_batch_size, match", [(4, "below the starting global batch 8"), (256, "exceeds the 128 training samples")]
)
def test_bad_budgets_fail_before_training(max_batch_size, match, scripted_eigenvalues):
    with pytest.raises(ValueError, match=match):
        fit(AdaptiveBatchSizeCallback(max_batch_size=max_batch_size, probe_size=16), epochs=1)


def test_failed_probes_warn_and_keep_the_batch():
    calls = {"n": 0}

    def nan_after_setup(model, batch):  # the first call is the set-up check; every probe then sees NaN
        calls["n"] += 1
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss * float("nan") if calls["n"] > 1 else loss

    cb = AdaptiveBatchSizeCallback(max_batch_size=64, duration=2, probe_size=16, loss_fn=nan_after_setup, plot=False)
    with pytest.warns(UserWarning, match="batch size unchanged"):
        _, trainer = fit(cb, epochs=4)
    assert trainer.current_epoch == 4
    assert [h["batch_size"] for h in cb.history] == [8] * 4 and cb.schedule.reference is None


class HparamsData(Data):
    """A datamodule whose loader reads ``self.hparams.batch_size`` (its saved hyperparameters)."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size)
        del self.batch_size
        self.save_hyperparameters()

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


class HparamsModule(Module):
    def __init__(self, batch_size: int):
        super().__init__()
        self.save_hyperparameters()  # a batch_size the loaders never read


def test_dataloader_mode_grows_the_datamodule_hparams_the_loader_reads(scripted_eigenvalues):
    pl.seed_everything(0)
    module = HparamsModule(batch_size=8)
    trainer = pl.Trainer(max_epochs=4, callbacks=[AdaptiveBatchSizeCallback(max_batch_size=64, plot=False)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    data = HparamsData(8)
    trainer.fit(module, datamodule=data)
    rows = {epoch: max(r for e, r, _ in module.seen if e == epoch) for epoch in range(4)}
    assert rows == {0: 8, 1: 8, 2: 8, 3: 16}  # EIGS 10, 8, 4.9: 4.9 <= 10 / 2 grows after epoch 2
    assert module.hparams.batch_size == 8
    assert data.hparams.batch_size == 8  # restored after fit: fitting (or resuming) it again starts from 8


class FixedLoaderModule(HparamsModule):
    def train_dataloader(self):  # ignores hparams.batch_size
        return DataLoader(Data(8).data, batch_size=8)


def test_dataloader_mode_fails_when_the_loader_does_not_read_the_batch_size(scripted_eigenvalues):
    def trainer():
        return pl.Trainer(max_epochs=2, callbacks=[AdaptiveBatchSizeCallback(max_batch_size=64, plot=False)],
                          logger=False, enable_progress_bar=False, enable_checkpointing=False)

    module = FixedLoaderModule(batch_size=16)  # the module's batch_size, but its loader is fixed at 8
    with pytest.raises(ValueError, match=r"grows FixedLoaderModule.hparams.batch_size, but FixedLoaderModule.train_"
                                         r"dataloader\(\) does not follow it \(with .*=32 it built a loader of "
                                         r"batch_size=8.*mode='accumulate'"):
        trainer().fit(module)  # at the start (a dry reload), not at the first growth
    # a DataLoader given to fit() cannot be rebuilt: refused at once, not at the first growth (it matched at 8)
    with pytest.raises(ValueError, match=r"a DataLoader passed to fit\(\) cannot do.*mode='accumulate'"):
        trainer().fit(HparamsModule(batch_size=8), DataLoader(Data(8).data, batch_size=8))


def _epoch_lrs(module):
    """The LR of each epoch's first step."""
    lrs = {}
    for epoch, _, lr in module.seen:
        lrs.setdefault(epoch, lr)
    return [lrs[e] for e in sorted(lrs)]


@pytest.mark.parametrize("mode", ["dataloader", "accumulate"])
def test_resume_from_a_mid_epoch_checkpoint(mode, scripted_eigenvalues, tmp_path):
    def run(ckpt=None):
        cb = AdaptiveBatchSizeCallback(max_batch_size=64, duration=3, mode=mode, probe_size=16, plot=False)
        # step 52: epoch 3, the first at batch 16 (16 + 16 + 16 steps at batch 8, then 8 per epoch), 4 steps in
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=52,
                                                  save_top_k=-1)
        _, trainer = fit(cb, ckpt_path=ckpt, extra=[checkpoint])
        return cb, trainer

    full_cb, full_trainer = run()
    cb, trainer = run(ckpt=str(tmp_path / "step=52.ckpt"))
    assert cb.history == full_cb.history
    assert trainer.global_step == full_trainer.global_step


def test_fb_warmup_keeps_the_scheduler_decays():
    """The warmup scales only the LR the optimizer steps with: the scheduler's own decays go on underneath."""
    def step_lr(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    plain, _ = fit(AdaptiveBatchSizeCallback(max_batch_size=64, schedule="fb", fb_warmup_epochs=0), epochs=4,
                   scheduler=step_lr)
    warmed, _ = fit(AdaptiveBatchSizeCallback(max_batch_size=64, schedule="fb", fb_warmup_epochs=2), epochs=4,
                    scheduler=step_lr)
    assert _epoch_lrs(plain) == pytest.approx([0.8, 0.4, 0.2, 0.1])
    assert _epoch_lrs(warmed) == pytest.approx([0.1, 0.4 * (1 / 8 + 7 / 8 / 2), 0.2, 0.1])


SCHEDULERS = {  # each keeps its own copy of the LR's scale: base_lrs of nested schedulers, group max_lr, ...
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e),
    "sequential": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2),
              torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)], milestones=[4]),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=7, pct_start=0.5,
                                                                cycle_momentum=False),
    "cyclic": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2,
                                                            cycle_momentum=False),
    "cosine_floor": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=0.05),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_growth_scales_the_lr_under_any_scheduler(name, monkeypatch):
    """After a growth by 2 at the end of epoch 1 (duration 2: two epochs at the base batch) every later epoch's LR
    is twice the run without ABS."""
    script_probe(monkeypatch, lambda epoch: 10.0)
    plain, _ = fit(AdaptiveBatchSizeCallback(max_batch_size=8, schedule="bl"), epochs=6, scheduler=SCHEDULERS[name])
    grown, _ = fit(AdaptiveBatchSizeCallback(max_batch_size=16, duration=2, probe_size=16, plot=False), epochs=6,
                   scheduler=SCHEDULERS[name])
    ratio = [b / a for a, b in zip(_epoch_lrs(plain), _epoch_lrs(grown))]
    assert ratio == pytest.approx([1, 1, 2, 2, 2, 2])


def test_gg_follows_plateau_and_closed_form_schedulers():
    class Plateau(Module):
        def training_step(self, batch, batch_idx):
            self.log("flat", 1.0, on_step=False, on_epoch=True)  # never improves: the LR halves every epoch
            return super().training_step(batch, batch_idx)

    def plateau(opt):
        return {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
                "monitor": "flat"}

    pl.seed_everything(0)
    module = Plateau(scheduler=plateau)
    cb = AdaptiveBatchSizeCallback(max_batch_size=32, schedule="gg", mode="accumulate", plot=False)
    pl.Trainer(max_epochs=5, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False).fit(module, datamodule=Data(8))
    # Lightning steps the plateau scheduler after the epoch's callbacks: its decay is undone before the next
    # epoch's first step, and the batch grows in its place until the cap (then the LR decays as scheduled)
    assert [h["batch_size"] for h in cb.history] == [8, 8, 16, 32, 32]
    assert _epoch_lrs(module) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05])

    lam, _ = fit(AdaptiveBatchSizeCallback(max_batch_size=64, schedule="gg"), epochs=5,
                 scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 if e >= 2 else 1.0))
    assert _epoch_lrs(lam) == pytest.approx([0.1] * 5)
    assert sorted({n for _, n, _ in lam.seen}) == [8, 16]  # grown once, where the lambda halves the LR


def test_gg_grows_by_powers_of_factor():
    cb = AdaptiveBatchSizeCallback(max_batch_size=128, schedule="gg")
    module, _ = fit(cb, epochs=4, scheduler=lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [1], gamma=0.1))
    assert [h["batch_size"] for h in cb.history] == [8, 64, 64, 64]  # a 10x decay: 2^3 = 8x the batch, from epoch 1
    assert sorted({(e, n) for e, n, _ in module.seen}) == [(0, 8), (1, 64), (2, 64), (3, 64)]
    assert _epoch_lrs(module) == pytest.approx([0.1, 0.08, 0.08, 0.08])  # the LR keeps the remaining 10 / 8


def test_absa_second_half_by_steps(monkeypatch):
    """ABSA drops the adversarial share in the second half of training, counted in steps under max_steps."""
    script_probe(monkeypatch, lambda epoch: 10.0)  # no growth
    fractions = []
    for limit in ({"epochs": 10}, {"epochs": None, "max_steps": 160}):  # 16 steps per epoch: the same 10 epochs
        cb = AdaptiveBatchSizeCallback(max_batch_size=16, duration=100, adversarial=True, probe_size=16, plot=False)
        fit(cb, **limit)
        fractions.append([h["adversarial_fraction"] for h in cb.history])
    assert fractions == [[0.2] * 5 + [0.0] * 5] * 2  # the share each epoch trained with: half done after epoch 4


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(N):
            x = torch.randn(5, generator=g)
            yield x, int(x.sum() > 0)


@pytest.mark.parametrize("schedule", ["bl", "abs"])
def test_iterable_datasets(schedule):
    module = Module()
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, schedule=schedule, mode="accumulate", plot=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    if schedule == "bl":
        trainer.fit(module, DataLoader(Stream(), batch_size=8))
        assert trainer.global_step == N // 8
    else:
        with pytest.raises(TypeError, match="iterable-style dataset.*probe_data"):
            trainer.fit(module, DataLoader(Stream(), batch_size=8))


def test_optimizer_hooks_removed_when_fit_raises(scripted_eigenvalues):
    class Failing(Module):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):  # an optimizer the module keeps: it outlives the failed fit
            self.opt = getattr(self, "opt", None) or torch.optim.SGD(self.parameters(), lr=0.1)
            return self.opt

    module = Failing()
    trainer = pl.Trainer(max_epochs=2, callbacks=[AdaptiveBatchSizeCallback(max_batch_size=64, probe_size=16)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, datamodule=Data(8))
    assert not module.opt._optimizer_step_pre_hooks and not module.opt._optimizer_step_post_hooks


def test_a_step_that_raises_during_warmup_leaves_the_scheduled_lr():
    # the warmup scales the LR in the step's pre-hook; the post-hook that puts it back never runs when the
    # training step (inside the closure) raises, and a checkpoint taken then would keep the scaled LR
    class Failing(Module):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module, data = Failing(), Data(8)
    trainer = pl.Trainer(max_epochs=2, callbacks=[AdaptiveBatchSizeCallback(max_batch_size=64, schedule="fb")],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, datamodule=data)
    assert module.seen[-1][2] < 0.8  # the steps ran warmed up
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.8)  # fb: 8x the batch, 8x the LR
    assert data.batch_size == 8  # and the datamodule has its own batch size back


def test_resume_from_a_mid_epoch_checkpoint_under_a_per_step_scheduler(tmp_path):
    # gg measures the scheduler's decay from the LR at its last decision, the history records each epoch's
    # first LR: both must come from the checkpoint, not from the LR at the resumed step
    def step_decay(opt):  # x0.5 over each 16-step epoch at batch 8
        return {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5 ** (1 / 16)), "interval": "step"}

    def run(schedule, ckpt=None):
        cb = AdaptiveBatchSizeCallback(max_batch_size=64, schedule=schedule, plot=False)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / schedule, filename="{step}",
                                                  every_n_train_steps=6, save_top_k=-1)
        fit(cb, epochs=3, scheduler=step_decay, ckpt_path=ckpt, extra=[checkpoint])
        return cb.history

    for schedule in ("gg", "bl"):
        full = run(schedule)
        assert run(schedule, ckpt=str(tmp_path / schedule / "step=6.ckpt")) == full


def test_a_run_whose_batch_never_grows_trains_exactly_as_a_plain_run():
    """The callback reloads the train loader only when the batch changes (a reload every epoch reshuffled it) and
    gives the Trainer back its own reload setting after fit."""
    plain, _ = fit(pl.Callback(), epochs=2)
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, decay_ratio=1e9, duration=100, probe_size=16, plot=False)
    probed, trainer = fit(cb, epochs=2)
    assert [h["batch_size"] for h in cb.history] == [8] * 2 and all(h["eigenvalue"] > 0 for h in cb.history)
    # decay_ratio 1e9: the growth threshold is ~0, so the second probe stops at its first product, a lower bound
    assert [(h["eigenvalue_lower_bound"], h["probe_hvps"]) for h in cb.history] == [(False, 4), (True, 1)]
    assert trainer.callback_metrics["abs/eigenvalue_lower_bound"].item() == 1.0
    for p, q in zip(plain.parameters(), probed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert trainer.reload_dataloaders_every_n_epochs == 0


def test_duration_counts_the_epochs_at_a_batch_size_from_the_first(monkeypatch):
    """As in the authors' code, ``duration`` epochs at one batch size (the reference epoch included) force a
    growth: duration 2 grows after epochs 1 and 3 (it waited an extra epoch at the base batch)."""
    script_probe(monkeypatch, lambda epoch: 10.0)
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, duration=2, probe_size=16, plot=False)
    fit(cb, epochs=5)
    assert [h["batch_size"] for h in cb.history] == [8, 8, 16, 16, 32]


def test_the_run_is_timed_by_part(monkeypatch):
    """Probes and loader rebuilds after a growth (not the first build) are timed; the rest is computation."""
    def probe(self, module, **_):
        time.sleep(0.1)
        return scripted_record(EIGS[module.current_epoch])

    class SlowRebuild(Data):
        def train_dataloader(self):
            if self.batch_size != 8:
                time.sleep(0.3)
            return super().train_dataloader()

    def setup_probe(self, trainer, module):
        time.sleep(0.2)
        return find_probe(self, trainer, module)

    find_probe = HessianProbe.on_train_start
    monkeypatch.setattr(HessianProbe, "measure", probe)
    monkeypatch.setattr(HessianProbe, "on_train_start", setup_probe)
    pl.seed_everything(0)
    cb = AdaptiveBatchSizeCallback(max_batch_size=32, duration=3, probe_size=16, plot=False)
    trainer = pl.Trainer(max_epochs=6, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(Module(), datamodule=SlowRebuild(8))
    wall = time.perf_counter() - start
    t = cb.timings
    assert [h["batch_size"] for h in cb.history] == [8, 8, 8, 16, 16, 32]
    assert 0.7 <= t["hessian_seconds"] < 0.8  # setting up the probe set, probes after epochs 0-4 (capped after 4)
    assert 0.6 <= t["resize_seconds"] < 0.9  # the rebuilds at epochs 3 and 5, not the dry reload or first build
    assert t["communication_seconds"] == 0.0
    assert t["compute_seconds"] == pytest.approx(t["train_seconds"] - t["hessian_seconds"] - t["resize_seconds"])
    assert 0 < t["compute_seconds"] and t["train_seconds"] < wall
    logged = {k: trainer.callback_metrics[f"abs/{k}"].item() for k in t}  # at the last epoch's end
    assert logged["hessian_seconds"] == pytest.approx(t["hessian_seconds"])
    assert logged["resize_seconds"] == pytest.approx(t["resize_seconds"])
    assert logged["train_seconds"] <= t["train_seconds"]
    assert "setup_data" not in vars(trainer.fit_loop)  # the loop's own method again


def test_timings_survive_a_checkpoint():
    cb = AdaptiveBatchSizeCallback(max_batch_size=64)
    cb.timings["hessian_seconds"], cb.timings["train_seconds"] = 1.5, 10.0
    state = cb.state_dict()
    resumed = AdaptiveBatchSizeCallback(max_batch_size=64)
    resumed.load_state_dict(state)
    assert resumed.timings == cb.timings
    older = {k: v for k, v in state.items() if k != "timings"} | {"probe_seconds": 2.0}  # before the breakdown
    resumed.load_state_dict(older)
    assert resumed.timings["hessian_seconds"] == 2.0 and resumed.timings["train_seconds"] == 0.0
