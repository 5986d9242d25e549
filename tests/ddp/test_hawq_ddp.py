"""HAWQModule under 2-process DDP (fork, gloo): one plan for both ranks, equal to 1 process, equal parameters."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.models import MNIST1DCNN, ClassificationModule
from lightning_hessian.probe_set import draw_probe_indices, probe_batches
from lightning_hessian.quant.hawq import HAWQModule
from tests.ddp.rank_results import SaveRankResults, load_ranks
from tests.helpers.problems import fit_full_batch

pytestmark = pytest.mark.ddp

PROBE = 64


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 40, generator=g)
    return TensorDataset(x, (x[:, :20].sum(1) > 0).long() + 2 * (x[:, 20:].sum(1) > 0).long())


def trained() -> ClassificationModule:
    torch.manual_seed(0)
    module = ClassificationModule(MNIST1DCNN(channels=6, num_classes=4),
                                  optimizer=partial(torch.optim.SGD, lr=0.05), num_classes=4)
    return fit_full_batch(module, *data().tensors, steps=100)


def _rank_state(trainer: pl.Trainer, pl_module: HAWQModule) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
        "bits": pl_module.weight_bits,
        "trace": pl_module.sensitivity.trace,
    }


def test_two_process_fine_tune_plans_once_and_keeps_ranks_equal(tmp_path: Path) -> None:
    module = trained()
    hawq = HAWQModule(module, budgets={"size": 0.5}, probe_size=PROBE, probe_batch_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork", process_group_backend="gloo"),
            max_epochs=2, callbacks=[SaveRankResults(tmp_path, _rank_state)], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )
        trainer.fit(hawq, DataLoader(data(), batch_size=16, shuffle=True))
    finally:
        torch.set_num_threads(threads)
    ranks = load_ranks(tmp_path, 2)
    assert ranks[0]["bits"] == ranks[1]["bits"] and set(ranks[0]["bits"].values()) <= {4, 8}
    assert ranks[0]["trace"] == ranks[1]["trace"]
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0)
    start = dict(module.named_parameters())
    assert not torch.equal(ranks[0]["params"]["module.net.classifier.weight"], start["net.classifier.weight"])
    # Each rank measured its half of the probe set with all-reduced products: one process on the union
    # gives the same traces (up to the summation order) and the same plan.
    dataset = data()
    single = HAWQModule(module, budgets={"size": 0.5})
    bits = single.plan(probe_batches(dataset, draw_probe_indices(len(dataset), PROBE, seed=0), 16))
    assert bits == ranks[0]["bits"]
    for name, trace in single.sensitivity.trace.items():
        assert ranks[0]["trace"][name] == pytest.approx(trace, rel=1e-5)
    # The main process got rank 0's quantized weights back (the state dict carries its bits).
    assert hawq.weight_bits == ranks[0]["bits"]
    torch.testing.assert_close(dict(hawq.named_parameters())["module.net.classifier.weight"],
                               ranks[0]["params"]["module.net.classifier.weight"])


class RecordingLoss:
    """Cross-entropy that records which batches it saw (by the sum of their inputs)."""

    def __init__(self) -> None:
        self.seen: set[float] = set()

    def __call__(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        self.seen.add(round(float(batch[0].sum()), 3))
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("num_batches", [3, 1])  # 1: rank 1 holds no probe batch
def test_given_probe_batches_are_split_over_the_ranks(tmp_path: Path, num_batches: int) -> None:
    module = trained()
    x, y = data().tensors
    probe = [(x[16 * i: 16 * (i + 1)], y[16 * i: 16 * (i + 1)]) for i in range(num_batches)]
    hawq = HAWQModule(module, budgets={"size": 0.5}, probe_data=probe, loss_fn=RecordingLoss())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork", process_group_backend="gloo"),
            max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[SaveRankResults(tmp_path, lambda t, m: {**_rank_state(t, m), "seen": sorted(m.loss_fn.seen)})],
        )
        trainer.fit(hawq, DataLoader(data(), batch_size=16))
    finally:
        torch.set_num_threads(threads)
    ranks = load_ranks(tmp_path, 2)
    for rank, result in enumerate(ranks):  # each rank measured and calibrated on its own batches only
        assert result["seen"] == sorted(round(float(b[0].sum()), 3) for b in probe[rank::2])
    single = HAWQModule(module, budgets={"size": 0.5})
    assert single.plan(probe) == ranks[0]["bits"] == ranks[1]["bits"]
    for name, trace in single.sensitivity.trace.items():
        assert ranks[0]["trace"][name] == ranks[1]["trace"][name] == pytest.approx(trace, rel=1e-5)
