"""Small file helpers every layer shares: the atomic write, and the per-model folder key.

A file written with :func:`atomic_path` is either absent or complete, whatever happens to the
process: it is written under a temporary name beside its destination (``.<name>.<random>.tmp``),
flushed to disk, renamed over the destination, and the folder is flushed too. A process killed
half-way leaves only the temporary file, which the next writer ignores (and the daemon's
start-up removes from the checkpoint folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

TEMPORARY_SUFFIX = ".tmp"


def model_key(identity: str) -> str:
    """The folder name of a model's caches and checkpoints: 16 hex digits of its identity."""
    return identity.removeprefix("sha256:")[:16]


def fsync_directory(directory: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where the platform cannot."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s contents to; renamed over ``path`` when the block ends.

    The temporary file is flushed to disk before the rename and removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; it replaces ``path`` when the block ends.

    A folder already at ``path`` is removed first; the temporary one is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_safetensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and all its tensors (on ``device``, bit for bit)."""
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a mapping
    return metadata, tensors
