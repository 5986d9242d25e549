"""The foreign modules as cases the tests and ``benchmarks/outside_modules.py`` run every feature on: how to build
each module and its data, the loss a user passes for it, and the Trainer class its project uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as L
import pytorch_lightning as PL
import torch
from torch.utils.data import DataLoader

from tests.foreign import bert_like, boring, cli_models, gan, hydra_template, language_model, pl_regression


@dataclass
class Case:
    """One outside-style module: ``module()`` and ``data()`` (keyword arguments for ``fit``) build fresh copies."""

    name: str
    module: Callable[[], Any]
    data: Callable[[], dict[str, Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    trainer: type = L.Trainer
    example_input: Callable[[], Any] | None = None  # for HAWQModule, where the batches' first tensor is no input
    default_loss_applies: bool = False  # cross_entropy(module(x), y) is the module's loss: the defaults apply
    abs_mode: str = "accumulate"  # "dataloader" where the data's batch_size attribute builds the loader
    max_batch_size: int = 64  # for AdaptiveBatchSizeCallback: a few growths, within the training set


def _loader(dataset: Any, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


CASES = {
    case.name: case for case in (
        Case("boring", boring.BoringModel, lambda: {}, boring.boring_loss),
        Case("language_model", language_model.LightningTransformer,
             lambda: {"train_dataloaders": language_model.lm_loader()}, language_model.lm_loss),
        Case("classifier", cli_models.LitClassifier, lambda: {"datamodule": cli_models.BlobsDataModule()},
             cli_models.classification_loss, default_loss_applies=True, abs_mode="dataloader", max_batch_size=128),
        Case("autoencoder", cli_models.LitAutoEncoder, lambda: {"datamodule": cli_models.BlobsDataModule()},
             cli_models.reconstruction_loss, abs_mode="dataloader", max_batch_size=128),
        Case("gan", gan.GAN, lambda: {"train_dataloaders": _loader(gan.gan_data(), 32)}, gan.discriminator_loss,
             example_input=lambda: torch.zeros(4, 4), max_batch_size=128),
        Case("hydra_mnist", hydra_template.mnist_module,
             lambda: {"datamodule": hydra_template.MNISTDataModule(batch_size=32)},
             lambda model, batch: model.criterion(model(batch[0]), batch[1]), default_loss_applies=True,
             max_batch_size=128),
        Case("bert_like", bert_like.GLUETransformer, lambda: {"datamodule": bert_like.GLUEDataModule()},
             bert_like.bert_loss),
        Case("pl_regression", pl_regression.RegressionModel, lambda: {"datamodule": pl_regression.RegressionData()},
             pl_regression.mse_loss, trainer=PL.Trainer, abs_mode="dataloader"),
    )
}
