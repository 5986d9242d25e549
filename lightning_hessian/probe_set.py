"""What the Hessian measurements differentiate, shared by the callbacks, HAWQModule, analyze and the recipes: the loss
(by protocol, checked before it is trusted) and a fixed probe set of samples drawn from the training data."""

from __future__ import annotations

import functools
import inspect
import io
import random
import textwrap
import tokenize
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.nn.modules.loss import _Loss
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_hessian.checks import check_positive_int
from lightning_hessian.hessian.operator import LossFn
from lightning_hessian.seeds import mix_seed

DEFAULT_LOSS = "cross_entropy(module(x), y)"
LOSS_FIX = ("pass loss_fn=<callable (module, batch) -> mean loss> or define hessian_loss(self, batch) on the "
            "LightningModule")
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: such labels are skipped, not out of range
# Names in a module's code that say which loss it trains with (torch.nn.functional and torch.nn spellings).
_CROSS_ENTROPY_NAMES = frozenset({"cross_entropy", "CrossEntropyLoss", "nll_loss", "NLLLoss"})
_OTHER_LOSS_NAMES = frozenset({
    "mse_loss", "MSELoss", "l1_loss", "L1Loss", "smooth_l1_loss", "SmoothL1Loss", "huber_loss", "HuberLoss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "BCELoss", "BCEWithLogitsLoss", "kl_div",
    "KLDivLoss", "poisson_nll_loss", "PoissonNLLLoss", "gaussian_nll_loss", "GaussianNLLLoss", "ctc_loss", "CTCLoss",
    "cosine_embedding_loss", "CosineEmbeddingLoss", "margin_ranking_loss", "MarginRankingLoss",
    "hinge_embedding_loss", "HingeEmbeddingLoss", "triplet_margin_loss", "TripletMarginLoss", "soft_margin_loss",
    "SoftMarginLoss", "multilabel_soft_margin_loss", "MultiLabelSoftMarginLoss", "multi_margin_loss",
    "MultiMarginLoss", "multilabel_margin_loss", "MultiLabelMarginLoss",
})
_FRAMEWORK_PACKAGES = ("torch", "lightning", "pytorch_lightning", "builtins")


class DefaultLossError(ValueError):
    """The default Hessian loss ``cross_entropy(module(x), y)`` does not apply (one line: why, and the fix)."""


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: ``cross_entropy(model(x), y)`` for ``(x, y)`` batches of integer class labels ``y`` of shape
    ``(N, ...)`` and logits ``model(x)`` of shape ``(N, classes >= 2, ...)``.

    Anything else raises :class:`DefaultLossError` instead of returning a number (float targets, a single output,
    dict batches, outputs that are not logits). The checks read only shapes and dtypes, so they cost nothing in the
    Hessian-vector products; :func:`check_loss` also checks the label range and the forward pass, once.
    """
    x, y = _default_pair(model, batch)
    return F.cross_entropy(_default_logits(model, model(x), y), y)


def resolve_loss_fn(pl_module: nn.Module, loss_fn: LossFn | None, who: str = "the Hessian loss") -> LossFn:
    """An explicit ``loss_fn``, else the module's ``hessian_loss(batch)``, else :func:`cross_entropy_loss`.

    The returned function takes ``(model, batch)``; the model it is given is ``pl_module`` itself. The default is
    refused at once (:class:`DefaultLossError` naming ``who``) where the module shows it does not apply: it
    defines no ``forward``, or its code trains with another loss (``mse_loss``, ``BCEWithLogitsLoss``, ...).
    """
    if loss_fn is not None:
        return loss_fn
    if callable(getattr(pl_module, "hessian_loss", None)):
        return lambda model, batch: model.hessian_loss(batch)
    problem = module_loss_problem(pl_module)
    if problem is not None:
        raise DefaultLossError(f"{who}: the default loss {DEFAULT_LOSS} does not apply: {problem}; {LOSS_FIX}")
    return cross_entropy_loss


def check_loss(loss_fn: LossFn, module: nn.Module, batches: Sequence[Any], who: str, say: bool = True) -> torch.Tensor:
    """Evaluate ``loss_fn`` on the first of ``batches`` once, eagerly, before any Hessian is taken of it; return it.

    For the default loss this also checks every batch's labels against the number of classes, refuses outputs
    that are probabilities rather than logits, turns a failing ``module(x)`` (``mat1 and mat2 shapes cannot be
    multiplied``, a missing ``forward``) into one line naming ``who`` and the fix, and says which loss it takes
    (an info line unless ``say=False``: the default is never applied silently). Any loss must return a scalar
    tensor.
    """
    name = type(module).__name__
    try:
        if loss_fn is cross_entropy_loss:
            loss, classes = _checked_default(module, batches)
            if say:
                rank_zero_info(f"{who}: the Hessian is of the default loss {DEFAULT_LOSS} with {name}'s output as "
                               f"logits over {classes} classes ({LOSS_FIX} for another loss)")
        else:
            loss = loss_fn(module, batches[0])
    except DefaultLossError as err:
        raise DefaultLossError(f"{who}: {err}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{who}: loss_fn must return a scalar tensor (the mean loss over the batch), got "
                         f"{_describe(loss)}")
    return loss


def _checked_default(module: nn.Module, batches: Sequence[Any]) -> tuple[torch.Tensor, int]:
    """The default loss on the first batch and the number of classes, after checking all of the batches."""
    x, y = _default_pair(module, batches[0])
    try:
        out = module(x)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        raise DefaultLossError(f"the default loss {DEFAULT_LOSS} failed in {type(module).__name__}(x) on the "
                               f"first probe batch ({type(err).__name__}: {first_line(err)}); {LOSS_FIX}") from err
    logits = _default_logits(module, out, y)
    classes = logits.shape[1]
    if bool((logits >= 0).all()) and torch.allclose(logits.sum(1), torch.ones((), dtype=logits.dtype)):
        raise DefaultLossError(f"{type(module).__name__}(x) returns probabilities (they sum to 1 over dim 1), but "
                               f"the default loss {DEFAULT_LOSS} takes logits; {LOSS_FIX}")
    for batch in batches:
        _, labels = _default_pair(module, batch)
        wrong = labels[((labels < 0) | (labels >= classes)) & (labels != IGNORE_INDEX)]
        if wrong.numel():
            raise DefaultLossError(
                f"the default loss {DEFAULT_LOSS} needs labels y in [0, {classes}) for {type(module).__name__}'s "
                f"{classes} outputs, but y holds {wrong.min().item()}..{wrong.max().item()}: the output is not "
                f"class logits for these labels; {LOSS_FIX}"
            )
    return F.cross_entropy(logits, y), classes


def _default_pair(model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
    """``(x, y)`` with ``y`` integer labels, else a :class:`DefaultLossError` saying what the batch is."""
    name = type(model).__name__
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DefaultLossError(f"the default loss {DEFAULT_LOSS} needs (x, y) batches, but {name}'s batches are "
                               f"{_describe(batch)}; {LOSS_FIX}")
    x, y = batch
    if (not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool
            or y.dim() == 0):
        kind = " (a regression target?)" if isinstance(y, torch.Tensor) and y.is_floating_point() else ""
        raise DefaultLossError(f"the default loss {DEFAULT_LOSS} needs integer class labels y, but {name}'s batches "
                               f"hold {_describe(y)}{kind}; {LOSS_FIX}")
    return x, y


def _default_logits(model: nn.Module, out: Any, y: torch.Tensor) -> torch.Tensor:
    """``out`` if it is logits ``(N, classes >= 2, *y.shape[1:])`` for the labels ``y``, else a
    :class:`DefaultLossError`."""
    if (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == y.dim() + 1
            and out.shape[0] == y.shape[0] and out.shape[2:] == y.shape[1:] and out.shape[1] >= 2):
        return out
    expected = ", ".join(["N", "classes >= 2", *map(str, y.shape[1:])])
    hint = " (one output: cross-entropy over one class is 0)" if isinstance(out, torch.Tensor) and out.dim() >= 2 \
        and out.shape[1] == 1 else ""
    raise DefaultLossError(f"the default loss {DEFAULT_LOSS} needs logits of shape ({expected}) for labels of shape "
                           f"{tuple(y.shape)}, but {type(model).__name__}(x) returns {_describe(out)}{hint}; "
                           f"{LOSS_FIX}")


def module_loss_problem(module: nn.Module) -> str | None:
    """Why ``module`` itself shows that cross-entropy on ``module(x)`` is not its loss (no ``forward``; code that
    trains with another loss), or None."""
    name = type(module).__name__
    if not defines_forward(module):
        return f"{name} defines no forward(), which the default calls"
    found = _losses_in_code(type(module)) | {type(m).__name__ for m in module.modules() if isinstance(m, _Loss)}
    others, cross_entropy = sorted(found & _OTHER_LOSS_NAMES), sorted(found & _CROSS_ENTROPY_NAMES)
    if others and not cross_entropy:
        return f"{name}'s code trains with {', '.join(others)}, not cross-entropy"
    if others:
        return (f"{name}'s code uses {', '.join(others)} as well as {', '.join(cross_entropy)}, so which loss the "
                "Hessian should be of is not clear")
    return None


def defines_forward(module: nn.Module) -> bool:
    """Whether ``module`` has a ``forward`` of its own (not torch's or Lightning's placeholder)."""
    if "forward" in vars(module):
        return True
    owner = next(cls for cls in type(module).__mro__ if "forward" in vars(cls))
    return owner.__module__.split(".")[0] not in _FRAMEWORK_PACKAGES


@functools.cache
def _losses_in_code(cls: type) -> frozenset[str]:
    """The loss names (of either family above) in the code of ``cls`` and its user-written bases (comments and
    strings excluded); empty where the source cannot be read."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in _FRAMEWORK_PACKAGES:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            names.update(tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                         if tok.type == tokenize.NAME)
        except (OSError, TypeError, SyntaxError, tokenize.TokenError):
            continue
    return frozenset(names & (_CROSS_ENTROPY_NAMES | _OTHER_LOSS_NAMES))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's can run to pages), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"dicts with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}s of length {len(value)}"
    return f"a {type(value).__name__}"


def draw_probe_indices(dataset_size: int, probe_size: int, seed: int) -> list[int]:
    """``probe_size`` distinct sample indices, the same for a given seed on every rank and every call."""
    check_positive_int(probe_size, "probe_size")
    if probe_size > dataset_size:
        raise ValueError(
            f"probe_size={probe_size} exceeds the {dataset_size} training samples: lower probe_size"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(dataset_size, generator=generator, device="cpu")[:probe_size].sort().values.tolist()


def probe_batches(
    dataset: Dataset,
    indices: Sequence[int],
    batch_size: int,
    collate_fn: Callable | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> list[Any]:
    """This rank's share of the probe samples, collated into batches (ranks split the indices evenly).

    Each sample is read with the random generators seeded by ``(seed, index)``, so a dataset that augments
    (random crops, flips) gives the same probe set on every call and every rank split, and training's random
    stream is left as it was.
    """
    check_positive_int(batch_size, "probe_batch_size")
    shard = list(indices[rank::world_size])
    # a private generator: iterating a DataLoader otherwise draws from the global RNG (training's stream)
    loader = DataLoader(Subset(_SeededSamples(dataset, seed), shard), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_fn, generator=torch.Generator())
    with isolate_rng(include_cuda=False):  # once for all samples: saving NumPy's state costs ~70 us a time
        return list(loader)


class _SeededSamples(Dataset):
    """``dataset[i]`` read with torch's (CPU), NumPy's and Python's generators seeded by ``(seed, i)``; the caller
    restores them (``probe_batches``)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample_seed = mix_seed(self.seed, index) % 2**32  # NumPy's and Python's seeds are 32-bit
        torch.default_generator.manual_seed(sample_seed)  # torch.manual_seed also seeds every accelerator: 100x dearer
        np.random.seed(sample_seed)
        random.seed(sample_seed)
        return self.dataset[index]


def prepare_batch(trainer: pl.Trainer, batch: Any, convert_input: bool = True) -> Any:
    """``batch`` as the training loop hands it to ``training_step``: the precision plugin's input conversion
    (e.g. ``bf16-true``, ``64-true``; ``convert_input=False`` skips it, for modules the precision plugin has not
    converted yet), the module's batch-transfer hooks and the move to its device. Random draws in those hooks
    (augmentation) do not advance the training's random stream."""
    with isolate_rng():
        if convert_input:
            batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def train_dataset_of(trainer: pl.Trainer) -> tuple[Dataset, Callable | None]:
    """The training dataset and collate function the Trainer is using; outside ``fit`` (before one), those of the
    datamodule's ``train_dataloader`` (else the module's)."""
    loader = trainer.train_dataloader
    if loader is None and trainer.state.fn == TrainerFn.FITTING:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    elif loader is None:
        loader = (trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module).train_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise TypeError(f"cannot draw a probe set from a {type(loader).__name__}; pass probe batches explicitly")
    if not isinstance(loader.dataset, Sized):
        raise TypeError(f"cannot draw probe samples from an iterable-style dataset ({type(loader.dataset).__name__} "
                        "has no len()); pass probe batches explicitly (probe_data=...)")
    return loader.dataset, loader.collate_fn
