"""A model's checkpoints as a tree: which one is current, and which ones it descends from.

Every checkpoint names its parent; the newest checkpoint of a base model is the model's current
state (a revert writes a new checkpoint whose parent is the restored one). The corrections in a
checkpoint are listed in its manifest, so "what does reverting to X undo" is a set difference.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Checkpoint


def head_checkpoint(session: Session, model: str) -> Checkpoint | None:
    """The newest checkpoint of ``model`` (the model's current state), or None before the first."""
    query = select(Checkpoint).where(Checkpoint.base_model == model).order_by(Checkpoint.id.desc()).limit(1)
    return session.scalars(query).first()


def model_checkpoints(session: Session, model: str) -> list[Checkpoint]:
    """All checkpoints of ``model``, oldest first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.base_model == model).order_by(Checkpoint.id)))


def ancestry(checkpoints: list[Checkpoint], start_id: int) -> list[int]:
    """Ids from ``start_id`` back to the root, following parents (``start_id`` first)."""
    parent_of = {c.id: c.parent_id for c in checkpoints}
    chain: list[int] = []
    current: int | None = start_id
    while current is not None and current not in chain:
        chain.append(current)
        current = parent_of.get(current)
    return chain


def applied_corrections(checkpoint: Checkpoint) -> list[int]:
    """The correction ids whose edits the checkpoint's weights contain."""
    return [int(i) for i in checkpoint.manifest.get("applied_corrections", [])]
