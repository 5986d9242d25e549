"""KFACPreconditioner (pure torch) and KFACCallback (Lightning): the update against a dense Kronecker solve, its
schedule, accumulation, loss scaling, KL clipping, skipped layers, and exact resume."""

from __future__ import annotations

import io
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_hessian.hessian import KFACOperator
from lightning_hessian.models import MNIST1DCNN
from lightning_hessian.optim import KFACCallback, KFACPreconditioner

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 40, generator=G, dtype=torch.float64), torch.randint(0, 10, (64,), generator=G)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MNIST1DCNN(channels=4).double()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def loop(model: nn.Module, precond: KFACPreconditioner, batches: list[slice], accumulate: int = 1) -> None:
    """A plain training loop with the preconditioner between backward and ``optimizer.step``."""
    opt = sgd(model)
    for rows in batches:
        opt.zero_grad()
        micro = torch.arange(rows.start, rows.stop).chunk(accumulate)
        for idx in micro:
            (F.cross_entropy(model(X[idx]), Y[idx]) / accumulate).backward()
        precond.step(opt)
        opt.step()


def dense_solve(A: torch.Tensor, G: torch.Tensor, M: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G (x) A + damping I)^{-1} vec(M)`` for ``M`` laid out ``(out, d_A)`` row by row."""
    K = torch.kron(G, A) + damping * torch.eye(M.numel(), dtype=M.dtype)
    return torch.linalg.solve(K, M.reshape(-1)).reshape(M.shape)


def test_first_step_is_the_damped_kronecker_solve_with_the_empirical_factors() -> None:
    model = net()
    precond = KFACPreconditioner(model, damping=0.05, kl_clip=None)
    F.cross_entropy(model(X[:16]), Y[:16]).backward()
    raw = {name: torch.cat([s.params[0].grad.reshape(s.layer.out, -1), s.params[1].grad[:, None]], 1)
           for name, s in precond.layers.items()}
    precond.step()
    reference = KFACOperator(net(), lambda m, b: F.cross_entropy(m(b[0]), b[1]), (X[:16], Y[:16]),
                             fisher_type="empirical")
    for name, s in precond.layers.items():
        A, Gf = reference.factors[name]
        torch.testing.assert_close(s.A, A, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(s.G, Gf, rtol=1e-12, atol=1e-15)
        expected = dense_solve(A, Gf, raw[name], 0.05)
        got = torch.cat([s.params[0].grad.reshape(s.layer.out, -1), s.params[1].grad[:, None]], 1)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_kl_clip_scales_by_the_published_rule() -> None:
    model, free = net(), net()
    clipped = KFACPreconditioner(model, damping=0.05, kl_clip=1e-6)
    plain = KFACPreconditioner(free, damping=0.05, kl_clip=None)
    for m, p in ((model, clipped), (free, plain)):
        opt = sgd(m)
        F.cross_entropy(m(X[:16]), Y[:16]).backward()
        raw = [q.grad.clone() for q in m.parameters()]
        p.step(opt)
    vg = sum(0.1**2 * float((q.grad * g).sum()) for q, g in zip(free.parameters(), raw))
    nu = min(1.0, math.sqrt(1e-6 / vg))
    assert nu < 0.5
    for a, b in zip(model.parameters(), free.parameters()):
        torch.testing.assert_close(a.grad, nu * b.grad, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="kl_clip needs the learning rate"):
        clipped.step()


def test_accumulated_micro_batches_and_a_scaled_loss_give_the_step_of_the_whole_batch() -> None:
    batches = [slice(0, 16), slice(16, 32), slice(32, 48)]
    whole, accumulated = net(), net()
    loop(whole, KFACPreconditioner(whole, inv_update_steps=2), batches)
    loop(accumulated, KFACPreconditioner(accumulated, inv_update_steps=2), batches, accumulate=4)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (whole.classifier.weight - net().classifier.weight).abs().max() > 1e-5  # far above the 1e-12 above

    scaled = net()  # AMP-style: the loss times S, the gradients divided by S before the step
    precond, opt = KFACPreconditioner(scaled, inv_update_steps=2), sgd(scaled)
    for rows in batches:
        opt.zero_grad()
        (1024.0 * F.cross_entropy(scaled(X[rows]), Y[rows])).backward()
        for p in scaled.parameters():
            p.grad /= 1024.0
        precond.step(opt, grad_scale=1024.0)
        opt.step()
    for a, b in zip(whole.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_update_intervals_and_running_averages() -> None:
    model = net()
    precond = KFACPreconditioner(model, factor_update_steps=2, inv_update_steps=3, factor_decay=0.7, kl_clip=None)
    opt = sgd(model)
    captured, factors, eigen_of = [], {}, {}
    for step in range(5):
        rows = slice(8 * step, 8 * step + 8)
        before = {n: s.A.clone() for n, s in precond.layers.items() if s.A is not None}
        opt.zero_grad()
        F.cross_entropy(model(X[rows]), Y[rows]).backward()
        captured.append(any(s.rows for s in precond.layers.values()))
        if step % 2 == 0:
            factors[step] = KFACOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (X[rows], Y[rows]),
                                         fisher_type="empirical").factors["classifier"][0]
        precond.step(opt)
        eigen_of[step] = precond.layers["classifier"].eigen
        if step % 2:
            assert all(torch.equal(s.A, before[n]) for n, s in precond.layers.items())
        opt.step()
    assert captured == [True, False, True, False, True]  # the hooks only capture on factor-update steps
    expected = 0.7 * (0.7 * factors[0] + 0.3 * factors[2]) + 0.3 * factors[4]
    torch.testing.assert_close(precond.layers["classifier"].A, expected, rtol=1e-12, atol=1e-15)
    assert eigen_of[1] is eigen_of[0] and eigen_of[2] is eigen_of[0] and eigen_of[3] is not eigen_of[2]
    assert eigen_of[4] is eigen_of[3] and precond.steps == 5


def test_state_dict_loads_with_weights_only_and_resumes_exactly() -> None:
    batches = [slice(8 * i, 8 * i + 8) for i in range(6)]
    straight = net()
    loop(straight, KFACPreconditioner(straight, factor_update_steps=2, inv_update_steps=3), batches)

    first = net()
    precond, opt = KFACPreconditioner(first, factor_update_steps=2, inv_update_steps=3), sgd(first)
    for rows in batches[:3]:
        opt.zero_grad()
        F.cross_entropy(first(X[rows]), Y[rows]).backward()
        precond.step(opt)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "kfac": precond.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = net(seed=1)
    resumed.load_state_dict(saved["model"])
    precond, opt = KFACPreconditioner(resumed, factor_update_steps=2, inv_update_steps=3), sgd(resumed)
    opt.load_state_dict(saved["opt"])
    precond.load_state_dict(saved["kfac"])
    for rows in batches[3:]:
        opt.zero_grad()
        F.cross_entropy(resumed(X[rows]), Y[rows]).backward()
        precond.step(opt)
        opt.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_attention_projections_are_skipped_and_left_unchanged() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Block()
    precond = KFACPreconditioner(model, kl_clip=None)
    assert set(precond.layers) == {"head"} and {"attn", "attn.out_proj"} <= set(precond.skipped)
    F.cross_entropy(model(torch.randn(4, 5, 8)), torch.tensor([0, 1, 2, 0])).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    precond.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, raw[name]) == name.startswith("attn"), name


def test_a_layer_applied_twice_is_expanded_over_its_calls_like_the_operator() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head = nn.Linear(40, 40), nn.Linear(40, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    torch.manual_seed(0)
    model = Twice().double()
    precond = KFACPreconditioner(model, kl_clip=None)
    F.cross_entropy(model(X[:16]), Y[:16]).backward()
    assert precond.layers["shared"].rows == 32  # two calls of 16 rows, one pass of 16 samples
    precond.step()
    precond.remove()  # ungated hooks would also watch the operator's own backward passes
    op = KFACOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (X[:16], Y[:16]), fisher_type="empirical")
    for name, s in precond.layers.items():
        torch.testing.assert_close(s.A, op.factors[name][0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(s.G, op.factors[name][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": -1.0}, "damping"), ({"factor_decay": 1.0}, "factor_decay"), ({"kl_clip": 0.0}, "kl_clip"),
    ({"inv_update_steps": 0}, "inv_update_steps"), ({"kfac_approx": "full"}, "kfac_approx"),
])
def test_bad_arguments_name_themselves(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(net(), **kwargs)
    with pytest.raises(ValueError, match=match):
        KFACCallback(**kwargs)


# ---------------------------------------------------------------------------------------------- Lightning
class Module(pl.LightningModule):
    def __init__(self, manual: bool = False, optimizers: int = 1) -> None:
        super().__init__()
        self.net = net()
        self.automatic_optimization = not manual
        self.num_optimizers = optimizers

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return sgd(self) if self.num_optimizers == 1 else [sgd(self.net.features), sgd(self.net.classifier)]


class ExtraBackward(Callback):
    """A probe that runs its own forward and backward through the model before each step (as an attack does)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[0].clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(pl_module.net(x), batch[1]), x)


def fit(module: pl.LightningModule, epochs: int = 1, batch_size: int = 16, callbacks=(), ckpt_path=None,
        **kwargs) -> pl.Trainer:
    kfac = KFACCallback(inv_update_steps=2)
    kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, precision="64-true", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[kfac, *callbacks], **kwargs)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch_size)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("setting", ["automatic", "manual", "accumulate", "extra backward"])
def test_callback_takes_the_steps_of_the_plain_loop(setting: str) -> None:
    module = Module(manual=setting == "manual")
    if setting == "accumulate":
        fit(module, batch_size=8, accumulate_grad_batches=2)
    else:
        fit(module, callbacks=[ExtraBackward()] if setting == "extra backward" else ())
    reference = net()
    loop(reference, KFACPreconditioner(reference, inv_update_steps=2), [slice(i, i + 16) for i in range(0, 64, 16)])
    for a, b in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (reference.classifier.weight - net().classifier.weight).abs().max() > 1e-5  # far above the 1e-12 above
    assert not any(h for s in module.net.modules() for h in s._forward_hooks.values())  # hooks removed after fit


def test_checkpoint_loads_with_weights_only_and_resume_is_exact(tmp_path) -> None:
    straight = Module()
    fit(straight, epochs=2)
    first = Module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit(first, epochs=1, callbacks=[checkpoint], enable_checkpointing=True)
    path = tmp_path / "epoch=0-step=4.ckpt"
    state = torch.load(path, weights_only=True)
    assert state["callbacks"]["KFACCallback"]["steps"] == 4
    resumed = Module()
    resumed.net = net(seed=1)
    trainer = fit(resumed, epochs=2, ckpt_path=str(path))
    assert trainer.callbacks[0].preconditioner.steps == 8
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)


def test_callback_refuses_several_optimizers() -> None:
    with pytest.raises(ValueError, match="preconditions one optimizer"):
        fit(Module(manual=True, optimizers=2))


def test_mixed_precision_factors_match_full_precision_with_the_loss_scale_divided_out() -> None:
    """fp16 AMP multiplies the loss by 65536 before the backward the hooks watch; the factors come out as in fp32."""
    factors = {}
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        module = Module()
        module.net = net().float()
        kfac = KFACCallback(inv_update_steps=2)
        plugins = [MixedPrecision("16-mixed", "cpu")] if precision == "16-mixed" else None
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", precision=None if plugins else precision, plugins=plugins,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[kfac])
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X.float(), Y), batch_size=16))
        assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == (precision == "16-mixed")
        factors[precision] = {n: (s.A, s.G) for n, s in kfac.preconditioner.layers.items()}
    for precision, tol in (("16-mixed", 2e-3), ("bf16-mixed", 1e-2)):  # relative Frobenius errors of the rounding
        for name, reference in factors["32-true"].items():
            for got, ref in zip(factors[precision][name], reference):
                assert (got - ref).norm() <= tol * ref.norm(), (precision, name)
