"""Every feature on every outside-style module: it runs with the right numbers (the top eigenvalue against the dense
Hessian), or fails before the first training step with one line naming what to pass."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_hessian import AdaptiveBatchSizeCallback, AdversarialAugmentCallback, HAWQModule, HessianSpectrumCallback
from lightning_hessian.callbacks.probe import cross_entropy_loss
from tests.foreign import hydra_template
from tests.foreign.cases import CASES, Case
from tests.foreign.reference import dense_top_eigenvalue

TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
               num_sanity_val_steps=0)
LOSS = r"pass loss_fn=<callable \(module, batch\) -> mean loss> or define hessian_loss\(self, batch\)"
NOT_CE = {"boring": "BoringModel's code trains with mse_loss", "autoencoder": "LitAutoEncoder's code trains with mse_",
          "gan": "GAN's code trains with binary_cross_entropy_with_logits", "language_model": "LightningTransformer "
          "defines no forward", "pl_regression": "RegressionModel's code trains with mse_loss"}
# What each combination must do: None runs; a pattern is the error (raised before any training step).
EXPECTED = {}
for name in CASES:
    why = NOT_CE.get(name, "batches are dicts with keys" if name == "bert_like" else None)
    for feature in ("spectrum", "abs", "hawq"):
        who = {"spectrum": "HessianSpectrumCallback", "abs": "AdaptiveBatchSizeCallback", "hawq": "HAWQModule"}[feature]
        EXPECTED[name, feature, False] = None if why is None else rf"^{who}: the default loss .*{why}.*{LOSS}"
        EXPECTED[name, feature, True] = None
    EXPECTED[name, "adversarial", False] = None if why is None else rf"^AdversarialAugmentCallback: attack='fgsm' " \
        rf"ascends cross_entropy\(module\(x\), y\), which does not apply: {why}.*; pass attack=<callable"
EXPECTED["bert_like", "adversarial", False] = (r"^AdversarialAugmentCallback found no inputs at input_key='x' in a "
                                               r"batch that is a dict with keys .*: set input_key=")
EXPECTED["gan", "abs", True] = r"^AdaptiveBatchSizeCallback scales one optimizer's LR; found 2"
EXPECTED["hydra_mnist", "abs", False] = None  # accumulate mode: the datamodule's per-device size is its own


def run(case: Case, feature: str, with_loss: bool):
    """Fit ``feature`` on ``case`` for two steps; return the callback (or HAWQModule), module and Trainer."""
    torch.manual_seed(0)
    module = case.module()
    loss = case.loss_fn if with_loss else None
    probe = dict(probe_size=32, probe_batch_size=32, loss_fn=loss)  # one probe batch: the dense Hessian's
    callbacks, fitted = [], module
    if feature == "spectrum":
        callbacks = [HessianSpectrumCallback(plot=False, max_overhead=None, **probe)]  # 2 steps: no budget for one
    elif feature == "abs":
        callbacks = [AdaptiveBatchSizeCallback(case.max_batch_size, mode=case.abs_mode, plot=False, eig_tol=1e-4,
                                               **probe)]  # its default tolerance is 5%; here the Hessian is checked
    elif feature == "adversarial":
        callbacks = [AdversarialAugmentCallback(fraction=0.5)]
    else:
        example = case.example_input() if case.example_input is not None else None
        fitted = HAWQModule(module, budgets={"size": 0.5}, probe_size=32, loss_fn=loss, example_input=example)
    trainer = case.trainer(callbacks=callbacks, **TRAINER)
    trainer.fit(fitted, **case.data())
    return (callbacks[0] if callbacks else fitted), module, trainer


def check(case: Case, feature: str, with_loss: bool) -> None:
    expected = EXPECTED[case.name, feature, with_loss]
    if expected is not None:
        with pytest.raises(Exception) as err:
            run(case, feature, with_loss)
        message = str(err.value)
        assert re.search(expected, message) and "\n" not in message, message
        return
    done, module, trainer = run(case, feature, with_loss)
    assert trainer.global_step > 0
    if feature in ("spectrum", "abs"):
        probe = done._probe
        measured = done.history[-1]["eigenvalues"][0] if feature == "spectrum" else done.history[-1]["eigenvalue"]
        reference = dense_top_eigenvalue(module, case.loss_fn if with_loss else cross_entropy_loss, probe.batches[0])
        assert measured == pytest.approx(reference, rel=1e-3, abs=1e-6)
    elif feature == "adversarial":
        assert done.samples_attacked > 0
    else:
        assert isinstance(done, HAWQModule) and set(done.weight_bits) == set(done.layers)
        assert any(v > 0 for table in done.sensitivity.omega("trace").values() for v in table.values())


@pytest.mark.parametrize("feature, with_loss", [("spectrum", False), ("spectrum", True), ("abs", True),
                                                ("adversarial", False)])
def test_regression_model_from_the_pytorch_lightning_package(feature, with_loss):
    check(CASES["pl_regression"], feature, with_loss)


def test_per_device_batch_size_set_in_setup_is_found_before_training():
    """lightning-hydra-template turns hparams.batch_size into batch_size_per_device in setup(): growing the former
    changes nothing, which the callback found only at its first growth."""
    case = CASES["hydra_mnist"]
    module = case.module()
    trainer = case.trainer(callbacks=[AdaptiveBatchSizeCallback(128, plot=False)], **TRAINER)
    with pytest.raises(ValueError, match=r"^AdaptiveBatchSizeCallback: mode='dataloader' grows MNISTDataModule."
                                         r"hparams.batch_size, but MNISTDataModule.train_dataloader\(\) does not "
                                         r"follow it \(with MNISTDataModule.hparams.batch_size=64 it built a loader of "
                                         r"batch_size=32; .*mode='accumulate'"):
        trainer.fit(module, datamodule=hydra_template.MNISTDataModule(batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("feature, with_loss", [("spectrum", False), ("spectrum", True), ("abs", False),
                                                ("abs", True), ("adversarial", False), ("hawq", False),
                                                ("hawq", True)])
def test_every_feature_on_every_outside_module(name, feature, with_loss):
    check(CASES[name], feature, with_loss)
