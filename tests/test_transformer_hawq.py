"""HAWQModule on a transformer with dict batches: every projection quantized, the Q-BERT plan equal to brute force,
the fine-tuned model in the integer simulation and in ONNX; group-wise linear layers and embeddings in ONNX."""

import itertools
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from lightning_hessian import HAWQModule
from lightning_hessian.models.transformer import MNIST1DTransformer
from lightning_hessian.quant import (
    WeightGroups,
    calibrate,
    export_onnx,
    quantize_model,
    size_costs,
    to_integer_model,
)
from lightning_hessian.quant.layers import QuantEmbedding, QuantLinear

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


class DictTransformer(LightningModule):
    """A tiny transformer classifier trained on ``{"signal", "label"}`` batches."""

    def __init__(self):
        super().__init__()
        self.net = MNIST1DTransformer(length=16, patch=4, dim=8, heads=2, layers=1, mlp=16, num_classes=3)

    def forward(self, signal):
        return self.net(signal)

    def hessian_loss(self, batch):
        return F.cross_entropy(self(batch["signal"]), batch["label"])

    def training_step(self, batch, batch_idx):
        return self.hessian_loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :8].sum(1) > 0).long() + (x[:, 8:].sum(1) > 1).long()
    return [{"signal": x[i], "label": y[i]} for i in range(n)]


def test_hawq_plans_with_qbert_fits_and_exports_a_transformer_on_dict_batches(tmp_path):
    torch.manual_seed(0)
    module, data = DictTransformer(), _data()
    x = torch.stack([d["signal"] for d in data])
    hawq = HAWQModule(module, budgets={"size": 0.5}, bit_choices=(2, 4, 8), metric="qbert", probe_size=32,
                      probe_batch_size=8, example_input=x[:4], groups={"rows": 2}, report_dir=tmp_path)
    assert "net.encoder.layers.0.self_attn.q_proj" in hawq.layers and "net.position" in hawq.layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, max_epochs=1, limit_train_batches=2).fit(
            hawq, DataLoader(data, batch_size=16, shuffle=True))
    assert not [w for w in caught if "left in float" in str(w.message)]
    assert set(hawq.weight_bits) == set(hawq.layers) and len(hawq.sensitivity.subsample_eigenvalues["net.head"]) == 4
    net = hawq.module.net
    assert isinstance(net.encoder.layers[0].self_attn.v_proj, QuantLinear) and isinstance(net.position, QuantEmbedding)
    assert net.encoder.layers[0].linear1.weight_groups == WeightGroups(rows=2)
    # the plan is the brute-force optimum of the measured Q-BERT sensitivities under the size budget
    omega, size = hawq.sensitivity.omega("qbert"), size_costs(hawq.stats, (2, 4, 8))
    budget = sum(size[n][2] for n in size) + 0.5 * sum(size[n][8] - size[n][2] for n in size)
    names = list(omega)
    best = min((sum(omega[n][b] for n, b in zip(names, bits)), bits) for bits in
               itertools.product((2, 4, 8), repeat=len(names))
               if sum(size[n][b] for n, b in zip(names, bits)) <= budget)
    assert sum(omega[n][hawq.weight_bits[n]] for n in names) == pytest.approx(best[0], rel=1e-9)
    integer = to_integer_model(net, x[:16], float_ops=True)
    with torch.no_grad():
        deployed, fake = integer(x), net.eval()(x)
    torch.testing.assert_close(deployed, fake, rtol=0, atol=1e-3 * float(fake.abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # onnxruntime predicts what the integer model does
        path = export_onnx(integer, x[:16], tmp_path / "transformer.onnx")
    got = _ort(path, x)
    assert torch.equal(got.argmax(1), deployed.argmax(1))
    torch.testing.assert_close(got, deployed, rtol=0, atol=0.05 * float(deployed.abs().max()))


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(12, 16)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8 * 5, 3)

    def forward(self, tokens):
        return self.b(torch.relu(self.a(self.embedding(tokens))).flatten(1))


@pytest.mark.parametrize("bits", [4, 8])
def test_group_wise_linear_and_embedding_export_bit_exact(bits, tmp_path):
    torch.manual_seed(bits)
    tokens = torch.randint(12, (32, 5))
    qmodel, report = quantize_model(TokenNet(), bits, groups={"embedding": {"columns": 4}, "a": {"columns": 4},
                                                              "b": {"rows": 3}})
    assert set(report.groups) == {"embedding", "a", "b"} and not report.float_layers
    assert report.embeddings == ["embedding"] and set(report.layer_act_bits) == {"a", "b"}
    calibrate(qmodel, [tokens])
    qmodel.eval()
    integer = to_integer_model(qmodel, tokens)
    assert not integer.float_islands
    with torch.no_grad():
        deployed, fake = integer(tokens), qmodel(tokens)
    torch.testing.assert_close(deployed, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
    path = export_onnx(integer, tokens, tmp_path / "tokens.onnx")
    assert torch.equal(_ort(path, tokens), deployed)


@pytest.mark.slow
def test_transformer_hawq_recipe_trains_quantizes_and_exports(tmp_path, data_dir):
    import json

    from lightning_hessian import recipes
    from tests.helpers.config import compose_config

    small = ["experiment=transformer_hawq", "data.num_train=400", "data.num_test=100", "data.batch_size=50"]
    train_dir, out = tmp_path / "train", tmp_path / "quantize"
    net = ["model.net.dim=8", "model.net.heads=2", "model.net.layers=1", "model.net.mlp=16"]
    recipes.train(compose_config("train", [*small, *net, "trainer.max_epochs=2", "test=false"], train_dir, data_dir))
    overrides = [*small, *net, f"ckpt_path={train_dir}/checkpoints/last.ckpt", "hawq.probe_size=100",
                 "hawq.probe_batch_size=25", "trainer.max_epochs=1", f"hawq.cache_dir={tmp_path}/cache"]
    report = recipes.quantize(compose_config("quantize", overrides, out, data_dir))
    assert len(report["weight_bits"]) == 9 and set(report["weight_bits"].values()) <= {2, 4, 8}
    assert "net.encoder.layers.0.self_attn.q_proj" in report["weight_bits"]
    assert json.loads((out / "quantize_report.json").read_text())["weight_groups"]["net.head"] == "groups of 2 rows"
    assert (out / "model_int.onnx").exists()
    assert report["integer"]["test/acc"] == pytest.approx(report["quantized"]["test/acc"], abs=0.02)
