"""BoundaryThicknessCallback on 2 ranks (gloo, fork) logs the single-process value of the whole probe set."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks.thickness import BoundaryThicknessCallback
from tests.ddp.rank_results import SaveRankResults, load_ranks

pytestmark = pytest.mark.ddp


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 10, generator=g)
    return TensorDataset(x, (x.sum((1, 2)) > 0).long() + (x[:, 0, 0] > 0.5).long())


class _Module(pl.LightningModule):
    """lr = 0: the weights stay put, so one process and two ranks measure the same model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _history(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
    cb = next(c for c in trainer.callbacks if isinstance(c, BoundaryThicknessCallback))
    return {"history": cb.history, "probe_rows": sum(len(y) for _, y, _ in cb._probe)}


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for devices in (1, 2):
            strategy = DDPStrategy(start_method="fork", process_group_backend="gloo") if devices == 2 else "auto"
            # 45 probe samples in batches of 10: ranks hold 23 and 22, in batches of 10, 10, 3 and 10, 10, 2
            cb = BoundaryThicknessCallback(eps=2.0, every_n_epochs=1, probe_size=45, probe_batch_size=10, steps=5,
                                           num_points=32, clamp=None, seed=4)
            folder = tmp_path / str(devices)
            folder.mkdir()
            trainer = pl.Trainer(
                accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2,
                callbacks=[cb, SaveRankResults(folder, _history)], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            )
            trainer.fit(_Module(), DataLoader(_data(), batch_size=8))
            results.append((load_ranks(folder, devices), trainer.callback_metrics["robust/boundary_thickness"].item()))
    finally:
        torch.set_num_threads(threads)
    (one,), logged_one = results[0]
    two, logged_two = results[1]
    assert one["probe_rows"] == 45 and [r["probe_rows"] for r in two] == [23, 22]
    values = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in two]
    assert values[0] == values[1] and len(values[0]) == 2  # every rank holds the reduced values
    for a, b in zip(one["history"], two[0]["history"], strict=True):
        for key in ("thickness", "std_error", "reached"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert logged_two == pytest.approx(logged_one, rel=1e-6) and 0 < logged_one <= 2.0
    assert 0 < one["history"][0]["reached"] < 1  # a real mix: some segments reach their target class, some not
