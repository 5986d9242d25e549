"""The torch.distributed state as the library reads it, defined once (no Lightning: the core uses it)."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialised (Lightning's DDP, torchrun, or the user's own)."""
    return dist.is_available() and dist.is_initialized()


def resolve_distributed(distributed: bool | None) -> bool:
    """An operator's ``distributed`` argument: None follows :func:`is_distributed`; True without a process group
    is a ``ValueError`` saying what is missing."""
    if distributed is None:
        return is_distributed()
    if distributed and not is_distributed():
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return bool(distributed)
