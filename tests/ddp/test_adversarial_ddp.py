"""AdversarialAugmentCallback on 2 ranks (gloo, fork): each rank attacks its shard, parameters stay in step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback
from tests.ddp.rank_results import SaveRankResults, load_ranks

pytestmark = pytest.mark.ddp

WORLD, BATCH = 2, 8


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, generator=g)
    return TensorDataset(x, (x.sum((1, 2)) > 0).long())


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(40, 2))
        self.changed_rows = 0  # rows this rank trained on that are not in its clean shard

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        clean = _data(64, 0).tensors[0]
        self.changed_rows += int((~(x[:, None] == clean[None]).flatten(2).all(-1).any(1)).sum())
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(_data(64, 0), batch_size=BATCH, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_data(40, 1), batch_size=10)


def _rank_state(trainer: pl.Trainer, pl_module: _Module) -> dict:
    adv = next(cb for cb in trainer.callbacks if isinstance(cb, AdversarialAugmentCallback))
    return {"params": pl_module.state_dict(), "changed_rows": pl_module.changed_rows, "adv": adv.state_dict(),
            "robust_acc": trainer.callback_metrics["adv/robust_acc"].item(),
            "success_rate": trainer.callback_metrics["adv/success_rate"].item(),
            "robust_counts": adv._eval_counts.tolist()}


def test_two_ranks_attack_their_shards_and_stay_identical(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adv = AdversarialAugmentCallback("pgd", eps=0.3, steps=2, fraction=0.5, clamp=None, robust_eval=True)
        trainer = pl.Trainer(
            accelerator="cpu", devices=WORLD, strategy=DDPStrategy(start_method="fork", process_group_backend="gloo"),
            max_epochs=2, callbacks=[adv, SaveRankResults(tmp_path, _rank_state)], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(_Module())
    finally:
        torch.set_num_threads(threads)
    ranks = load_ranks(tmp_path, WORLD)
    initial = _Module().state_dict()
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(value, ranks[1]["params"][name], rtol=0, atol=0)
    assert any(not torch.equal(v, initial[k]) for k, v in ranks[0]["params"].items())
    # 64 samples / 2 ranks / 8 per batch = 4 batches per rank per epoch, half of each attacked
    for state in ranks:
        assert state["adv"]["batches_seen"] == 8 and state["adv"]["samples_attacked"] == 32
        assert state["changed_rows"] == 32
    # epoch metrics are pooled over the ranks: the same value on both, and the pooled mean of their shards
    assert ranks[0]["robust_acc"] == ranks[1]["robust_acc"] and ranks[0]["success_rate"] == ranks[1]["success_rate"]
    (c0, n0), (c1, n1) = ranks[0]["robust_counts"], ranks[1]["robust_counts"]  # this rank's own counts
    assert n0 == n1 == 20 and c0 != c1
    assert ranks[0]["robust_acc"] == pytest.approx((c0 + c1) / (n0 + n1), abs=1e-6)
