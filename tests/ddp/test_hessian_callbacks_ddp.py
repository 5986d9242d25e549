"""Under DDP the Hessian callbacks give the single-process values, and every rank takes the same decisions."""

from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from tests.ddp.rank_results import SaveRankResults, load_ranks
from tests.helpers.modules import TinyModule, clocked_module, tiny_dataset

pytestmark = pytest.mark.ddp


def ddp(devices: int):
    if devices == 1:
        return {"devices": 1}
    return {"devices": devices, "strategy": DDPStrategy(start_method="fork", process_group_backend="gloo")}


def test_spectrum_two_ranks_equal_one_process():
    metrics = []
    for devices in (1, 2):
        pl.seed_everything(0)
        # weights stay put (and no BatchNorm statistics move), so both runs see the same Hessian
        # eig_tol above float32 rounding: the ranks sum products in another order, and a target at rounding
        # level would stop the two runs at different products
        module = TinyModule(lr=0.0, batch_norm=False)
        cb = HessianSpectrumCallback(top_k=2, probe_size=80, probe_batch_size=16, eig_tol=1e-5,
                                     trace_rel_tol=0.5, trace_max_samples=64, plot=False,
                                     max_overhead=1e9)  # rank 0's budget decision is broadcast
        trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                             **ddp(devices))
        trainer.fit(module, DataLoader(tiny_dataset(), batch_size=16))
        metrics.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("hessian/")})
    one, two = metrics
    values = {"hessian/eig_1", "hessian/eig_2", "hessian/trace", "hessian/trace_std_error"}
    assert set(one) == values | {"hessian/hvps", "hessian/probe_seconds"} == set(two)  # each probe's cost too
    for key in values | {"hessian/hvps"}:
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


class RecordPerRank(SaveRankResults):
    """Saves each rank's batch-size history, training rows per batch, step and weights at the end of fit."""

    def __init__(self, folder):
        super().__init__(folder, self.record)
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(len(batch[1]))

    def record(self, trainer, pl_module):
        abs_cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSizeCallback))
        return {"history": abs_cb.history, "rows": self.rows, "step": trainer.global_step,
                "weights": [p.sum().item() for p in pl_module.parameters()]}


def test_abs_ranks_agree_on_every_change(tmp_path):
    pl.seed_everything(0)
    cb = AdaptiveBatchSizeCallback(max_batch_size=64, duration=1, probe_size=32, probe_batch_size=16, plot=False)
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb, RecordPerRank(tmp_path)], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         accelerator="cpu", **ddp(2))

    class Data(pl.LightningDataModule):
        batch_size = 8  # per device: global 16

        def train_dataloader(self):
            return DataLoader(tiny_dataset(), batch_size=self.batch_size, shuffle=True)

    trainer.fit(TinyModule(), datamodule=Data())
    rank0, rank1 = load_ranks(tmp_path, 2)
    assert rank0["history"] == rank1["history"]
    assert [h["batch_size"] for h in rank0["history"]] == [16, 32, 64, 64]  # duration=1: grows after every epoch
    assert rank0["rows"] == rank1["rows"]
    # 48 samples per rank; each growth applies from the next epoch: 6 steps of 8, 3 of 16, then two epochs of
    # 32 + 16 (the cap)
    assert rank0["rows"] == [8] * 6 + [16] * 3 + [32, 16] * 2
    assert rank0["weights"] == pytest.approx(rank1["weights"], abs=0)


def _fails_on_rank_1_in_epoch_1(model, batch):
    if torch.distributed.get_rank() == 1 and model.trainer.current_epoch == 1:
        raise RuntimeError("rank-1-only failure")
    return F.cross_entropy(model(batch[0]), batch[1])


def test_a_probe_failing_on_one_rank_is_skipped_on_every_rank(tmp_path):
    # the failing rank used to warn and train on while the others waited in its all-reduce: a hang
    pl.seed_everything(0)
    cb = HessianSpectrumCallback(top_k=1, trace=False, probe_size=32, probe_batch_size=16, plot=False,
                                 loss_fn=_fails_on_rank_1_in_epoch_1, max_overhead=None)
    history = SaveRankResults(tmp_path, lambda trainer, module: [h["epoch"] for h in cb.history])
    strategy = DDPStrategy(start_method="fork", process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb, history], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=2,
                         strategy=strategy)
    trainer.fit(TinyModule(), DataLoader(tiny_dataset(), batch_size=16))
    assert load_ranks(tmp_path, 2) == [[0, 2], [0, 2]]  # a collective timeout (a hang) fails instead


def test_the_budget_and_the_probe_size_follow_rank_0(tmp_path, monkeypatch):
    """Rank 1 times its products 10x slower than rank 0: deciding alone it would choose another probe size and
    skip other probes (and wait forever in the all-reduced products); every rank takes rank 0's decisions."""
    Clocked = clocked_module(monkeypatch, lambda: 2e-5 * (10 if torch.distributed.get_rank() == 1 else 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    cb = HessianSpectrumCallback(plot=False, trace=False)  # the default budget and an automatic probe size
    results = SaveRankResults(tmp_path, lambda trainer, module: {
        "steps": [h["step"] for h in cb.history], "size": cb._probe.size, "hvps": [h["hvps"] for h in cb.history]})
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=8, callbacks=[cb, results], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", **ddp(2))
    trainer.fit(Clocked(batch_norm=False), DataLoader(data, batch_size=32))
    rank0, rank1 = load_ranks(tmp_path, 2)
    assert rank0 == rank1
    # rank 0's timing affords its first, cold probe (16 products) 128 samples within 3% of the first 1-s epoch, and
    # its budget every probe after it; rank 1's alone: the 32 of the floor, its first probe skipped
    assert rank0["size"] == 128 and rank0["steps"] == [10 * epoch for epoch in range(1, 9)]


class PerDeviceData(pl.LightningDataModule):
    batch_size = 8  # per device

    def train_dataloader(self):
        return DataLoader(tiny_dataset(), batch_size=self.batch_size, shuffle=True)


def test_abs_times_the_all_reduces_without_changing_training(tmp_path):
    """The callback's communication hook (the averaging all-reduce, timed) trains exactly as DDP's own."""
    results = []
    for timed in (False, True):
        pl.seed_everything(0)
        callbacks = [AdaptiveBatchSizeCallback(max_batch_size=64, schedule="bl", plot=False)] if timed else []
        folder = tmp_path / str(timed)
        folder.mkdir()
        record = SaveRankResults(folder, lambda trainer, module: {
            "weights": [p.detach().clone() for p in module.parameters()],
            "timings": {k: v for c in trainer.callbacks if isinstance(c, AdaptiveBatchSizeCallback)
                        for k, v in c.timings.items()}})
        trainer = pl.Trainer(max_epochs=2, callbacks=[*callbacks, record], logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", **ddp(2))
        trainer.fit(TinyModule(), datamodule=PerDeviceData())
        results.append(load_ranks(folder, 2))
    plain, timed = results
    for rank in range(2):
        for p, q in zip(plain[rank]["weights"], timed[rank]["weights"]):
            torch.testing.assert_close(q, p, rtol=0, atol=0)
    for rank in range(2):
        t = timed[rank]["timings"]
        assert 0 < t["communication_seconds"] < t["train_seconds"]
        assert t["compute_seconds"] == pytest.approx(t["train_seconds"] - t["communication_seconds"])
