"""HAWQModule around modules written the way other projects write them: a GAN with manual optimization and a
``training_step(self, batch)``, a language model without ``forward``, dict batches, a ``pytorch_lightning`` module
and Trainer, a classifier with BatchNorm and a loss module."""

from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import pytorch_lightning as PL
import torch
from torch.utils.data import DataLoader

from lightning_hessian import HAWQModule
from lightning_hessian.quant.costs import layer_stats
from lightning_hessian.quant.integer import to_integer_model
from lightning_hessian.quant.modules import QuantLinear, fold_batchnorm
from lightning_hessian.quant.quantizers import quantize_weight
from tests.foreign import bert_like, gan, hydra_template, language_model, pl_regression
from tests.foreign.reference import dense_hessian

TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)


def test_gan_with_manual_optimization_and_no_batch_idx():
    torch.manual_seed(0)
    module = gan.GAN()
    hawq = HAWQModule(module, budgets={"size": 0.5}, loss_fn=gan.discriminator_loss, metric="quadratic",
                      example_input=torch.zeros(4, 4))  # the generator's input: the batches hold images
    before = {n: p.detach().clone() for n, p in hawq.named_parameters()}
    L.Trainer(**TRAINER).fit(hawq, DataLoader(gan.gan_data(), batch_size=32, shuffle=True))
    assert set(hawq.weight_bits) == {"generator.model.0", "generator.model.2", "discriminator.model.0",
                                     "discriminator.model.2"}
    changed = {n.split(".")[1] for n, p in hawq.named_parameters() if not torch.equal(p, before.get(n, p))}
    assert changed == {"generator", "discriminator"}  # both optimizers stepped the quantized copies
    assert hawq.stats["generator.model.0"].macs == 4 * 16  # costed on the generator's input, not on the images


def test_gan_without_example_input_says_what_to_pass():
    hawq = HAWQModule(gan.GAN(), budgets={"size": 0.5}, loss_fn=gan.discriminator_loss, metric="quadratic")
    with pytest.raises(ValueError, match=r"^HAWQModule: the layer costs ran example_input through GAN.forward, which "
                                         r"failed \(RuntimeError: mat1 and mat2 shapes cannot be multiplied.*pass "
                                         r"example_input="):
        L.Trainer(**TRAINER).fit(hawq, DataLoader(gan.gan_data(), batch_size=32))


def test_language_model_without_forward_is_costed_and_calibrated_through_its_loss():
    torch.manual_seed(0)
    module = language_model.LightningTransformer()
    loader = language_model.lm_loader()
    hawq = HAWQModule(module, budgets={"size": 0.5}, loss_fn=language_model.lm_loss, metric="quadratic",
                      act_bits="follow", probe_size=32)
    L.Trainer(**TRAINER).fit(hawq, loader)
    inputs = hawq._probe_batches()[0][0]
    expected = layer_stats(module.model, inputs)  # the inner model's own forward on the probe batch
    assert {name: s.macs for name, s in hawq.stats.items()} == {f"model.{n}": s.macs for n, s in expected.items()}
    assert set(hawq.weight_bits) == {"model.encoder.layers.0.linear1", "model.encoder.layers.0.linear2",
                                     "model.decoder"}
    assert isinstance(hawq.module.model.decoder, QuantLinear) and hawq._calibrated()
    with pytest.raises(ValueError, match="distill_weight > 0 distils the logits of LightningTransformer.forward, "
                                         "which it does not define: pass distill_weight=0"):
        HAWQModule(module, bits=8, loss_fn=language_model.lm_loss, distill_weight=0.5)


def test_pytorch_lightning_module_and_trainer(tmp_path):
    """A pytorch_lightning module gives a HAWQModule a pytorch_lightning.Trainer fits, tests and reloads; its exact
    sensitivities equal dW^T H dW from the dense Hessian."""
    torch.manual_seed(0)
    module = pl_regression.RegressionModel()
    data = pl_regression.RegressionData()
    probe = [(data.x, data.y)]
    hawq = HAWQModule(module, budgets={"size": 0.5}, bit_choices=(2, 8), loss_fn=pl_regression.mse_loss,
                      metric="quadratic", probe_data=probe)
    assert isinstance(hawq, PL.LightningModule) and isinstance(hawq, HAWQModule)
    trainer = PL.Trainer(**{**TRAINER, "enable_checkpointing": True, "default_root_dir": tmp_path})
    trainer.fit(hawq, datamodule=data)
    for name in ("net.0", "net.2"):
        weight = module.get_submodule(name).weight.detach()
        hessian = dense_hessian(module, pl_regression.mse_loss, probe[0], names=[f"{name}.weight"])
        for bits in (2, 8):
            d = (quantize_weight(weight, bits) - weight).reshape(-1)
            assert hawq.sensitivity.quadratic[name][bits] == pytest.approx(float(d @ hessian @ d), rel=1e-4)
    fitted = trainer.validate(hawq, datamodule=data, verbose=False)[0]["val_loss"]
    restored = HAWQModule(pl_regression.RegressionModel(), loss_fn=pl_regression.mse_loss, probe_data=probe)
    reloaded = PL.Trainer(**TRAINER).validate(restored, datamodule=data, verbose=False,
                                              ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert restored.weight_bits == hawq.weight_bits and reloaded[0]["val_loss"] == pytest.approx(fitted)


def test_dict_batches_are_costed_through_forward_keywords():
    torch.manual_seed(0)
    dm = bert_like.GLUEDataModule()
    hawq = HAWQModule(bert_like.GLUETransformer(), budgets={"size": 0.5}, loss_fn=bert_like.bert_loss,
                      metric="quadratic", probe_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(**TRAINER).fit(hawq, datamodule=dm)
    assert hawq.stats["model.layer.intermediate"].macs == 10 * 8 * 16  # per sample: 10 tokens x 8 x 16
    left = [str(w.message) for w in caught if "left in float" in str(w.message)]
    # layers with weights only: not the functional softmax, gelu and tanh, nor the loss computed in forward
    assert len(left) == 1 and all(name in left[0] for name in ("word_embeddings", "embedding_norm"))
    assert "softmax" not in left[0] and "gelu" not in left[0] and "tanh" not in left[0]


def test_batchnorm_classifier_warns_of_no_loss_or_activation_module_and_exports_after_folding():
    torch.manual_seed(0)
    module, dm = hydra_template.mnist_module(), hydra_template.MNISTDataModule()
    hawq = HAWQModule(module, bits=8, probe_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(**TRAINER).fit(hawq, datamodule=dm)
    assert not [w for w in caught if "left in float" in str(w.message)]  # criterion, ReLUs, BatchNorm, metrics
    net = hawq.module.net
    x = torch.stack([dm.data_val[i][0] for i in range(16)])
    with pytest.raises(ValueError, match=r"BatchNorm layers \['model.1', 'model.4'\] are not folded: call "
                                         r"fold_batchnorm\(model, example_input\) first"):
        to_integer_model(net, x)
    fold_batchnorm(net, x)
    integer = to_integer_model(net, x)
    with torch.no_grad():  # the fake-quantized network rounds where the deployed one does
        deployed, trained = integer(x), net.eval()(x)
    assert torch.equal(deployed.argmax(1), trained.argmax(1))
    torch.testing.assert_close(deployed, trained.to(deployed.dtype), rtol=0, atol=0.05 * float(trained.abs().max()))
