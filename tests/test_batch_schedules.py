"""The batch-size schedules: each one's history on a tiny fit, pinned to the values the callback gave before the
schedules became policy objects (batch sizes and LRs exactly, eigenvalues to 1e-6 where every probe converges);
then each policy alone, as a table of inputs against the growth it decides."""

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from lightning_hessian.batch_schedules import Adaptive, Baseline, FixedLargeBatch, GradualGrowth, batch_schedule
from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from tests.helpers.schedules import Data, Module


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _multistep_lr(opt):
    return torch.optim.lr_scheduler.MultiStepLR(opt, [1, 3], gamma=0.3)


WARM = [0.053125000000000006, 0.059375000000000004, 0.065625, 0.07187500000000001, 0.078125, 0.084375,
        0.09062500000000001, 0.096875]
RECORDED = {  # name: (callback arguments, scheduler, epochs, history (batch, lr, eigenvalue, adversarial share),
    #               the training steps as (epoch, rows, lr), consecutive repeats dropped)
    "abs": ({"max_batch_size": 64, "duration": 3, "decay_ratio": 1.2, "probe_size": 16}, None, 6,
            [(8, 0.1, 0.5871435347238885, 0.0), (8, 0.1, 0.5289909069210554, 0.0), (8, 0.1, 0.4936556121011968, 0.0),
             (16, 0.2, 0.4671433621910105, 0.0), (32, 0.4, 0.44314461946487427, 0.0),
             (32, 0.4, 0.4068371057510376, 0.0)],
            [(0, 8, 0.1), (1, 8, 0.1), (2, 8, 0.1), (3, 16, 0.2), (4, 32, 0.4), (5, 32, 0.4)]),
    "abs_warmup_accumulate": (
        {"max_batch_size": 64, "duration": 2, "decay_ratio": 1.2, "probe_size": 16, "warmup_epochs": 1.0,
         "mode": "accumulate"}, _step_lr, 6,
        [(8, 0.1, 0.5871435347238885, 0.0), (8, 0.1, 0.5289909069210554, 0.0), (16, 0.1, 0.5124037861824036, 0.0),
         (16, 0.1, 0.49372191231658213, 0.0), (32, 0.1, 0.49029240012168884, 0.0),
         (32, 0.1, 0.48249107599258423, 0.0)],
        [(0, 8, 0.1), (1, 8, 0.1), (2, 8, 0.1)] + [s for lr in WARM for s in ((2, 8, lr), (2, 8, 0.1))][:-1]
        + [(3, 8, 0.1), (4, 8, 0.1)] + [s for lr in WARM[1::2] for s in ((4, 8, lr), (4, 8, 0.1))][:-1]
        + [(5, 8, 0.1)]),
    "absa": ({"max_batch_size": 32, "duration": 2, "adversarial": True, "adversarial_fraction": 0.5,
              "probe_size": 16}, None, 8,
             [(8, 0.1, 0.6169025450218864, 0.5), (8, 0.1, 0.5653549347839694, 0.5),
              (16, 0.2, 0.5032960176467896, 0.25), (16, 0.2, 0.47887759182205536, 0.25)] + [(32, 0.4, None, 0.0)] * 4,
             [(0, 8, 0.1), (1, 8, 0.1), (2, 16, 0.2), (3, 16, 0.2), (4, 32, 0.4), (5, 32, 0.4), (6, 32, 0.4),
              (7, 32, 0.4)]),
    "fb": ({"max_batch_size": 48, "schedule": "fb", "fb_warmup_epochs": 1.5}, _step_lr, 6,
           [(48, 0.6000000000000001, None, 0.0)] * 2 + [(48, 0.30000000000000004, None, 0.0)] * 2
           + [(48, 0.15000000000000002, None, 0.0)] * 2,
           [(0, 48, 0.1), (0, 48, 0.21111111111111114), (0, 32, 0.3222222222222223), (1, 48, 0.4333333333333334),
            (1, 48, 0.5444444444444445), (1, 32, 0.6000000000000001), (2, 48, 0.30000000000000004),
            (2, 32, 0.30000000000000004), (3, 48, 0.30000000000000004), (3, 32, 0.30000000000000004),
            (4, 48, 0.15000000000000002), (4, 32, 0.15000000000000002), (5, 48, 0.15000000000000002),
            (5, 32, 0.15000000000000002)]),
    "gg": ({"max_batch_size": 64, "schedule": "gg"}, _multistep_lr, 6,
           [(8, 0.1, None, 0.0)] + [(32, 0.12, None, 0.0)] * 2 + [(64, 0.072, None, 0.0)] * 3,
           [(0, 8, 0.1), (1, 32, 0.12), (2, 32, 0.12), (3, 64, 0.072), (4, 64, 0.072), (5, 64, 0.072)]),
    "bl": ({"max_batch_size": 64, "schedule": "bl"}, None, 2, [(8, 0.1, None, 0.0)] * 2, [(0, 8, 0.1), (1, 8, 0.1)]),
}


PROBING = [name for name in RECORDED if name.startswith("abs")]


@pytest.mark.parametrize(("name", "early_stop"), [(n, True) for n in RECORDED] + [(n, False) for n in PROBING])
def test_each_schedule_trains_as_recorded(name, early_stop, monkeypatch):
    """Every schedule's batch sizes, LRs (warmups included), probed eigenvalues and ABSA shares on a real fit.

    The recorded eigenvalues are converged ones (to ``eig_tol``, 5%): with ``early_stop=False`` every probe
    converges and gives them to 1e-6. By default a probe stops once the eigenvalue is known to exceed the growth
    threshold: the decisions are the recorded ones all the same, and such a value is a lower bound (below the
    recorded one but for the 5% the recorded value itself may lie under the true one)."""
    if not early_stop:
        monkeypatch.setattr(Adaptive, "decided_above", lambda self: None)
    kwargs, scheduler, epochs, history, steps = RECORDED[name]
    pl.seed_everything(0)
    module, callback = Module(scheduler=scheduler), AdaptiveBatchSizeCallback(plot=False, **kwargs)
    pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(module, datamodule=Data(8))
    got = [(h["batch_size"], h["lr"], h["eigenvalue"], h["adversarial_fraction"]) for h in callback.history]
    assert [(b, lr, f) for b, lr, _, f in got] == [(b, lr, f) for b, lr, _, f in history]
    bounds = [h["eigenvalue_lower_bound"] for h in callback.history]
    assert any(bounds) == (early_stop and name in PROBING)  # the early stop happens, and only where asked for
    for (_, _, e, _), (_, _, recorded, _), bound in zip(got, history, bounds):
        if recorded is None or not early_stop:
            assert e == (None if recorded is None else pytest.approx(recorded, rel=1e-6))
        elif bound:
            assert e <= recorded * 1.05
        else:  # converged, from another warm start than the recorded run's
            assert e == pytest.approx(recorded, rel=0.05)
    trained = []
    for step in module.seen:
        if not trained or trained[-1] != step:
            trained.append(step)
    assert trained == steps


def test_a_schedule_object_trains_as_its_name():
    pl.seed_everything(0)
    module = Module()
    callback = AdaptiveBatchSizeCallback(64, schedule=Adaptive(decay_ratio=1.2, duration=3), probe_size=16, plot=False)
    pl.Trainer(max_epochs=6, callbacks=[callback], logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(module, datamodule=Data(8))
    assert [(h["batch_size"], h["lr"]) for h in callback.history] == [(b, lr) for b, lr, _, _ in RECORDED["abs"][3]]


# ---- the policies alone: a table of inputs against the growth decided (no Trainer) ------------------------------

ABS_TABLE = [  # eigenvalue, growth, reference after, epochs at this batch after (duration 3, decay ratio 2)
    (10.0, 1, 10.0, 1),  # the first probe sets the reference
    (8.0, 1, 10.0, 2),
    (None, 1, 10.0, 2),  # a failed probe: keep, and the epoch does not count
    (4.9, 2, 4.9, 0),  # 4.9 <= 10 / 2: grow, new reference
    (4.0, 1, 4.9, 1),
    (3.0, 1, 4.9, 2),
    (2.6, 2, 4.9, 0),  # the third epoch at this batch: grow anyway, the reference stays
    (2.45, 2, 2.45, 0),  # 2.45 <= 4.9 / 2
]


def test_adaptive_decides_by_the_eigenvalue_and_the_duration():
    schedule = Adaptive(factor=2, decay_ratio=2.0, duration=3)
    for eigenvalue, growth, reference, epochs in ABS_TABLE:
        decided = schedule.decide(eigenvalue=eigenvalue)
        if decided > 1:
            schedule.grew()  # as the callback does when the batch grew
        assert (decided, schedule.reference, schedule.epochs_since_growth) == (growth, reference, epochs), eigenvalue
    resumed = Adaptive(factor=2, decay_ratio=2.0, duration=3)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.state_dict() == {"reference": 2.45, "epochs_since_growth": 0}


@pytest.mark.parametrize("factor, lr_decay, growth", [
    (2, 1.0, 1), (2, 0.5, 1), (2, 1.3, 1), (2, 1.5, 2), (2, 2.0, 2), (2, 3.0, 4), (2, 10.0, 8), (3, 10.0, 9),
    (4, 10.0, 16),
])
def test_gradual_growth_grows_by_the_power_of_factor_nearest_the_decay(factor, lr_decay, growth):
    assert GradualGrowth(factor).decide(eigenvalue=0.5, lr_decay=lr_decay) == growth


@pytest.mark.parametrize("base, cap, growth, largest", [(64, 1600, 25, 1600), (8, 64, 8, 64), (8, 60, 7, 56),
                                                        (64, 64, 1, 64)])
def test_fixed_large_batch_starts_at_the_largest_multiple_within_the_cap(base, cap, growth, largest):
    schedule = FixedLargeBatch(warmup_epochs=2.5)
    assert (schedule.start(base, cap), schedule.largest(base, cap)) == (growth, largest)
    assert schedule.start_warmup_epochs == 2.5 and schedule.decide(eigenvalue=0.1, lr_decay=10.0) == 1


@pytest.mark.parametrize("cls", [Baseline, GradualGrowth, Adaptive])
def test_other_schedules_reach_powers_of_factor(cls):
    assert [cls(factor=f).largest(8, cap) for f, cap in ((2, 64), (2, 100), (3, 100), (2, 8))] == [64, 64, 72, 8]
    assert cls(factor=2).start(8, 64) == 1 and cls.start_warmup_epochs is None


def test_baseline_never_grows():
    assert not Baseline.grows and Baseline().decide(eigenvalue=0.1, lr_decay=10.0) == 1


@pytest.mark.parametrize("name, cls", [("abs", Adaptive), ("ABS", Adaptive), ("adaptive", Adaptive),
                                       ("fb", FixedLargeBatch), ("fixed_large_batch", FixedLargeBatch),
                                       ("GG", GradualGrowth), ("gradual_growth", GradualGrowth),
                                       ("bl", Baseline), ("baseline", Baseline)])
def test_names_and_the_seed_papers_aliases(name, cls):
    schedule = batch_schedule(name, factor=3, duration=4, fb_warmup_epochs=1.0)
    assert type(schedule) is cls and schedule.factor == 3
    callback = AdaptiveBatchSizeCallback(64, schedule=name)
    assert type(callback.schedule) is cls
    # the checkpoint key keeps the short name: checkpoints written before the long names still load
    assert callback.state_key == f"AdaptiveBatchSizeCallback{{'schedule': '{cls.alias}', 'max_batch_size': 64}}"


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "xyz"}, r"schedule must be one of \('baseline', 'fixed_large_batch', 'gradual_growth', "
                          r"'adaptive'\) \(or \('bl', 'fb', 'gg', 'abs'\)\)"),
    ({"schedule": Adaptive(), "factor": 2}, r"^factor: a schedule object carries its own parameters"),
    ({"schedule": Adaptive(), "duration": 3, "fb_warmup_epochs": 1.0}, r"^duration, fb_warmup_epochs: .*Adaptive\("),
    ({"schedule": "gradual_growth", "adversarial": True}, r"ABSA.*'adaptive'.*not 'gradual_growth'"),
    ({"schedule": "bl", "duration": 0}, "duration"),  # checked whatever the schedule
    ({"schedule": "fb", "factor": 1}, "factor"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSizeCallback(64, **kwargs)


def test_checkpoints_from_before_the_schedule_objects_load():
    old = {"base_batch_size": 8, "batch_size": 16, "reference": 4.9, "epochs_since_growth": 2,
           "adversarial_fraction": 0.0, "warmup": None, "history": []}
    abs_ = AdaptiveBatchSizeCallback(64, schedule="abs")
    abs_.load_state_dict(old)
    assert abs_.schedule.state_dict() == {"reference": 4.9, "epochs_since_growth": 2} and abs_.batch_size == 16
    assert abs_.state_dict()["reference"] == 4.9
    fb = AdaptiveBatchSizeCallback(64, schedule="fb")
    fb.load_state_dict(old)  # an FB checkpoint carried abs's keys too, unused
    assert fb.batch_size == 16 and "reference" not in fb.state_dict() and not hasattr(fb, "reference")


def test_the_schedules_and_seeds_load_no_lightning():
    code = ("import sys, lightning_hessian.batch_schedules, lightning_hessian.seeds\n"
            "print([m for m in ('lightning', 'lightning.pytorch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stderr
