"""Checkpoint files: a bitwise round trip, tampering detected, files no row keeps removed, deletion
confined to the checkpoints folder."""

from __future__ import annotations

import pytest
import torch

from daemon.checkpoint_files import (
    CheckpointContents,
    CheckpointFileError,
    delete_files,
    read_checkpoint,
    remove_unlisted,
    tensors_sha256,
    write_checkpoint,
)
from engine.state import EditorState

MODEL = "sha256:" + "ab" * 32


def _contents() -> CheckpointContents:
    torch.manual_seed(0)
    weights = {"model.layers.1.mlp.down_proj.weight": torch.randn(8, 16)}
    state = EditorState.fresh(MODEL, (1,), 16, prefixes=("The cat. ",)).after_batch({1: torch.randn(16, 16)}, 1)
    return CheckpointContents(weights, state, {"kind": "edit", "corrections": [1]})


def test_checkpoint_file_round_trip_is_bitwise_and_tampering_is_detected(tmp_path):
    contents = _contents()
    written = write_checkpoint(tmp_path, "m/one.safetensors", contents)
    path = tmp_path / written.relative_path
    assert written.size_bytes == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["one.safetensors"]  # no temporary file left
    back = read_checkpoint(path, written.sha256, "checkpoint 1", "cpu")
    assert tensors_sha256(back.weights) == tensors_sha256(contents.weights)
    assert back.state.equals(contents.state) and back.manifest == contents.manifest
    with pytest.raises(CheckpointFileError, match="checkpoint 1: file .* has sha256 .* altered or damaged"):
        read_checkpoint(path, "0" * 64, "checkpoint 1", "cpu")
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointFileError, match="altered or damaged"):
        read_checkpoint(path, written.sha256, "checkpoint 1", "cpu")
    path.unlink()
    with pytest.raises(CheckpointFileError, match="is missing"):
        read_checkpoint(path, written.sha256, "checkpoint 1", "cpu")


def test_files_no_row_keeps_are_removed(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("kept.safetensors", "orphan.safetensors", ".orphan.safetensors.x.tmp", "notes.txt"):
        (folder / name).write_text("x")
    removed = remove_unlisted(folder, {"m/kept.safetensors"}, tmp_path)
    assert sorted(p.name for p in removed) == [".orphan.safetensors.x.tmp", "orphan.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["kept.safetensors", "notes.txt"]


def test_deleting_never_leaves_the_checkpoints_folder(tmp_path):
    """A rewritten row path (``../``, absolute, through a symlink) must not delete files elsewhere."""
    root = tmp_path / "checkpoints"
    (root / "m").mkdir(parents=True)
    (root / "m" / "a.safetensors").write_text("x")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (root / "m" / "link").symlink_to(tmp_path)
    paths = ["m/a.safetensors", "../victim.txt", str(victim), "m/link/victim.txt", "."]
    assert delete_files(root, paths) == ["../victim.txt", str(victim), "m/link/victim.txt", "."]
    assert victim.read_text() == "keep me"
    assert not (root / "m" / "a.safetensors").exists()
