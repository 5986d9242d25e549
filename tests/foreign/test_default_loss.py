"""The default Hessian loss cross_entropy(module(x), y) applies only where it is right; elsewhere every feature
fails before training with one line that says why and names loss_fn= and hessian_loss."""

from __future__ import annotations

import re

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import AdaptiveBatchSizeCallback, AdversarialAugmentCallback, HAWQModule, HessianSpectrumCallback
from lightning_hessian.probe_set import DefaultLossError, check_loss, cross_entropy_loss, resolve_loss_fn
from tests.foreign import bert_like, boring, cli_models, gan, language_model, pl_regression

TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
FIX = r"pass loss_fn=<callable \(module, batch\) -> mean loss> or define hessian_loss\(self, batch\)"


def squared_error(prediction, target):
    return ((prediction - target) ** 2).mean()


class Regressor(L.LightningModule):
    """A regression written so its class code names no torch loss: only the shapes can tell."""

    def __init__(self, outputs: int = 1, criterion=squared_error):
        super().__init__()
        self.net = nn.Linear(5, outputs)
        self.criterion = criterion
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return self.criterion(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Probabilities(Regressor):
    def forward(self, x):
        return self.net(x).softmax(-1)


def regression_data(targets: torch.Tensor) -> DataLoader:
    x = torch.randn(len(targets), 5, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, targets), batch_size=16)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "loss_fn=" in message and "hessian_loss" in message
    return message


@pytest.mark.parametrize("module, batch, why", [
    (Regressor(1), (torch.randn(8, 5), torch.randn(8, 1)),
     r"integer class labels y, but Regressor's batches hold a float32 tensor of shape \(8, 1\) \(a regression target"),
    (Regressor(3), (torch.randn(8, 5), torch.randn(8, 3)), r"float32 tensor of shape \(8, 3\) \(a regression"),
    (Regressor(1), (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)),
     r"logits of shape \(N, classes >= 2\).*returns a float32 tensor of shape \(8, 1\) \(one output: cross-entropy "
     r"over one class is 0\)"),
    (Regressor(4), (torch.randn(8, 5), torch.arange(8)), r"labels y in \[0, 4\).*y holds 4\.\.7"),
    (Probabilities(4), (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), r"returns probabilities"),
    (Regressor(4), [torch.randn(8, 5)], r"needs \(x, y\) batches, but Regressor's batches are lists of length 1"),
    (bert_like.GLUETransformer(), next(iter(DataLoader(bert_like.TokenClassificationData(), 8))),
     r"batches are dicts with keys \['input_ids', 'attention_mask', 'labels'\]"),
])
def test_the_default_loss_refuses_batches_and_outputs_it_does_not_fit(module, batch, why):
    loss = resolve_loss_fn(module, None, "HessianSpectrumCallback")
    assert loss is cross_entropy_loss  # nothing in the module's code says otherwise: its batch must
    with pytest.raises(DefaultLossError, match=rf"^HessianSpectrumCallback: .*{why}.*{FIX}") as err:
        check_loss(loss, module, [batch], "HessianSpectrumCallback")
    one_line(err)


@pytest.mark.parametrize("module, why", [
    (boring.BoringModel(), "BoringModel's code trains with mse_loss, not cross-entropy"),
    (cli_models.LitAutoEncoder(), "LitAutoEncoder's code trains with mse_loss, not cross-entropy"),
    (gan.GAN(), "GAN's code trains with binary_cross_entropy_with_logits, not cross-entropy"),
    (pl_regression.RegressionModel(), "RegressionModel's code trains with mse_loss"),
    (language_model.LightningTransformer(), "LightningTransformer defines no forward(), which the default calls"),
    (Regressor(4, criterion=nn.SmoothL1Loss()), "Regressor's code trains with SmoothL1Loss"),
])
def test_the_module_tells_the_default_does_not_apply(module, why):
    """The autoencoder's embedding is wider than its labels: only its code (mse_loss) shows it is no classifier."""
    expected = rf"^AdaptiveBatchSizeCallback: the default loss .*{re.escape(why)}.*{FIX}"
    with pytest.raises(DefaultLossError, match=expected) as err:
        resolve_loss_fn(module, None, "AdaptiveBatchSizeCallback")
    one_line(err)
    assert resolve_loss_fn(module, squared_error, "x") is squared_error  # an explicit loss_fn is never second-guessed


def test_where_it_applies_it_is_plain_cross_entropy_and_says_so(caplog):
    module = cli_models.LitClassifier()
    x, y = torch.randn(8, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, -100])  # -100: cross_entropy's ignore_index
    loss = resolve_loss_fn(module, None, "HessianSpectrumCallback")
    with caplog.at_level("INFO"):
        value = check_loss(loss, module, [(x, y)], "HessianSpectrumCallback")
    assert value == F.cross_entropy(module(x), y)
    assert "default loss cross_entropy(module(x), y) with LitClassifier's output as logits over 4 classes" \
        in caplog.text


class Wide(Regressor):
    """Its net expects 8 features; the data have 5."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 3)


def test_a_failing_forward_is_named_with_the_callback_and_the_fix():
    data = regression_data(torch.randint(0, 3, (32,)))
    module = Wide()
    with pytest.raises(DefaultLossError, match=r"^HessianSpectrumCallback: the default loss cross_entropy\(module\("
                       r"x\), y\) failed in Wide\(x\) on the first probe batch \(RuntimeError: mat1 and mat2 shapes "
                       rf"cannot be multiplied .*\); {FIX}") as err:
        L.Trainer(callbacks=[HessianSpectrumCallback(plot=False)], **TRAINER).fit(module, data)
    one_line(err)
    assert module.steps == 0  # before any training step
    with pytest.raises(ValueError, match=r"^AdversarialAugmentCallback \(attack\): Wide\(x\) failed on the batch's "
                                         r"inputs \(RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        L.Trainer(callbacks=[AdversarialAugmentCallback()], **TRAINER).fit(Wide(), data)


def test_one_output_with_integer_targets_fails_every_feature_before_training():
    """Cross-entropy over one output is 0 whatever the weights: the eigenvalues were logged as 0.0, the batch grew on
    them and HAWQ planned from an all-zero sensitivity table."""
    data = regression_data(torch.randint(0, 3, (32,)))
    for who, callbacks in (("HessianSpectrumCallback", [HessianSpectrumCallback(plot=False)]),
                           ("AdaptiveBatchSizeCallback", [AdaptiveBatchSizeCallback(32, mode="accumulate",
                                                                                    plot=False)])):
        module = Regressor(1)
        with pytest.raises(DefaultLossError, match=rf"^{who}: .*\(one output: cross-entropy over one class is 0\)"):
            L.Trainer(callbacks=callbacks, **TRAINER).fit(module, data)
        assert module.steps == 0
    module = Regressor(1)
    with pytest.raises(DefaultLossError, match=r"^HAWQModule: .*one output"):
        L.Trainer(**TRAINER).fit(HAWQModule(module, budgets={"size": 0.5}, probe_size=32), data)
    assert module.steps == 0
    with pytest.raises(ValueError, match=r"^AdversarialAugmentCallback \(attack\): pl_module\(x\) must return logits "
                                         r"of shape \(16, classes >= 2\) for the attacks, got a torch.float32 tensor "
                                         r"of shape \(16, 1\); pass attack=<callable"):
        L.Trainer(callbacks=[AdversarialAugmentCallback()], **TRAINER).fit(Regressor(1), data)


def test_hawq_refuses_an_all_zero_sensitivity_table():
    module = cli_models.LitClassifier()
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))

    def detached(model, batch):  # a loss the layers do not compute: its Hessian is 0
        return F.cross_entropy(model(batch[0]).detach(), batch[1]) + 0 * sum(p.sum() for p in model.parameters())

    hawq = HAWQModule(module, budgets={"size": 0.5}, loss_fn=detached, metric="quadratic")
    with pytest.raises(ValueError, match=r"^HAWQModule: every layer's Hessian sensitivity \(quadratic\) is 0 on the "
                                         r"probe set.*pass a loss_fn that the layers compute"):
        hawq.plan([(x, y)])
