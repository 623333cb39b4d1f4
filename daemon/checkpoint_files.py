"""Checkpoint files: the edited weights and the full editor state in one safetensors file.

One file per checkpoint means there is never a moment where weights and state disagree. The
file is written under a temporary name, flushed to disk and renamed, so a crash leaves either
no new file or a complete one. Its sha256 is recorded in the checkpoint table and checked
before the file is ever used again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from daemon.faults import crash_point
from engine.state import EditorState, StateMismatch

FORMAT = "metake-checkpoint/1"
SUFFIX = ".safetensors"
_WEIGHT_PREFIX = "weight/"
_STATE_PREFIX = "state/"
_STATE_META_PREFIX = "state."
_CHUNK = 1 << 22


class CheckpointFileError(RuntimeError):
    """A checkpoint file is missing, damaged or not what the checkpoint table says it is."""


@dataclass(frozen=True)
class CheckpointContents:
    """What a checkpoint holds: edited weights by parameter name, the editor state, the manifest."""

    weights: dict[str, torch.Tensor]
    state: EditorState
    manifest: dict[str, Any]


@dataclass(frozen=True)
class WrittenFile:
    """A checkpoint file on disk: its path relative to the checkpoints folder, hash and size."""

    relative_path: str
    sha256: str
    size_bytes: int


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash over names, dtypes, shapes and bytes, independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_name(model_identity: str, created_at: datetime) -> str:
    """``<model>/<UTC time>-<random>.safetensors``: unique without asking the database first."""
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{model_folder(model_identity)}/{stamp}-{uuid.uuid4().hex[:8]}{SUFFIX}"


def model_folder(model_identity: str) -> str:
    return model_identity.removeprefix("sha256:")[:16]


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, relative_path: str, contents: CheckpointContents) -> WrittenFile:
    """Write atomically: temporary file, fsync, rename, fsync of the folder; returns its hash."""
    path = root / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{_WEIGHT_PREFIX}{name}": t.detach().cpu().contiguous() for name, t in contents.weights.items()}
    tensors |= {f"{_STATE_PREFIX}{name}": t for name, t in contents.state.tensors().items()}
    metadata = {"format": FORMAT, "manifest": json.dumps(contents.manifest, sort_keys=True)}
    metadata |= {f"{_STATE_META_PREFIX}{key}": value for key, value in contents.state.metadata().items()}
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, tmp, metadata=metadata)
        crash_point("during_checkpoint_write")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        sha256 = file_sha256(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return WrittenFile(relative_path, sha256, size)


def verify_file(path: Path, expected_sha256: str, label: str) -> None:
    """Raise CheckpointFileError unless ``path`` exists and hashes to ``expected_sha256``."""
    if not path.is_file():
        raise CheckpointFileError(f"{label}: file {path} is missing")
    found = file_sha256(path)
    if found != expected_sha256:
        raise CheckpointFileError(
            f"{label}: file {path} has sha256 {found[:16]}… but the checkpoint table records "
            f"{expected_sha256[:16]}…; it was altered or damaged"
        )


def read_checkpoint(path: Path, expected_sha256: str, label: str, device: torch.device | str) -> CheckpointContents:
    """Read a checkpoint after checking its hash; tensors land on ``device`` bit for bit."""
    verify_file(path, expected_sha256, label)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise CheckpointFileError(f"{label}: cannot read {path}: {error}") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointFileError(f"{label}: {path} is not a metake checkpoint (format {metadata.get('format')!r})")
    weights = {name.removeprefix(_WEIGHT_PREFIX): t for name, t in tensors.items() if name.startswith(_WEIGHT_PREFIX)}
    state_tensors = {
        name.removeprefix(_STATE_PREFIX): t for name, t in tensors.items() if name.startswith(_STATE_PREFIX)
    }
    state_meta = {
        key.removeprefix(_STATE_META_PREFIX): value
        for key, value in metadata.items()
        if key.startswith(_STATE_META_PREFIX)
    }
    try:
        state = EditorState.from_parts(state_meta, state_tensors)
    except (StateMismatch, KeyError, ValueError) as error:
        raise CheckpointFileError(f"{label}: the editor state in {path} cannot be read: {error}") from error
    return CheckpointContents(weights, state, json.loads(metadata["manifest"]))


def read_weights(path: Path, expected_sha256: str, label: str) -> dict[str, torch.Tensor]:
    """Only the edited weights (on the CPU), for export."""
    verify_file(path, expected_sha256, label)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {
            name.removeprefix(_WEIGHT_PREFIX): handle.get_tensor(name)
            for name in handle.keys()  # noqa: SIM118 - safe_open handles are not mappings
            if name.startswith(_WEIGHT_PREFIX)
        }


def remove_unlisted(folder: Path, keep: set[str], root: Path) -> list[Path]:
    """Delete checkpoint files (and leftover temporary files) in ``folder`` not named in ``keep``.

    ``keep`` holds paths relative to ``root``. Used at start-up, under the lease, to clear what a
    crash left behind: a file written but never committed, or a pruned file not yet deleted.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        is_temporary = path.name.startswith(".") and path.name.endswith(".tmp")
        is_checkpoint = path.suffix == SUFFIX and not path.name.startswith(".")
        if (is_temporary or is_checkpoint) and path.relative_to(root).as_posix() not in keep:
            path.unlink()
            removed.append(path)
    return removed
