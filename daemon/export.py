"""Export a checkpoint as a plain Hugging Face model directory, usable without metake.

The base model is loaded, the checkpoint's edited layers are copied over the matching
parameters, and ``save_pretrained`` writes safetensors, config and tokenizer. The directory is
built under a temporary name beside the destination and renamed into place, so a failed export
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.checkpoint_files import CheckpointFileError, read_weights
from daemon.lineage import head_checkpoint
from engine.models import LoadedModel
from storage.errors import InvalidInput, NotFound
from storage.home import DataHome
from storage.models import Checkpoint

EXPORT_NOTE = "metake-export.json"


@dataclass(frozen=True)
class Exported:
    checkpoint_id: int
    directory: Path
    parameters: list[str]


def check_destination(out: Path) -> None:
    """Refuse a destination that exists and is not an empty directory (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"--out {out} already exists and is not an empty directory")


def check_exportable(session: Session, checkpoint_id: int | None) -> None:
    """What can be checked before the (slow) model load: the checkpoint exists and is kept."""
    if checkpoint_id is None:
        if session.scalars(select(Checkpoint.id).limit(1)).first() is None:
            raise NotFound("there are no checkpoints yet; run `metake apply` or `metake daemon` first")
        return
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"no checkpoint with id {checkpoint_id}")
    if checkpoint.pruned:
        raise InvalidInput(f"checkpoint {checkpoint_id} was pruned by the retention setting; its file is gone")


def choose_checkpoint(session: Session, checkpoint_id: int | None, model_identity: str) -> Checkpoint:
    """The named checkpoint (checked to belong to the model and be kept), or the model's current one."""
    if checkpoint_id is None:
        checkpoint = head_checkpoint(session, model_identity)
        if checkpoint is None:
            raise NotFound("this model has no checkpoints yet; run `metake apply` or `metake daemon` first")
        return checkpoint
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"no checkpoint with id {checkpoint_id}")
    if checkpoint.base_model != model_identity:
        raise InvalidInput(
            f"checkpoint {checkpoint_id} was made from base model {checkpoint.base_model[:23]}…, "
            f"not {model_identity[:23]}…; pass the same --model it was made with"
        )
    if checkpoint.pruned:
        raise InvalidInput(f"checkpoint {checkpoint_id} was pruned by the retention setting; its file is gone")
    return checkpoint


def export_checkpoint(home: DataHome, checkpoint: Checkpoint, loaded: LoadedModel, out: Path) -> Exported:
    """Write ``loaded`` with ``checkpoint``'s edited weights to ``out`` as a Hugging Face directory."""
    check_destination(out)
    try:
        weights = read_weights(home.checkpoints_dir / checkpoint.path, checkpoint.sha256, f"checkpoint {checkpoint.id}")
    except CheckpointFileError as error:
        raise InvalidInput(str(error)) from error
    with torch.no_grad():
        for name, tensor in weights.items():
            try:
                parameter = loaded.model.get_parameter(name)
            except AttributeError as error:
                raise InvalidInput(f"checkpoint {checkpoint.id} edits {name}, which the model lacks") from error
            if parameter.shape != tensor.shape:
                raise InvalidInput(
                    f"checkpoint {checkpoint.id}: {name} has shape {list(tensor.shape)}, "
                    f"the model's has {list(parameter.shape)}"
                )
            parameter.copy_(tensor)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        note = {
            "checkpoint": checkpoint.id,
            "sha256": checkpoint.sha256,
            "base_model": checkpoint.base_model,
            "edited_parameters": sorted(weights),
            "manifest": checkpoint.manifest,
        }
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=2, ensure_ascii=False))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Exported(checkpoint.id, out, sorted(weights))
