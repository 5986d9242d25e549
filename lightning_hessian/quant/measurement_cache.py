"""A content-addressed cache for expensive measurements (HAWQ's Hessian sensitivities): the key is a hash of
everything the result depends on, so a changed model, probe data, loss function or setting is measured again and
an unchanged one is read back.

``cache_key`` hashes the settings, every parameter and buffer (name, dtype, shape, values), the modules' modes,
the model's structure and the code of its own classes, and the data's tensors; ``code_of`` reads what a callable
computes (bytecode, constants, defaults, closed-over plain values); ``write_json`` writes atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for item in obj:
            yield from _tensors(item)


def cache_key(model: nn.Module, data: Any, settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings, every parameter and buffer (name, dtype, shape, values), the model's structure
    and code, the probe data."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(state):
        _update(digest, state[name], name)
    digest.update(json.dumps([m.training for m in model.modules()]).encode())
    digest.update(repr(model).encode())
    for cls in sorted({c for m in model.modules() for c in type(m).__mro__}, key=lambda c: c.__qualname__):
        if not cls.__module__.startswith(("torch.", "lightning.", "torchmetrics.", "builtins")):
            for name, attr in sorted(vars(cls).items()):
                if isinstance(attr, types.FunctionType):
                    digest.update(f"{cls.__qualname__}.{name}:{code_of(attr)}".encode())
    for tensor in _tensors(data):
        _update(digest, tensor, "data")
    return digest.hexdigest()[:32]


def code_of(fn: Any) -> str:
    """What a callable computes, as far as can be read: its bytecode, names, constants, defaults and the plain
    values it closes over (or a ``partial``'s arguments); a callable object by its class's ``__call__``."""
    if isinstance(fn, functools.partial):
        return f"partial({code_of(fn.func)}, {_plain(fn.args)}, {_plain(fn.keywords)})"
    fn = getattr(fn, "__func__", fn)  # a bound method: the function (its object is keyed elsewhere or not at all)
    if not isinstance(fn, types.FunctionType):
        call = type(fn).__call__  # loss functions are callable
        inner = code_of(call) if isinstance(call, types.FunctionType) else ""
        return f"{type(fn).__module__}.{type(fn).__qualname__}({inner})"
    cells = tuple(cell.cell_contents for cell in fn.__closure__ or ())
    return f"{fn.__qualname__}:{_bytecode(fn.__code__)}:{_plain(fn.__defaults__)}:{_plain(cells)}"


def _bytecode(code: types.CodeType) -> str:
    consts = [_bytecode(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{code.co_names}|{consts}"


def _plain(value: Any) -> str:
    """``repr`` of plain values (numbers, strings, their containers); other objects by their type."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return f"[{', '.join(map(_plain, value))}]"
    if isinstance(value, Mapping):
        return f"{{{', '.join(f'{_plain(k)}: {_plain(v)}' for k, v in value.items())}}}"
    return type(value).__qualname__


def _update(digest: Any, tensor: torch.Tensor, label: str) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{label}:{t.dtype}:{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Atomic write (a temporary file renamed), so concurrent ranks or runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)
