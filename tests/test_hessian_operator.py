"""HessianOperator against the dense Hessian from torch.func (small MLP and CNN, float64).

The helpers at the top (``problem``, ``dense_hessian``, ``DenseOperator``) are shared by the other
``test_hessian_*`` files.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian.hessian import Batches, HessianOperator
from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP
from tests.conftest import fit_full_batch


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def teacher_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signals labelled by a fixed random linear teacher (learnable, so training shapes the Hessian)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g, dtype=torch.float64)
    w = torch.randn(40, 10, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    return x, (x @ w + 0.5 * torch.randn(n, 10, generator=g, dtype=torch.float64)).argmax(1)


def dense_hessian(model: nn.Module, loss, batch, names: list[str] | None = None) -> torch.Tensor:
    """Dense Hessian of ``loss(model, batch)`` w.r.t. the named parameters (default all), torch.func."""
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[at : at + s.numel()].reshape(s)
            at += s.numel()
        return loss(_Swap(model, params), batch)

    return jacrev(grad(f), chunk_size=256)(theta)


class _Swap(nn.Module):
    """Calls ``model`` with swapped parameters (lets ``loss(model, batch)`` run under torch.func)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.params = model, params

    def forward(self, *args):
        return functional_call(self.inner, self.params, args)


@functools.cache
def problem(kind: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A briefly trained float64 model, an evaluation batch and the dense Hessian on it (cached)."""
    torch.manual_seed(0)
    model = (MNIST1DMLP(hidden=32) if kind == "mlp" else MNIST1DCNN(channels=8)).double()
    train = teacher_batch(512, seed=1)
    fit_full_batch(model, *train, steps=60)
    batch = teacher_batch(64 if kind == "mlp" else 32, seed=2)
    return model, batch, dense_hessian(model, loss_fn, batch)


@functools.cache
def spectrum(kind: str) -> torch.Tensor:
    """Ascending eigenvalues of ``problem(kind)``'s dense Hessian (cached: eigvalsh takes seconds)."""
    return torch.linalg.eigvalsh(problem(kind)[2])


class DenseOperator:
    """A dense symmetric matrix as an operator (fast statistics tests of the estimators)."""

    def __init__(self, H: torch.Tensor):
        self.H, self.dim, self.dtype, self.device = H, H.shape[0], H.dtype, H.device
        self.num_hvps = 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_hvps += V.shape[0]
        return V.to(self.H) @ self.H  # as HessianOperator: products in the operator's dtype


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("form", ["auto", "reverse", "reverse-batched", "forward"])
def test_products_equal_dense_hessian(kind: str, form: str) -> None:
    model, batch, H = problem(kind)
    op = HessianOperator(model, loss_fn, batch, hvp=form)
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=1e-9, atol=1e-11)
    assert op.num_hvps == 4
    assert set(op.hvp_choice) == {"single", "multi"}
    # nothing is timed on the CPU: "auto" takes the reverse loop there, a fixed form is used as given
    assert op.hvp_timings == {} and op.hvp_choice["multi"] == ("reverse" if form == "auto" else form)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_auto_times_the_forms_where_batching_can_pay_once_per_model(kind: str, monkeypatch) -> None:
    from lightning_hessian.hessian import operator

    monkeypatch.setattr(HessianOperator, "_worth_timing", lambda self, which: which == "multi")  # as on a GPU
    monkeypatch.setattr(operator, "_CHOICES", {})
    model, batch, H = problem(kind)
    op = HessianOperator(model, loss_fn, batch)
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)  # the timed products are the real ones
    assert set(op.hvp_timings["multi"]) == {"reverse", "reverse-batched", "forward"} and op.num_hvps == 3
    again = HessianOperator(model, loss_fn, batch)  # the second operator reuses the first one's measurement
    torch.testing.assert_close(again.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
    assert again.hvp_timings["multi"] == op.hvp_timings["multi"] and again.hvp_choice == op.hvp_choice
    torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=1e-9, atol=1e-11)
    assert op.hvp_choice["single"] == "reverse" and "single" not in op.hvp_timings


def test_the_first_auto_product_on_the_cpu_costs_no_more_than_a_fixed_form() -> None:
    """The first call used to time every form (forward-mode's first call alone cost several products)."""
    model, batch, _ = problem("cnn")
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    calls = []
    op = HessianOperator(model, loss_fn, batch)
    op._hvp = lambda form, *args, **kw: calls.append(form) or HessianOperator._hvp(op, form, *args, **kw)
    op.matvec(V[0])
    op.matmat(V)
    assert calls == ["reverse", "reverse"]  # one call per matmat on the one batch: no timing products


def test_matmat_equals_stacked_matvecs_and_chunks() -> None:
    model, batch, _ = problem("mlp")
    op = HessianOperator(model, loss_fn, batch, hvp="reverse-batched", chunk_size=2)
    V = torch.randn(5, op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), torch.stack([op.matvec(v) for v in V]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_batches_weighted_by_sample_count_equal_the_concatenated_batch(cache_graph: bool) -> None:
    model, (x, y), H = problem("mlp")
    V = torch.randn(2, H.shape[0], generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    shards = [(x[:10], y[:10]), (x[10:50], y[10:50]), (x[50:], y[50:])]  # 10, 40, 14 samples
    op = HessianOperator(model, loss_fn, shards, cache_graph=cache_graph)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)  # 24, 24, 16
    op = HessianOperator(model, loss_fn, loader, cache_graph=cache_graph)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        assert op.loss() == pytest.approx(float(loss_fn(model, (x, y))), rel=1e-12)


def test_dict_batches_generators_and_batch_size_fn() -> None:
    model, (x, y), H = problem("mlp")

    def dict_loss(m: nn.Module, b: dict) -> torch.Tensor:
        return F.cross_entropy(m(b["signal"]), b["label"])

    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    batches = ({"label": y[i : i + 16], "signal": x[i : i + 16]} for i in range(0, 64, 16))  # a generator
    op = HessianOperator(model, dict_loss, batches)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-11)
    # one dict batch with a scalar entry first: the batch size comes from batch_size_fn
    one = {"scale": torch.tensor(1.0), "signal": x, "label": y}
    op = HessianOperator(model, dict_loss, one, batch_size_fn=lambda b: len(b["label"]))
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="batch_size_fn"):
        HessianOperator(model, dict_loss, one).matvec(v)


def test_leaves_no_trace_and_works_under_inference_mode() -> None:
    model, (x, y), H = problem("cnn")
    model.train()
    frozen = model.features[0].bias
    frozen.requires_grad_(False)
    try:
        v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4), dtype=x.dtype)
        with torch.inference_mode():
            xi, yi = x.clone(), y.clone()  # inference tensors, as Lightning's validation loop makes them
            op = HessianOperator(model, loss_fn, (xi, yi), params=[n for n, _ in model.named_parameters()])
            hv = op.matvec(v)
        torch.testing.assert_close(hv, H @ v, rtol=1e-9, atol=1e-11)
        with torch.no_grad():
            torch.testing.assert_close(op.matmat(v[None])[0], H @ v, rtol=1e-9, atol=1e-11)
        assert all(p.grad is None for p in model.parameters())
        assert not frozen.requires_grad and model.training
        # the default selection skips the frozen parameter
        assert "features.0.bias" not in HessianOperator(model, loss_fn, (x, y)).names
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_parameter_selection_by_pattern_module_and_name() -> None:
    model, batch, H = problem("mlp")
    op_all = HessianOperator(model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, batch, params=["net.4", "net.0.weight"])
    assert op.names == ["net.0.weight", "net.4.weight", "net.4.bias"]
    assert HessianOperator(model, loss_fn, batch, params=["*.bias"]).names == ["net.0.bias", "net.2.bias", "net.4.bias"]
    assert HessianOperator(model, loss_fn, batch, params=[model.net[4]]).names == ["net.4.weight", "net.4.bias"]
    idx = torch.cat([torch.arange(op_all.dim)[op_all.slices[n]] for n in op.names])
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H[idx][:, idx] @ v, rtol=1e-9, atol=1e-11)
    parts = op.unflatten(v)
    assert [p.shape for p in parts] == [p.shape for p in op.params]
    torch.testing.assert_close(op.flatten(parts), v)
    torch.testing.assert_close(op.flatten(dict(zip(op.names, parts))), v)


def test_attention_model_uses_math_sdpa() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.head = nn.Linear(4, 12), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, -1)
            return self.head(F.scaled_dot_product_attention(q, k, v).mean(1))

    torch.manual_seed(0)
    model = Attn().double()
    x, y = torch.randn(8, 5, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with sdpa_kernel(SDPBackend.MATH):
        H = dense_hessian(model, loss_fn, (x, y))
    op = HessianOperator(model, loss_fn, (x, y), hvp="auto")
    V = torch.randn(2, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)


def test_bad_input_is_named() -> None:
    model, batch, _ = problem("mlp")
    with pytest.raises(ValueError, match="matches no parameter"):
        HessianOperator(model, loss_fn, batch, params=["nope.*"])
    with pytest.raises(ValueError, match="hvp"):
        HessianOperator(model, loss_fn, batch, hvp="fast")
    with pytest.raises(ValueError, match="no samples"):
        HessianOperator(model, loss_fn, []).matvec(torch.zeros(sum(p.numel() for p in model.parameters())))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batch).matvec(
            torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        )
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator(frozen, loss_fn, batch)
    with pytest.raises(ValueError, match="op.dim"):
        HessianOperator(model, loss_fn, batch).unflatten(torch.zeros(3))


def test_auto_skips_a_form_the_model_cannot_run(monkeypatch) -> None:
    # BatchNorm in train mode updates its running statistics in place, which torch.func's forward-mode
    # transform refuses; "auto" must fall back to double backward and still be exact.
    torch.manual_seed(0)
    model = MNIST1DCNN(channels=4, batch_norm=True).double().train()
    x, y = teacher_batch(16, seed=3)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model, (x, y)), params, create_graph=True)
    eye = torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    rows = []  # a dense reference by plain autograd (torch.func cannot run this model either)
    for e in eye:
        parts = [t.view_as(p) for t, p in zip(e.split([p.numel() for p in params]), params)]
        rows.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, parts, retain_graph=True)]))
    H = torch.stack(rows)
    monkeypatch.setattr(HessianOperator, "_worth_timing", lambda self, which: which == "multi")  # as on a GPU
    op = HessianOperator(model, loss_fn, (x, y))
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
    assert op.hvp_timings["multi"]["forward"] == float("inf") and op.hvp_choice["multi"] != "forward"
    with pytest.raises(RuntimeError):
        HessianOperator(model, loss_fn, (x, y), hvp="forward").matvec(V[0])


@pytest.mark.parametrize("form", ["reverse", "reverse-batched", "forward"])
def test_a_selected_parameter_the_loss_does_not_reach_has_zero_rows(form: str) -> None:
    model, batch, _ = problem("mlp")
    model = copy.deepcopy(model)  # problem() is shared between tests
    model.unused = nn.Linear(2, 2).double()  # selected, but not in the forward
    op = HessianOperator(model, loss_fn, batch, hvp=form)
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    HV = op.matmat(V)
    used = HessianOperator(model, loss_fn, batch, params=["net*"], hvp="reverse")
    torch.testing.assert_close(HV[:, : used.dim], used.matmat(V[:, : used.dim]), rtol=1e-9, atol=1e-11)
    assert HV[:, used.dim :].abs().max() == 0


def test_bare_tensor_batches_are_read_as_batches_when_wrapped() -> None:
    model, (x, y), _ = problem("mlp")

    def loss_of_inputs(m, inputs):  # e.g. an autoencoder: a batch is the input tensor alone
        return m(inputs).square().mean()

    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    whole = HessianOperator(model, loss_of_inputs, x).matvec(v)
    split = HessianOperator(model, loss_of_inputs, Batches([x[:5], x[5:]])).matvec(v)
    torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="params is empty"):
        HessianOperator(model, loss_fn, (x, y), params=[])


class _Tempered(nn.Module):
    """A linear layer over a learnable scalar temperature (a 0-dim parameter)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3).double()
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return self.layer(x) / self.temperature


@pytest.mark.parametrize("form", ["auto", "reverse", "reverse-batched", "forward"])
def test_a_scalar_parameter_takes_part(form: str) -> None:
    torch.manual_seed(0)
    model = _Tempered()
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    H = dense_hessian(model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, batch, hvp=form)
    V = torch.randn(2, op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V[0]), V[0] @ H, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)


def test_bf16_batches_are_summed_in_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).bfloat16()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 8, generator=g).bfloat16(), torch.randint(0, 3, (4,), generator=g)) for _ in range(200)]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g).bfloat16()
    op = HessianOperator(model, loss_fn, batches, hvp="reverse")
    each = torch.stack([HessianOperator(model, loss_fn, b, hvp="reverse").matvec(v).double() for b in batches])
    mean = each.mean(0)  # the same per-batch products, averaged in float64
    error = float((op.matvec(v).double() - mean).norm() / mean.norm())
    assert error <= 2**-8  # one bf16 rounding of the result (summed in bf16: 1.1e-2)


def test_auto_choices_are_remembered_per_mode_and_not_from_empty_input(monkeypatch) -> None:
    from lightning_hessian.hessian import operator

    monkeypatch.setattr(operator, "_CHOICES", {})
    monkeypatch.setattr(HessianOperator, "_worth_timing", lambda self, which: which == "multi")  # as on a GPU
    torch.manual_seed(0)
    model = MNIST1DCNN(channels=4, batch_norm=True).double().eval()
    batch = teacher_batch(16, seed=3)
    op = HessianOperator(model, loss_fn, batch)
    assert op.matmat(torch.zeros(0, op.dim)).shape == (0, op.dim) and not operator._CHOICES
    op.matmat(torch.randn(3, op.dim, dtype=torch.float64))
    # a form BatchNorm runs only in eval mode, remembered for eval mode only
    (key,) = operator._CHOICES
    operator._CHOICES[key] = ("forward", {"reverse": 1.0, "reverse-batched": 1.0, "forward": 0.0})
    model.train()
    V = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    HV = HessianOperator(model, loss_fn, batch).matmat(V)  # measured anew: forward cannot run in train mode
    torch.testing.assert_close(HV, HessianOperator(model, loss_fn, batch, hvp="reverse").matmat(V))


def test_cached_graphs_stay_within_their_memory_budget_and_products_stay_exact() -> None:
    model, (x, y), H = problem("cnn")
    shards = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    V = torch.randn(2, H.shape[0], generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    unlimited = HessianOperator(model, loss_fn, shards, cache_bytes=None)
    torch.testing.assert_close(unlimited.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
    per_batch = unlimited.cached_bytes / 4
    assert len(unlimited._graphs) == 4 and per_batch > 8 * 8 * 32  # at least the first layer's activations
    budget = int(2.5 * per_batch)
    op = HessianOperator(model, loss_fn, shards, cache_bytes=budget)
    for _ in range(2):  # the uncached batches are rebuilt at every call
        torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=1e-9, atol=1e-11)
    assert sorted(op._graphs) == [0, 1]
    op.clear_cache()
    assert op.cached_bytes == 0 and not op._graphs
