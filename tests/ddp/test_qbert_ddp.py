"""metric='qbert' on 2 ranks (gloo, fork): subsample s is the union of the ranks' s-th batches, as in 1 process."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_hessian.models import MNIST1DMLP
from lightning_hessian.quant.sensitivity import subsample_top_eigenvalues
from tests.ddp.rank_results import load_ranks, save_rank

pytestmark = pytest.mark.ddp

WORLD = 2
SHARDS = [[(0, 10), (20, 35)], [(10, 20), (35, 40)]]  # rank r's batches: subsample 0 = 0..20, 1 = 20..40


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _setup():
    torch.manual_seed(0)
    model = MNIST1DMLP(hidden=8).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return model, weights, x, y


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model, weights, x, y = _setup()
        found, _, _ = subsample_top_eigenvalues(model, _loss, [(x[a:b], y[a:b]) for a, b in SHARDS[rank]], weights,
                                                tol=1e-10)
        try:  # unequal batch counts: every rank refuses, none hangs
            subsample_top_eigenvalues(model, _loss, [(x[a:b], y[a:b]) for a, b in SHARDS[rank][: rank + 1]],
                                      weights)
            refused = 0.0
        except ValueError:
            refused = 1.0
        save_rank({"eigenvalues": torch.tensor([v for values in found.values() for v in values]),
                   "refused": torch.tensor([refused])}, out, rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_qbert_subsamples_on_two_ranks_equal_one_process(tmp_path: Path) -> None:
    torch.multiprocessing.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    model, weights, x, y = _setup()
    found, _, _ = subsample_top_eigenvalues(model, _loss, [(x[:20], y[:20]), (x[20:], y[20:])], weights, tol=1e-10)
    reference = torch.tensor([v for values in found.values() for v in values])
    for result in load_ranks(tmp_path, WORLD):
        torch.testing.assert_close(result["eigenvalues"], reference, rtol=1e-6, atol=0)
        assert result["refused"].item() == 1.0
