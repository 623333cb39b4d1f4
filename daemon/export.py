"""Export a checkpoint as a plain Hugging Face model directory, usable without metake.

The base model is loaded, the checkpoint's edited layers are copied over the matching
parameters, and ``save_pretrained`` writes safetensors, config and tokenizer. The directory is
built under a temporary name beside the destination and renamed into place, so a failed export
leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.checkpoint_files import CheckpointFileError, read_weights
from daemon.settings import check_destination
from engine.files import atomic_directory
from engine.models import LoadedModel
from storage.errors import InvalidInput
from storage.home import DataHome
from storage.models import Checkpoint

EXPORT_NOTE = "metake-export.json"


@dataclass(frozen=True)
class Exported:
    checkpoint_id: int
    directory: Path
    parameters: list[str]


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
    with atomic_directory(out) as tmp:  # ``out`` is absent or empty (checked above)
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
    return Exported(checkpoint.id, out, sorted(weights))
