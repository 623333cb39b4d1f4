"""The checkpoint format: edited weights, the full editor state and a manifest in one safetensors file.

This module is the only one that knows the format (names inside the file, the manifest's
fields, the file names). One file per checkpoint means there is never a moment where weights and
state disagree. The file is written atomically (engine.files.atomic_path), so a crash leaves
either no new file or a complete one. Its sha256 is recorded in the checkpoint table and checked
before the file is ever used again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from daemon.faults import crash_point
from engine.files import TEMPORARY_SUFFIX, atomic_path, model_key
from engine.hparams import EditHyperParams
from engine.state import EditorState, StateMismatch
from storage.models import DEFAULT_MODEL_NAME
from storage.serialize import iso
from storage.types import utcnow

FORMAT = "metake-checkpoint/1"
SUFFIX = ".safetensors"
_WEIGHT_PREFIX = "weight/"
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


@dataclass(frozen=True)
class NewCheckpoint:
    """A checkpoint file just written, with what its table row needs; not yet recorded."""

    file: WrittenFile
    created_at: datetime
    manifest: dict[str, Any]


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


def chain_folder(name: str, model_identity: str) -> str:
    """The folder (under the checkpoints folder) of one named model's checkpoints: ``<model key>``
    for the default model, ``<name>/<model key>`` for others, so no daemon ever tidies another's files."""
    key = model_key(model_identity)
    return key if name == DEFAULT_MODEL_NAME else f"{name}/{key}"


def new_name(name: str, model_identity: str, created_at: datetime) -> str:
    """``<chain folder>/<UTC time>-<random>.safetensors``: unique without asking the database first."""
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{chain_folder(name, model_identity)}/{stamp}-{uuid.uuid4().hex[:8]}{SUFFIX}"


@dataclass(frozen=True)
class Origin:
    """Where a new checkpoint comes from: its kind (base, edit, revert), its parent, the
    corrections its batch applied and all the corrections its weights contain."""

    kind: str
    parent: int | None
    batch: list[int]
    applied: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """The model and settings every checkpoint of this process is written with."""

    name: str
    base_model: str
    model_source: str
    hparams: EditHyperParams


def manifest(
    weights: dict[str, torch.Tensor], state: EditorState, origin: Origin, model: ModelInfo, created_at: datetime
) -> dict[str, Any]:
    """What a checkpoint says about itself (the table keeps a copy, plus the file's sha256)."""
    return {
        "format": FORMAT,
        "kind": origin.kind,
        "parent": origin.parent,
        "model": model.name,
        "base_model": model.base_model,
        "model_source": model.model_source,
        "method": model.hparams.method,
        "hparams": model.hparams.to_dict(),
        "corrections": origin.batch,
        "applied_corrections": origin.applied,
        "steps": state.steps,
        "edits": state.edits,
        "weights_sha256": tensors_sha256(weights),
        "created_at": iso(created_at),
        **origin.extra,
    }


def write_new(
    root: Path, weights: dict[str, torch.Tensor], state: EditorState, origin: Origin, model: ModelInfo
) -> NewCheckpoint:
    """Write a new checkpoint file under ``root`` (named, with its manifest), not yet recorded."""
    created_at = utcnow()
    described = manifest(weights, state, origin, model, created_at)
    relative = new_name(model.name, model.base_model, created_at)
    written = write_checkpoint(root, relative, CheckpointContents(weights, state, described))
    return NewCheckpoint(written, created_at, described)


def write_checkpoint(root: Path, relative_path: str, contents: CheckpointContents) -> WrittenFile:
    """Write atomically (engine.files.atomic_path); returns the file's path, hash and size."""
    path = root / relative_path
    tensors = {f"{_WEIGHT_PREFIX}{name}": t.detach().cpu().contiguous() for name, t in contents.weights.items()}
    state_tensors, state_metadata = contents.state.to_safetensors()
    metadata = {"format": FORMAT, "manifest": json.dumps(contents.manifest, sort_keys=True)} | state_metadata
    with atomic_path(path) as tmp:
        save_file(tensors | state_tensors, tmp, metadata=metadata)
        crash_point("during_checkpoint_write")
        sha256 = file_sha256(tmp)
        size = tmp.stat().st_size
    return WrittenFile(relative_path, sha256, size)


def delete_files(root: Path, relative_paths: list[str]) -> list[str]:
    """Delete checkpoint files (pruned ones, or one whose transaction did not commit).

    The paths come from database rows, which someone with database access can rewrite; a path
    that leads outside ``root`` (``../``, an absolute path, a symlinked folder) is not deleted
    but returned, for the caller to report.
    """
    inside = root.resolve()
    refused = []
    for relative in relative_paths:
        path = (root / relative).resolve()
        if not path.is_relative_to(inside) or path == inside:
            refused.append(relative)
            continue
        path.unlink(missing_ok=True)
    return refused


def verified_bytes(path: Path, expected_sha256: str, label: str) -> bytes:
    """The file's bytes, read once, after checking that they hash to ``expected_sha256``.

    What is checked is what is then parsed: hashing the file and reading it again would let a
    file swapped in between be loaded unchecked."""
    if not path.is_file():
        raise CheckpointFileError(f"{label}: file {path} is missing")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != expected_sha256:
        raise CheckpointFileError(
            f"{label}: file {path} has sha256 {found[:16]}… but the checkpoint table records "
            f"{expected_sha256[:16]}…; it was altered or damaged"
        )
    return data


def _parse(data: bytes, path: Path, label: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        return metadata, load_safetensors_bytes(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointFileError(f"{label}: cannot read {path}: {error}") from error


def read_checkpoint(path: Path, expected_sha256: str, label: str, device: torch.device | str) -> CheckpointContents:
    """Read a checkpoint after checking its hash; tensors land on ``device`` bit for bit."""
    metadata, tensors = _parse(verified_bytes(path, expected_sha256, label), path, label)
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    if metadata.get("format") != FORMAT:
        raise CheckpointFileError(f"{label}: {path} is not a metake checkpoint (format {metadata.get('format')!r})")
    weights = {name.removeprefix(_WEIGHT_PREFIX): t for name, t in tensors.items() if name.startswith(_WEIGHT_PREFIX)}
    try:
        state = EditorState.from_safetensors(metadata, tensors)
    except (StateMismatch, KeyError, ValueError) as error:
        raise CheckpointFileError(f"{label}: the editor state in {path} cannot be read: {error}") from error
    return CheckpointContents(weights, state, json.loads(metadata["manifest"]))


def read_weights(path: Path, expected_sha256: str, label: str) -> dict[str, torch.Tensor]:
    """Only the edited weights (on the CPU), for export."""
    _, tensors = _parse(verified_bytes(path, expected_sha256, label), path, label)
    return {name.removeprefix(_WEIGHT_PREFIX): t for name, t in tensors.items() if name.startswith(_WEIGHT_PREFIX)}


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
        is_temporary = path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)
        is_checkpoint = path.suffix == SUFFIX and not path.name.startswith(".")
        if (is_temporary or is_checkpoint) and path.relative_to(root).as_posix() not in keep:
            path.unlink()
            removed.append(path)
    return removed
