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
from lightning_hessian.hessian import HessianOperator, dense_hessian, top_eigenvalues
from lightning_hessian.hessian.summary import SpectrumOptions, measure_spectrum
from lightning_hessian.no_trace import leave_no_trace
from tests.helpers.modules import TinyModule, clocked_module, tiny_dataset
from tests.helpers.problems import loss_fn, teacher_batch


def test_the_callback_analyze_and_abs_give_the_same_numbers_from_the_same_probe_set(tmp_path):
    x, y = tiny_dataset()[:64]
    probe = [(x[:40], y[:40]), (x[40:], y[40:])]
    spectrum = HessianSpectrumCallback(top_k=2, eig_tol=1e-6, trace_min_samples=32, trace_max_samples=64,
                                       probe_data=probe, max_overhead=None, plot=False)
    abs_cb = AdaptiveBatchSizeCallback(max_batch_size=64, mode="accumulate", probe_data=probe, eig_tol=1e-6,
                                       plot=False)
    pl.seed_everything(0)
    module = TinyModule(lr=0.0, batch_norm=False)  # the weights stay where all three measure them
    trainer = pl.Trainer(max_epochs=1, callbacks=[spectrum, abs_cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(tiny_dataset(), batch_size=16))
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

    model = MNIST1DMLP(hidden=8).double()
    train, probe = teacher_batch(256, seed=1), teacher_batch(128, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    options = SpectrumOptions(top_k=1, tol=1e-3, trace=False)
    warm_start, cold_hvps, warm_hvps = None, [], []
    for _ in range(5):
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


@pytest.mark.parametrize("tol", [5e-2, 1e-2])
def test_a_warm_start_still_on_the_top_eigenvector_converges_at_its_first_product(tol):
    """The warm start's random part is at most half the residual target, so a model that has not moved since the
    last probe costs one product, and its eigenvalue is within the target of the exact one."""
    torch.manual_seed(0)
    from lightning_hessian.models import MNIST1DMLP

    model, probe = MNIST1DMLP(hidden=8).double(), teacher_batch(128, seed=2)
    options = SpectrumOptions(top_k=1, tol=tol, trace=False)
    first = measure_spectrum(HessianOperator(model, loss_fn, probe), options)
    again = measure_spectrum(HessianOperator(model, loss_fn, probe), options, warm_start=first.eigen.eigenvectors)
    top = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, probe))[-1])
    assert first.hvps > 1 and again.hvps == 1
    assert again.eigenvalues[0] == pytest.approx(top, rel=tol)


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
        trainer.fit(TinyModule(), DataLoader(tiny_dataset(), batch_size=16))
    assert trainer.current_epoch == 2 and cb.history == []


def test_a_trace_stopped_by_its_sample_cap_warns_once():
    cb = HessianSpectrumCallback(probe_size=48, trace_rel_tol=1e-4, trace_min_samples=4, trace_max_samples=8,
                                 max_overhead=None, plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"the trace stopped at trace_max_samples=8 probes short of "
                                         r"trace_rel_tol=0.0001 \(standard error [0-9.]+% of the estimate") as caught:
        trainer.fit(TinyModule(), DataLoader(tiny_dataset(), batch_size=16))
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


class Regression(pl.LightningModule):
    """A linear model with three outputs under MSE (float targets): every Hessian eigenvalue appears thrice."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def hessian_loss(self, batch):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("seed", range(3))
def test_the_callback_logs_a_repeated_top_eigenvalue_as_often_as_it_occurs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g) * torch.linspace(0.5, 2.0, 6)
    data = torch.utils.data.TensorDataset(x, torch.randn(64, 3, generator=g))
    cb = HessianSpectrumCallback(top_k=4, trace=False, eig_tol=1e-6, max_overhead=None, seed=seed, plot=False)
    pl.seed_everything(seed)
    module = Regression()
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    H = dense_hessian(module.net, lambda m, b: F.mse_loss(m(b[0]), b[1]), data.tensors)
    exact = torch.linalg.eigvalsh(H.double()).flip(0)[:4]
    torch.testing.assert_close(torch.tensor(cb.history[0]["eigenvalues"], dtype=exact.dtype), exact, rtol=1e-4,
                               atol=0)
    assert exact[0] == pytest.approx(float(exact[2]), rel=1e-5) and exact[3] < 0.999 * exact[0]  # thrice, then less


class TinyTextClassifier(pl.LightningModule):
    """HuggingFace-style: dict batches, ``model(**batch).loss``, no ``forward`` on the LightningModule."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.encoder = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 2)

    def model(self, input_ids, attention_mask, labels):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return type("Output", (), {"loss": F.cross_entropy(self.head(hidden[:, 0]), labels)})

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def hessian_loss(self, batch):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("chunk_bytes, batches, cached", [(1, [8] * 8, (2, 4)), (2**26, [64], (1, 1))])
def test_a_transformer_probe_is_chunked_like_training_and_measures_the_whole_probe_set(chunk_bytes, batches, cached,
                                                                                       monkeypatch):
    """Probe batches are training-sized when a graph is large (here: any graph over 1 byte), else as large as
    the graph allows (this tiny model: the whole 64-sample probe set in one); the probe caches the graphs of
    CACHE_STEPS (4) training batches at most, rebuilding the others at each product, so its memory stays a small
    multiple of a training step's, and its value is the whole probe set's all the same."""
    from lightning_hessian.callbacks import hessian_probe

    monkeypatch.setattr(hessian_probe, "CHUNK_BYTES", chunk_bytes)
    operators = []
    measure = hessian_probe.measure_spectrum

    def spy(op, *args, **kwargs):
        operators.append(op)
        return measure(op, *args, **kwargs)

    monkeypatch.setattr(hessian_probe, "measure_spectrum", spy)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 16, (96, 10), generator=g)
    mask = (torch.arange(10)[None] < torch.randint(5, 11, (96, 1), generator=g)).long()
    samples = [{"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": (ids[i, 1] > 8).long()}
               for i in range(96)]
    cb = HessianSpectrumCallback(probe_size=64, trace=False, eig_tol=1e-8, max_overhead=None, plot=False)
    pl.seed_everything(0)
    module = TinyTextClassifier()
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(samples, batch_size=8))
    assert [len(b["labels"]) for b in cb._probe.batches] == batches
    assert cb._probe.timing["bytes"] > 0
    op = operators[0]  # the bound is sized from the bytes per sample of the timed batch: 3 or 4 of these batches
    assert cached[0] <= len(op._graphs) <= cached[1] and op.cached_bytes <= cb._probe.cache_bytes()
    whole = {key: torch.cat([b[key] for b in cb._probe.batches]) for key in samples[0]}
    with leave_no_trace(module):
        op = HessianOperator(module, lambda m, b: m.hessian_loss(b), whole)
        exact = float(top_eigenvalues(op, k=1, tol=1e-10).eigenvalues[0])
    assert cb.history[0]["eigenvalues"][0] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("product_cost, size", [(4e-4, 128), (1e-4, 256)])
def test_abs_sizes_its_probe_set_from_the_first_epochs_time(product_cost, size, monkeypatch):
    """A training step takes 0.1 s (128 steps: 12.8 s), a product ``product_cost`` s per sample: the largest
    power of two whose warm probe (6 products) costs 2% of the epoch (from 128 to 1,024 samples)."""
    Clocked = clocked_module(monkeypatch, lambda: product_cost)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, mode="accumulate", plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Clocked(batch_norm=False), DataLoader(data, batch_size=16))
    assert cb._probe.size == size and cb.history[0]["eigenvalue"] > 0
    assert cb.state_dict()["probe"]["size"] == size  # kept for a resumed run
