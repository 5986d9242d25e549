"""Hessian spectrum on 2 ranks (gloo, fork) with unequal shards equals 1 process on the union of the data."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_hessian.hessian import (
    HessianOperator,
    hutchinson_trace,
    per_layer_top_eigenvalue,
    per_layer_trace,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.models import MNIST1DMLP
from lightning_hessian.quant.sensitivity import activation_quadratic_forms
from tests.ddp.rank_results import load_ranks, save_rank

pytestmark = pytest.mark.ddp

WORLD = 2


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MNIST1DMLP(hidden=16).double()


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(80, 40, generator=g, dtype=torch.float64), "y": torch.randint(0, 10, (80,), generator=g)}


LAYOUTS = {  # (start, stop) of each batch, per rank
    "unequal": [[(0, 30)], [(30, 50), (50, 80)]],  # 30 samples in one batch; 50 in batches of 20 and 30
    "empty rank": [[(0, 24), (24, 80)], []],  # a rank may hold no probe batch at all
}


def _shards(layout: str, rank: int) -> list[dict[str, torch.Tensor]]:
    d = _data()
    return [{k: v[a:b] for k, v in d.items()} for a, b in LAYOUTS[layout][rank]]


def _spectrum(op: HessianOperator) -> dict[str, torch.Tensor]:
    eig = top_eigenvalues(op, k=3, seed=0)
    tr = hutchinson_trace(op, num_samples=48, seed=0)
    dens = spectral_density(op, num_runs=4, lanczos_steps=8, deflate=2, seed=0)
    layers = per_layer_trace(op, num_samples=32, seed=0)
    layer_eig = per_layer_top_eigenvalue(op, k=1, seed=0)
    krylov = top_eigenvalues(op, k=1, min_iter=10, seed=0, return_basis=True)
    deflated = hutchinson_trace(op, num_samples=16, seed=0, basis=krylov.basis, basis_trace=krylov.basis_trace)
    linears = {name: m for name, m in op.model.named_modules() if isinstance(m, nn.Linear)}
    act = activation_quadratic_forms(op, linears, [4, 8])
    return {
        "deflated_trace": torch.tensor([deflated.estimate, deflated.std_error], dtype=torch.float64),
        "activation_forms": torch.tensor([q for table in act.values() for q in table.values()], dtype=torch.float64),
        "eigenvalues": eig.eigenvalues,
        "trace": torch.tensor([tr.estimate, tr.std_error, dens.trace], dtype=torch.float64),
        "layer_traces": torch.tensor([r.estimate for r in layers.values()], dtype=torch.float64),
        "layer_eigenvalues": torch.cat([r.eigenvalues for r in layer_eig.values()]),
        "loss": torch.tensor([op.loss()], dtype=torch.float64),
    }


def _worker(rank: int, layout: str, out: str) -> None:
    torch.set_num_threads(1)
    # a file store: no port to race for, and no store server whose exit could strand the other rank
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        op = HessianOperator(_model(), _loss, _shards(layout, rank))
        assert op.distributed
        result = _spectrum(op)
        # a second operator reuses the measured HVP form on ranks that have one and stays in step elsewhere
        again = HessianOperator(op.model, _loss, _shards(layout, rank))
        result["again"] = top_eigenvalues(again, k=3, seed=0).eigenvalues
        assert again.hvp_choice["single"] == op.hvp_choice["single"]
        save_rank(result, out, rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_equal_one_process_on_the_union(layout: str, tmp_path: Path) -> None:
    torch.multiprocessing.start_processes(
        _worker, args=(layout, str(tmp_path)), nprocs=WORLD, start_method="fork"
    )
    reference = _spectrum(HessianOperator(_model(), _loss, _data()))
    reference["again"] = reference["eigenvalues"]
    ranks = load_ranks(tmp_path, WORLD)
    for key, ref in reference.items():
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=1e-12, atol=0)
        torch.testing.assert_close(ranks[0][key], ref, rtol=1e-5, atol=0, msg=key)
