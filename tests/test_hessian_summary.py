"""The one spectrum measurement: the callback, analyze and ABS agree on a probe set; warm starts pay."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_hessian.analyze import AnalysisOptions, analyze_model
from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.hessian import HessianOperator
from lightning_hessian.hessian.summary import SpectrumOptions, measure_spectrum
from tests.test_hessian_operator import dense_hessian, loss_fn, teacher_batch
from tests.test_spectrum_callback import TinyModule, make_data


def test_the_callback_analyze_and_abs_give_the_same_numbers_from_the_same_probe_set(tmp_path):
    x, y = make_data()[:64]
    probe = [(x[:40], y[:40]), (x[40:], y[40:])]
    spectrum = HessianSpectrumCallback(top_k=2, eig_tol=1e-6, trace_min_samples=32, trace_max_samples=64,
                                       probe_data=probe, max_overhead=None, plot=False)
    abs_cb = AdaptiveBatchSizeCallback(max_batch_size=64, mode="accumulate", probe_data=probe, eig_tol=1e-6,
                                       plot=False)
    pl.seed_everything(0)
    module = TinyModule(lr=0.0, batch_norm=False)  # the weights stay where all three measure them
    trainer = pl.Trainer(max_epochs=1, callbacks=[spectrum, abs_cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(make_data(), batch_size=16))
    options = AnalysisOptions(top_k=2, tol=1e-6, trace_max_samples=64, density=False, per_layer=False,
                              points_1d=3, points_2d=3)
    report = analyze_model(module, loss_fn, probe, tmp_path, options)
    logged = spectrum.history[0]
    assert logged["eigenvalues"] == report["eigenvalues"]  # identical: the same measurement, options and seeds
    assert (logged["trace"], logged["trace_std_error"]) == (report["trace"]["estimate"], report["trace"]["std_error"])
    assert abs_cb.history[0]["eigenvalue"] == pytest.approx(report["eigenvalues"][0], rel=1e-6)  # top-1 alone
    H = dense_hessian(module.eval(), loss_fn, (x, y))
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    torch.testing.assert_close(torch.tensor(report["eigenvalues"], dtype=exact.dtype), exact, rtol=1e-5, atol=0)


def test_a_warm_start_converges_in_fewer_products_on_a_slowly_changing_model():
    torch.manual_seed(0)
    from lightning_hessian.models import MNIST1DMLP

    model = MNIST1DMLP(hidden=16).double()
    train, probe = teacher_batch(256, seed=1), teacher_batch(128, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options = SpectrumOptions(top_k=1, tol=1e-3, trace=False)
    warm_start, cold_hvps, warm_hvps = None, [], []
    for _ in range(6):
        for _ in range(5):  # a little training between probes
            opt.zero_grad()
            loss_fn(model, train).backward()
            opt.step()
        model.zero_grad(set_to_none=True)
        cold = measure_spectrum(HessianOperator(model, loss_fn, probe), options)
        warm = measure_spectrum(HessianOperator(model, loss_fn, probe), options, warm_start=warm_start)
        if warm_start is not None:
            cold_hvps.append(cold.hvps)
            warm_hvps.append(warm.hvps)
        warm_start = warm.eigen.eigenvectors
        top = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, probe))[-1])
        assert warm.eigenvalues[0] == pytest.approx(top, rel=1e-3)
        assert cold.eigenvalues[0] == pytest.approx(top, rel=1e-3)
    assert sum(warm_hvps) <= 0.6 * sum(cold_hvps) and max(warm_hvps) < min(cold_hvps)


def test_a_probe_on_a_nan_loss_says_so_in_one_line_and_training_goes_on():
    def nan_after_the_check(model, batch):  # the loss is checked once at train start, then turns NaN
        nan_after_the_check.calls += 1
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if nan_after_the_check.calls > 1 else loss

    nan_after_the_check.calls = 0
    cb = HessianSpectrumCallback(probe_size=32, loss_fn=nan_after_the_check, max_overhead=None, plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"^HessianSpectrumCallback: probe at step 6 failed \(the loss is NaN at "
                                         r"this probe\); training continues$"):
        trainer.fit(TinyModule(), DataLoader(make_data(), batch_size=16))
    assert trainer.current_epoch == 2 and cb.history == []


def test_a_trace_stopped_by_its_sample_cap_warns_once():
    cb = HessianSpectrumCallback(probe_size=48, trace_rel_tol=1e-4, trace_min_samples=4, trace_max_samples=8,
                                 max_overhead=None, plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"the trace stopped at trace_max_samples=8 probes short of "
                                         r"trace_rel_tol=0.0001 \(standard error [0-9.]+% of the estimate") as caught:
        trainer.fit(TinyModule(), DataLoader(make_data(), batch_size=16))
    assert sum("trace_max_samples" in str(w.message) for w in caught) == 1
    assert [h["trace_samples"] for h in cb.history] == [8, 8]
    assert all(h["hvps"] >= 20 + 8 and h["seconds"] > 0 for h in cb.history)  # cost logged with each probe
    assert {"hessian/hvps", "hessian/probe_seconds"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("kwargs, match", [({"top_k": 0}, "top_k"), ({"trace_method": "exact"}, "trace_method"),
                                           ({"tol": 0.0}, "tol"), ({"trace_max_samples": 5}, "trace_max_samples"),
                                           ({"seed": -1}, "seed"), ({"confidence": 1.0}, "confidence")])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectrumOptions(**kwargs)
