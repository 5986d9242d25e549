"""AdaHessian on 2 ranks (gloo, fork): identical parameters on every rank, equal to 1 process on the union."""

from __future__ import annotations

import datetime
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from lightning_hessian.optim import AdaHessian, AdaHessianCallback
from tests.ddp.rank_results import SaveRankResults, close_process_group, load_ranks, save_rank

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
]

WORLD, BATCH, STEPS = 2, 8, 4  # BATCH per rank; the single-process reference uses WORLD * BATCH
OPT = dict(lr=0.1, n_samples=2, weight_decay=0.01)


def _model() -> nn.Module:
    """Two Conv1d (3-D kernels, averaged) and a linear head; smooth, so every parameter keeps learning."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 5, stride=2), nn.Tanh(), nn.Conv1d(4, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(32, 10),
    ).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * BATCH * STEPS
    return torch.randn(n, 1, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _raw_worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    # a file store: no port to race for, and no store server whose exit could strand the other rank
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    model = _model()
    ddp = DistributedDataParallel(model)
    opt = AdaHessian(model.parameters(), **OPT)
    x, y = _data()
    for step in range(STEPS):
        rows = slice((step * WORLD + rank) * BATCH, (step * WORLD + rank + 1) * BATCH)  # this rank's shard
        opt.zero_grad()
        with ddp.no_sync():  # DDP cannot all-reduce a create_graph backward; AdaHessian averages itself
            F.cross_entropy(ddp(x[rows]), y[rows]).backward(create_graph=True)
        opt.step()
    save_rank(model.state_dict(), out, rank)
    del ddp  # the reducer goes while the group is still registered
    close_process_group()


def _single_process_reference() -> dict[str, torch.Tensor]:
    model = _model()
    opt = AdaHessian(model.parameters(), **OPT)
    x, y = _data()
    for step in range(STEPS):
        rows = slice(step * WORLD * BATCH, (step + 1) * WORLD * BATCH)  # the union of the ranks' shards
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward(create_graph=True)
        opt.step()
    return model.state_dict()


def _assert_ranks_identical_and_equal_to(out: Path, reference: dict[str, torch.Tensor]) -> None:
    ranks = load_ranks(out, WORLD)
    decayed = {k: v * (1 - OPT["lr"] * OPT["weight_decay"]) ** STEPS for k, v in _model().state_dict().items()}
    for name, ref in reference.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        # to rounding: the union's gradients and curvature are summed in another order (parameters reach ~60, and
        # dividing by the curvature's square root amplifies the last bits: up to 3e-13 relative)
        torch.testing.assert_close(ranks[0][name], ref, rtol=1e-12, atol=1e-12)
        assert (ref - decayed[name]).abs().max() > 1e-2, name  # every parameter learned, not just decayed


def test_raw_ddp_ranks_match_each_other_and_the_union_run(tmp_path: Path) -> None:
    torch.multiprocessing.start_processes(
        _raw_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork"
    )
    _assert_ranks_identical_and_equal_to(tmp_path, _single_process_reference())


class _TwoHeads(nn.Module):
    """A trunk and two heads; rank r trains head r only, so each head is unused on the other rank."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.heads = nn.Linear(6, 4).double(), nn.ModuleList(nn.Linear(4, 3).double() for _ in range(2))
        self.unused = nn.Linear(2, 2).double()  # used by no rank: left as it is, like a parameter without .grad

    def loss(self, x: torch.Tensor, y: torch.Tensor, head: int) -> torch.Tensor:
        return F.cross_entropy(self.heads[head](torch.tanh(self.trunk(x))), y)


def _two_heads_data(step: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + head)
    return torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _two_heads_worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    model = _TwoHeads()
    opt = AdaHessian(model.parameters(), **OPT)
    for step in range(STEPS):
        opt.zero_grad()
        model.loss(*_two_heads_data(step, rank), head=rank).backward(create_graph=True)
        opt.step()
    save_rank(model.state_dict(), out, rank)
    close_process_group()


def test_parameters_unused_on_some_ranks(tmp_path: Path) -> None:
    """Equal to one process minimising the ranks' mean loss: an unused parameter counts a zero gradient."""
    torch.multiprocessing.start_processes(_two_heads_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    model = _TwoHeads()
    opt = AdaHessian(model.parameters(), **OPT)
    for step in range(STEPS):
        opt.zero_grad()
        (sum(model.loss(*_two_heads_data(step, r), head=r) for r in range(WORLD)) / WORLD).backward(create_graph=True)
        opt.step()
    ranks = load_ranks(tmp_path, WORLD)
    for name, ref in model.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], ref, rtol=0, atol=1e-12)
    assert torch.equal(ranks[0]["unused.weight"], _TwoHeads().unused.weight)


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return AdaHessian(self.parameters(), **OPT)

    def train_dataloader(self):
        # Lightning's own sampler shuffles; this one deals rank r the samples r, r + WORLD, ... in order.
        data = torch.utils.data.TensorDataset(*_data())
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(data, batch_size=BATCH * WORLD // self.trainer.world_size, sampler=sampler)


def _lightning_fit(devices: int, out: Path, strategy="auto") -> None:
    save_params = SaveRankResults(out, lambda trainer, module: module.net.state_dict())
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, precision="64-true", max_epochs=1,
        callbacks=[AdaHessianCallback(), save_params], use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_Module())


def test_lightning_ddp_ranks_match_each_other_and_the_union_run(tmp_path: Path) -> None:
    # Each step's two shards of BATCH samples are together the single-process batch of 2 * BATCH.
    ddp_dir, ref_dir = tmp_path / "ddp", tmp_path / "ref"
    ddp_dir.mkdir()
    ref_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _lightning_fit(WORLD, ddp_dir, DDPStrategy(start_method="fork", process_group_backend="gloo"))
        _lightning_fit(1, ref_dir)
    finally:
        torch.set_num_threads(threads)
    _assert_ranks_identical_and_equal_to(ddp_dir, load_ranks(ref_dir, 1)[0])


def _frozen_worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    model = _model().requires_grad_(False)
    opt = AdaHessian(model.parameters(), **OPT, update_each=2)
    for _ in range(3):  # curvature steps and reuse steps
        opt.step()
    save_rank({"steps": opt.state_dict()["steps"], "weights": model.state_dict()}, out, rank)
    close_process_group()


def test_an_optimizer_with_only_frozen_parameters_steps_on_every_rank(tmp_path: Path) -> None:
    # it used to index the first of no parameters under DDP (a single process returned at once)
    torch.multiprocessing.start_processes(_frozen_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    for result in load_ranks(tmp_path, WORLD):
        assert result["steps"] == 3
        for name, value in _model().state_dict().items():
            assert torch.equal(result["weights"][name], value)


class _BatchNormModule(pl.LightningModule):
    """BatchNorm fed different data on each rank: its running statistics differ unless DDP broadcasts them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.net(batch[0])

    def configure_optimizers(self):
        return AdaHessian(self.parameters(), lr=0.1)

    def _loader(self, n):
        rank = self.trainer.global_rank
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(n, 4, generator=g) + 3 * rank
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 2, (n,), generator=g)),
                                           batch_size=8)

    def train_dataloader(self):
        return self._loader(24)

    def val_dataloader(self):
        return self._loader(8)


def test_batchnorm_statistics_stay_rank_0s_as_under_plain_ddp(tmp_path: Path) -> None:
    # the callback turns DDP's gradient sync off for the fit, which also stopped DDP's buffer broadcast
    save = SaveRankResults(tmp_path, lambda trainer, module: module.net[1].running_mean.clone())
    strategy = DDPStrategy(start_method="fork", process_group_backend="gloo")
    pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_epochs=1,
               callbacks=[AdaHessianCallback(), save], use_distributed_sampler=False, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(_BatchNormModule())
    rank0, rank1 = load_ranks(tmp_path, WORLD)
    assert torch.equal(rank0, rank1) and rank0.abs().sum() > 0
