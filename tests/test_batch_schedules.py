"""The batch-size schedules: each one's history on a tiny fit, pinned to the values the callback gave before the
schedules became policy objects (batch sizes and LRs exactly, eigenvalues to 1e-6)."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        x = torch.randn(128, 5, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, (x.sum(1) > 0).long())

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Module(pl.LightningModule):
    def __init__(self, scheduler=None):
        super().__init__()
        self.net, self.scheduler = nn.Linear(5, 2), scheduler
        self.seen = []  # (epoch, rows, lr) of each training step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, len(y), self.trainer.optimizers[0].param_groups[0]["lr"]))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return opt if self.scheduler is None else {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _multistep_lr(opt):
    return torch.optim.lr_scheduler.MultiStepLR(opt, [1, 3], gamma=0.3)


WARM = [0.053125000000000006, 0.059375000000000004, 0.065625, 0.07187500000000001, 0.078125, 0.084375,
        0.09062500000000001, 0.096875]
RECORDED = {  # name: (callback arguments, scheduler, epochs, history (batch, lr, eigenvalue, adversarial share),
    #               the training steps as (epoch, rows, lr), consecutive repeats dropped)
    "abs": ({"max_batch_size": 64, "duration": 3, "decay_ratio": 1.2, "probe_size": 16}, None, 6,
            [(8, 0.1, 0.5871435347238885, 0.0), (8, 0.1, 0.5287761726631599, 0.0), (8, 0.1, 0.49300976136383, 0.0),
             (16, 0.2, 0.4664028872871437, 0.0), (32, 0.4, 0.4437262207190994, 0.0),
             (32, 0.4, 0.40769142431789784, 0.0)],
            [(0, 8, 0.1), (1, 8, 0.1), (2, 8, 0.1), (3, 16, 0.2), (4, 32, 0.4), (5, 32, 0.4)]),
    "abs_warmup_accumulate": (
        {"max_batch_size": 64, "duration": 2, "decay_ratio": 1.2, "probe_size": 16, "warmup_epochs": 1.0,
         "mode": "accumulate"}, _step_lr, 6,
        [(8, 0.1, 0.5871435347238885, 0.0), (8, 0.1, 0.5287761726631599, 0.0), (16, 0.1, 0.5129400700730262, 0.0),
         (16, 0.1, 0.49300740616727234, 0.0), (32, 0.1, 0.49074417577652824, 0.0),
         (32, 0.1, 0.48362942324497404, 0.0)],
        [(0, 8, 0.1), (1, 8, 0.1), (2, 8, 0.1)] + [s for lr in WARM for s in ((2, 8, lr), (2, 8, 0.1))][:-1]
        + [(3, 8, 0.1), (4, 8, 0.1)] + [s for lr in WARM[1::2] for s in ((4, 8, lr), (4, 8, 0.1))][:-1]
        + [(5, 8, 0.1)]),
    "absa": ({"max_batch_size": 32, "duration": 2, "adversarial": True, "adversarial_fraction": 0.5,
              "probe_size": 16}, None, 8,
             [(8, 0.1, 0.6169025450218864, 0.5), (8, 0.1, 0.5651779012904117, 0.5),
              (16, 0.2, 0.5044893759049147, 0.25), (16, 0.2, 0.47832049926608955, 0.25)] + [(32, 0.4, None, 0.0)] * 4,
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


@pytest.mark.parametrize("name", list(RECORDED))
def test_each_schedule_trains_as_recorded(name):
    """Every schedule's batch sizes, LRs (warmups included), probed eigenvalues and ABSA shares on a real fit."""
    kwargs, scheduler, epochs, history, steps = RECORDED[name]
    pl.seed_everything(0)
    module, callback = Module(scheduler), AdaptiveBatchSizeCallback(plot=False, **kwargs)
    pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(module, datamodule=Data(8))
    got = [(h["batch_size"], h["lr"], h["eigenvalue"], h["adversarial_fraction"]) for h in callback.history]
    assert [(b, lr, f) for b, lr, _, f in got] == [(b, lr, f) for b, lr, _, f in history]
    assert [e for _, _, e, _ in got] == [None if e is None else pytest.approx(e, rel=1e-6) for _, _, e, _ in history]
    trained = []
    for step in module.seen:
        if not trained or trained[-1] != step:
            trained.append(step)
    assert trained == steps
