"""LightningCLI: every callback configured from YAML, with loss functions, a functools.partial and an attack named by
their dotted paths (unannotated functions were refused, with an empty error outside jsonargparse's debug mode)."""

from __future__ import annotations

import functools
import sys

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_hessian import AdaptiveBatchSizeCallback, AdversarialAugmentCallback, HAWQModule, HessianSpectrumCallback
from tests.foreign import cli_models
from tests.foreign.reference import dense_top_eigenvalue

TRAINER = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")


def callbacks(loss: str, partial_loss: str) -> list[dict]:
    return [
        {"class_path": "lightning_hessian.HessianSpectrumCallback",
         "init_args": {"probe_size": 32, "probe_batch_size": 32, "loss_fn": partial_loss, "plot": False,
                       "max_overhead": None}},  # a 3-step run: the budget would skip its probe
        {"class_path": "lightning_hessian.AdaptiveBatchSizeCallback",
         "init_args": {"max_batch_size": 128, "probe_size": 32, "loss_fn": loss, "plot": False}},
        {"class_path": "lightning_hessian.AdversarialAugmentCallback",
         "init_args": {"attack": "tests.foreign.cli_models.small_fgsm", "fraction": 0.5}},
    ]


@pytest.fixture(autouse=True)
def _no_pytest_arguments(monkeypatch):
    """LightningCLI reads sys.argv besides args=: give it none of pytest's."""
    monkeypatch.setattr(sys, "argv", ["lightning"])


def run_cli(tmp_path, model: str, configured: list[dict]) -> LightningCLI:
    config = {"seed_everything": 0, "trainer": {**TRAINER, "default_root_dir": str(tmp_path), "callbacks": configured},
              "model": {"class_path": model}, "data": {"class_path": "tests.foreign.cli_models.BlobsDataModule"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_callback=None,
                        args=["fit", "--config", str(path)])


def test_every_callback_and_loss_fn_from_a_yaml_config(tmp_path):
    cli = run_cli(tmp_path, "tests.foreign.cli_models.LitClassifier",
                  callbacks("tests.foreign.cli_models.classification_loss",
                            "tests.foreign.cli_models.smoothed_classification_loss"))
    spectrum, abs_cb, adversary = (next(c for c in cli.trainer.callbacks if isinstance(c, kind)) for kind in
                                   (HessianSpectrumCallback, AdaptiveBatchSizeCallback, AdversarialAugmentCallback))
    assert isinstance(spectrum.loss_fn, functools.partial) and spectrum.loss_fn.keywords == {"label_smoothing": 0.1}
    assert abs_cb._probe.loss_fn is cli_models.classification_loss and adversary.attack is cli_models.small_fgsm
    reference = dense_top_eigenvalue(cli.model, spectrum.loss_fn, spectrum._probe.batches[0])
    assert spectrum.history[-1]["eigenvalues"][0] == pytest.approx(reference, rel=1e-3)
    assert abs_cb.history[-1]["eigenvalue"] > 0 and adversary.samples_attacked > 0


def test_hawq_module_arguments_are_read_from_its_init():
    cli = LightningCLI(HAWQModule, run=False, args=[
        "--model.module=tests.foreign.cli_models.LitClassifier", "--model.budgets={'size': 0.5}",
        "--model.loss_fn=tests.foreign.cli_models.classification_loss", "--model.probe_size=64"])
    assert cli.model.budgets == {"size": 0.5} and cli.model.loss_fn is cli_models.classification_loss
    assert cli.model.probe_size == 64


def test_hawq_module_option_groups_are_read_from_the_command_line():
    cli = LightningCLI(HAWQModule, run=False, args=[
        "--model.module=tests.foreign.cli_models.LitClassifier", "--model.quantization.budgets={'size': 0.5}",
        "--model.quantization.bit_choices=[2, 4, 8]", "--model.sensitivity.metric=qbert", "--model.probe_size=64"])
    assert (cli.model.budgets, cli.model.bit_choices, cli.model.metric) == ({"size": 0.5}, [2, 4, 8], "qbert")
    assert cli.model.probe_size == 64 and cli.model.max_samples == 200  # the flat key beside the groups; a default


@pytest.mark.slow
def test_autoencoder_with_its_reconstruction_loss(tmp_path):
    loss = "tests.foreign.cli_models.reconstruction_loss"
    cli = run_cli(tmp_path, "tests.foreign.cli_models.LitAutoEncoder", callbacks(loss, loss)[:2])  # nothing to attack
    spectrum = next(c for c in cli.trainer.callbacks if isinstance(c, HessianSpectrumCallback))
    reference = dense_top_eigenvalue(cli.model, cli_models.reconstruction_loss, spectrum._probe.batches[0])
    assert spectrum.history[-1]["eigenvalues"][0] == pytest.approx(reference, rel=1e-3)
