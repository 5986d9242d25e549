"""Checkpoints with a SHA-256 checksum beside them: written with every save, verified on every load.

``torch.load`` reads a checkpoint whose tensor bytes were damaged on disk or in transfer without a word, and
training goes on from garbage weights; a truncated, empty or foreign file fails with an error that does not
name it. ``ChecksummedCheckpointIO`` (a Lightning ``CheckpointIO`` plugin, so every save goes through it:
``ModelCheckpoint``, ``trainer.save_checkpoint``, SLURM's hpc checkpoints) writes ``<file>.checksum`` beside
each checkpoint in ``sha256sum`` format and checks it when a checkpoint is loaded; ``read_checkpoint`` does
the same outside a Trainer. Both raise ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

# no digits and no "ckpt_" in it: Lightning finds the newest hpc_ckpt_<n>.ckpt by the digits of every file
# name in the run directory that holds "ckpt_"
CHECKSUM_SUFFIX = ".checksum"


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint, or that differs from the checksum saved with it."""


def checksum_path(path: _PATH) -> str:
    """The checksum file of the checkpoint at ``path``."""
    return f"{path}{CHECKSUM_SUFFIX}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: _PATH) -> str:
    digest = hashlib.sha256()
    with get_filesystem(path).open(str(path), "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` in one step: a reader sees the old file or the new one, never a part."""
    fs = get_filesystem(path)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe(path, data)  # object stores replace an object in one step
        return
    # a hidden name without "ckpt_" beside the target, so os.replace stays on one filesystem and Lightning's
    # hpc_ckpt_<n> search never counts a leftover of a killed write
    handle, tmp = tempfile.mkstemp(prefix=".partial-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _saved_checksums(path: _PATH) -> list[str] | None:
    """The digests in ``path``'s checksum file (two while a save replaces the checkpoint), None without one."""
    sidecar = checksum_path(path)
    fs = get_filesystem(sidecar)
    if not fs.isfile(sidecar):
        return None
    with fs.open(sidecar, "rb") as file:
        text = file.read(4096).decode("ascii", errors="replace")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def verify_checkpoint(path: _PATH) -> None:
    """Raise ``CheckpointError`` if ``path`` has a checksum file that its bytes do not match (no file: no check)."""
    saved = _saved_checksums(path)
    if saved is not None and _file_sha256(path) not in saved:
        raise CheckpointError(f"{path} does not match its checksum in {checksum_path(path)}: the file changed after it "
                              "was saved (damaged on disk or in a copy)")


def _unreadable(path: _PATH, err: Exception) -> CheckpointError:
    """``err`` from ``torch.load(path)`` as a ``CheckpointError`` that says what the file is."""
    with get_filesystem(path).open(str(path), "rb") as file:
        head = file.read(4)
    detail = (str(err).strip().splitlines() or [""])[0]
    if not head:
        what = "an empty file"
    elif "Weights only load failed" in detail and head == b"PK\x03\x04":
        what = "it holds objects that torch.load(weights_only=True) does not load"
    elif head == b"PK\x03\x04":
        what = "a damaged or truncated archive"
    else:
        what = "not a file saved by torch.save"
    return CheckpointError(f"{path} is not a readable checkpoint ({what})")


def read_checkpoint(path: _PATH, map_location: Any = "cpu", weights_only: bool | None = True,
                    mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path)`` after ``verify_checkpoint``; any failure is a ``CheckpointError`` naming the file.

    ``mmap=True`` (local files) maps the tensors instead of reading them: a cheap check that the file loads.
    """
    verify_checkpoint(path)
    try:
        if mmap and isinstance(get_filesystem(path), LocalFileSystem):
            checkpoint = torch.load(str(path), map_location=map_location, weights_only=weights_only, mmap=True)
        else:
            with get_filesystem(path).open(str(path), "rb") as file:
                checkpoint = torch.load(file, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - torch.load fails in a dozen ways on a bad file; all mean the same
        raise _unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a readable checkpoint (it holds a {type(checkpoint).__name__}, not a "
                              "dict of states)")
    return checkpoint


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``<file>.checksum`` with every checkpoint and verifies it on load.

    A save first writes the checksum file with the new digest and the old one, then replaces the checkpoint,
    then drops the old digest: a process killed at any point leaves a checkpoint that matches its checksum
    file. A load raises ``CheckpointError`` naming the file when the bytes do not match, or when the file is
    not a readable checkpoint at all. Checkpoints without a checksum file (saved elsewhere) load unchecked.

    Example::

        Trainer(plugins=[ChecksummedCheckpointIO()], callbacks=[ModelCheckpoint(dirpath="checkpoints")])
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        path = str(path)
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        name = os.path.basename(path)
        digest = _sha256(data)
        earlier = []  # the digests the file being replaced may have (one, or two after a save was killed)
        if fs.isfile(path):
            earlier = [d for d in (_saved_checksums(path) or [_file_sha256(path)]) if d != digest]
        _write(checksum_path(path), "".join(f"{d}  {name}\n" for d in [digest, *earlier]).encode())
        _write(path, data)
        if earlier:
            _write(checksum_path(path), f"{digest}  {name}\n".encode())

    def load_checkpoint(self, path: _PATH, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not get_filesystem(path).isfile(str(path)):  # a missing file, a sharded directory: Lightning's own load
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        sidecar = checksum_path(path)
        fs = get_filesystem(sidecar)
        if fs.isfile(sidecar):
            fs.rm(sidecar)
