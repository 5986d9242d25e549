"""K-FAC on 2 ranks (gloo, fork): the operator and the preconditioner equal 1 process on the union of the data."""

from __future__ import annotations

import datetime
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from lightning_hessian.hessian import KFACOperator
from lightning_hessian.optim import KFACCallback, KFACPreconditioner
from tests.ddp.rank_results import SaveRankResults, close_process_group, load_ranks, save_rank

pytestmark = pytest.mark.ddp

WORLD, BATCH, STEPS = 2, 8, 4  # BATCH per rank; the single-process reference uses WORLD * BATCH
KFAC = dict(factor_update_steps=1, inv_update_steps=2, damping=1e-2, kl_clip=1e-2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 5, stride=2), nn.Tanh(), nn.Conv1d(4, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(32, 10),
    ).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * BATCH * STEPS
    return torch.randn(n, 1, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


SHARDS = [[(0, 7)], [(7, 20), (20, 32)]]  # unequal: 7 samples on rank 0, 25 in two batches on rank 1
OPERATORS = {"type-2": {}, "empirical": {"fisher_type": "empirical"}, "ekfac": {"eigenvalue_correction": True},
             "reduce": {"kfac_approx": "reduce"}}


def _operator_results(batches: list) -> dict[str, torch.Tensor]:
    V = torch.randn(3, sum(p.numel() for p in _model().parameters()), generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    out = {}
    for name, kwargs in OPERATORS.items():
        op = KFACOperator(_model(), _loss, batches, **kwargs)
        out[name] = op.matmat(V)
        out[name + " eigenvalues"] = op.eigenvalues()
        out[name + " inverse"] = op.inverse_matmat(V, 1e-3)
    return out


def _operator_worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        x, y = _data()
        save_rank(_operator_results([(x[a:b], y[a:b]) for a, b in SHARDS[rank]]), out, rank)
    finally:
        dist.destroy_process_group()


def test_operator_on_two_ranks_equals_one_process_on_the_union(tmp_path: Path) -> None:
    torch.multiprocessing.start_processes(_operator_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    x, y = _data()
    reference = _operator_results([(x[:32], y[:32])])
    ranks = load_ranks(tmp_path, WORLD)
    for key, ref in reference.items():
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][key], ref, rtol=1e-9, atol=1e-13, msg=key)


def _preconditioner_worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = _model()
        ddp = DistributedDataParallel(model)
        precond = KFACPreconditioner(ddp, **KFAC)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _data()
        for step in range(STEPS):
            rows = slice((step * WORLD + rank) * BATCH, (step * WORLD + rank + 1) * BATCH)
            opt.zero_grad()
            F.cross_entropy(ddp(x[rows]), y[rows]).backward()
            precond.step(opt)
            opt.step()
        save_rank(model.state_dict(), out, rank)
        del ddp, precond  # the reducer goes while the group is still registered
        close_process_group()
    except BaseException:
        dist.destroy_process_group()
        raise


def _single_process_reference() -> dict[str, torch.Tensor]:
    model = _model()
    precond = KFACPreconditioner(model, **KFAC)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for step in range(STEPS):
        rows = slice(step * WORLD * BATCH, (step + 1) * WORLD * BATCH)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        precond.step(opt)
        opt.step()
    return model.state_dict()


def _assert_ranks_identical_and_equal_to(out: Path, reference: dict[str, torch.Tensor]) -> None:
    ranks = load_ranks(out, WORLD)
    start = _model().state_dict()
    for name, ref in reference.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name], ref, rtol=0, atol=1e-12)
        assert (ref - start[name]).abs().max() > 1e-3, name


def test_preconditioner_on_two_ranks_equals_one_process_on_the_union(tmp_path: Path) -> None:
    torch.multiprocessing.start_processes(_preconditioner_worker, args=(str(tmp_path),), nprocs=WORLD,
                                          start_method="fork")
    _assert_ranks_identical_and_equal_to(tmp_path, _single_process_reference())


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _model()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # rank r takes the samples r, r + WORLD, ... in order: each step's shards are together the reference batch
        data = torch.utils.data.TensorDataset(*_data())
        sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                                     shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=BATCH * WORLD // self.trainer.world_size, sampler=sampler)


def _lightning_fit(devices: int, out: Path, strategy="auto") -> None:
    save_params = SaveRankResults(out, lambda trainer, module: module.net.state_dict())
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, precision="64-true", max_epochs=1,
        callbacks=[KFACCallback(**KFAC), save_params], use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_Module())


def test_callback_under_lightning_ddp_equals_one_process_on_the_union(tmp_path: Path) -> None:
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
