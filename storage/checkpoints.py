"""Checkpoint rows: a model's checkpoint tree, adding one, retention (pruning), choosing one to export.

Every checkpoint names its parent; the newest checkpoint of a base model is the model's current
state (a revert writes a new checkpoint whose parent is the restored one). The corrections in a
checkpoint are listed in its manifest, so "what does reverting to X undo" is a set difference.
Pruning deletes a file but never its row: the table keeps the history (and the hash) of every
state the model was ever in, and a revert to a pruned checkpoint is refused by name.

Writers work inside the caller's transaction and never commit (see storage.queue).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import AuditKind, append_event
from storage.edits import edit_digest
from storage.errors import InvalidInput, NotFound
from storage.models import DEFAULT_MODEL_NAME, Checkpoint, RevertRequest, RevertStatus
from storage.types import utcnow


@dataclass(frozen=True)
class Retention:
    """Which checkpoint files to keep: the newest ``keep_last`` and every ``keep_every``-th one.

    The first checkpoint (the unedited model) is always kept, as is any checkpoint a pending
    revert request names. ``keep_every = 0`` keeps no extra ones.
    """

    keep_last: int = 5
    keep_every: int = 10

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise InvalidInput(f"--keep-last must be at least 1 (the current checkpoint), got {self.keep_last}")
        if self.keep_every < 0:
            raise InvalidInput(f"--keep-every must be 0 (off) or more, got {self.keep_every}")


# ----- the tree --------------------------------------------------------------------------------


def head_checkpoint(session: Session, model: str) -> Checkpoint | None:
    """The newest checkpoint of the model named ``model`` (its current state), or None before the first."""
    query = select(Checkpoint).where(Checkpoint.model == model).order_by(Checkpoint.id.desc()).limit(1)
    return session.scalars(query).first()


def model_checkpoints(session: Session, model: str) -> list[Checkpoint]:
    """All checkpoints of the model named ``model``, oldest first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.model == model).order_by(Checkpoint.id)))


def all_checkpoints(session: Session) -> list[Checkpoint]:
    """Every checkpoint of every model, oldest first."""
    return list(session.scalars(select(Checkpoint).order_by(Checkpoint.id)))


def kept_paths(session: Session) -> set[str]:
    """The files (relative to the checkpoints folder) of every checkpoint not pruned."""
    return set(session.scalars(select(Checkpoint.path).where(Checkpoint.pruned.is_(False))))


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


# ----- adding ----------------------------------------------------------------------------------


def add_checkpoint(
    session: Session,
    *,
    path: str,
    sha256: str,
    size_bytes: int,
    model: str,
    base_model: str,
    parent_id: int | None,
    manifest: dict[str, Any],
    created_at: datetime,
) -> Checkpoint:
    """The checkpoint row of the model named ``model``, made from the weights ``base_model``; its
    manifest gets the file's sha256 (which the file cannot hold)."""
    row = Checkpoint(
        model=model,
        parent_id=parent_id,
        path=path,
        sha256=sha256,
        size_bytes=size_bytes,
        base_model=base_model,
        created_at=created_at,
        pruned=False,
        manifest=manifest | {"sha256": sha256, "size_bytes": size_bytes},
    )
    session.add(row)
    session.flush()
    return row


def audit_checkpoint(session: Session, checkpoint: Checkpoint, actor: str, edit_id: int | None = None) -> None:
    append_event(
        session,
        AuditKind.CHECKPOINT_WRITTEN,
        actor=actor,
        checkpoint_id=checkpoint.id,
        edit_id=edit_id,
        payload={
            "kind": checkpoint.manifest.get("kind"),
            "model": checkpoint.model,
            "parent": checkpoint.parent_id,
            "sha256": checkpoint.sha256,
            "size_bytes": checkpoint.size_bytes,
            **({"edit_sha256": edit_digest(session, edit_id)} if edit_id is not None else {}),
        },
    )


# ----- retention -------------------------------------------------------------------------------


def checkpoints_to_prune(
    ids_oldest_first: Sequence[int],
    already_pruned: Collection[int],
    retention: Retention,
    protected: Collection[int] = (),
) -> list[int]:
    """The ids (of one model's checkpoints) whose files should go now.

    The k-th checkpoint (counting the first as 0) is kept when it is among the newest
    ``keep_last``, when ``keep_every`` divides k (so the first is always kept), or when it is
    protected (e.g. named by a pending revert request).
    """
    newest = set(ids_oldest_first[-retention.keep_last :])
    doomed: list[int] = []
    for ordinal, checkpoint_id in enumerate(ids_oldest_first):
        every_mth = ordinal == 0 or (retention.keep_every > 0 and ordinal % retention.keep_every == 0)
        if checkpoint_id in newest or every_mth or checkpoint_id in protected or checkpoint_id in already_pruned:
            continue
        doomed.append(checkpoint_id)
    return doomed


def prune(session: Session, model: str, retention: Retention, actor: str) -> list[str]:
    """Mark the checkpoints of the model named ``model`` that retention lets go as pruned; returns
    their files for deletion after commit."""
    checkpoints = model_checkpoints(session, model)
    pending_targets = set(
        session.scalars(select(RevertRequest.checkpoint_id).where(RevertRequest.status == RevertStatus.PENDING))
    )
    doomed = checkpoints_to_prune(
        [c.id for c in checkpoints],
        {c.id for c in checkpoints if c.pruned},
        retention,
        protected=pending_targets,
    )
    by_id = {c.id: c for c in checkpoints}
    now = utcnow()
    paths: list[str] = []
    for checkpoint_id in doomed:
        row = by_id[checkpoint_id]
        row.pruned = True
        row.pruned_at = now
        paths.append(row.path)
    session.flush()
    for checkpoint_id in doomed:
        append_event(
            session,
            AuditKind.CHECKPOINT_PRUNED,
            actor=actor,
            checkpoint_id=checkpoint_id,
            payload={"keep_last": retention.keep_last, "keep_every": retention.keep_every},
        )
    return paths


# ----- export ----------------------------------------------------------------------------------


def check_exportable(session: Session, checkpoint_id: int | None, model: str = DEFAULT_MODEL_NAME) -> None:
    """What can be checked before the (slow) model load: the checkpoint exists and is kept; without
    an id, the model named ``model`` has a current checkpoint."""
    if checkpoint_id is None:
        if head_checkpoint(session, model) is None:
            raise NotFound(f"model {model!r} has no checkpoints yet; run `metake apply` or `metake daemon` first")
        return
    _kept(session, checkpoint_id)


def choose_checkpoint(session: Session, checkpoint_id: int | None, model: str, model_identity: str) -> Checkpoint:
    """The checkpoint with this id, or else the current one of the model named ``model``, checked to
    be kept and to come from the weights ``model_identity``."""
    check_exportable(session, checkpoint_id, model)
    checkpoint = head_checkpoint(session, model) if checkpoint_id is None else session.get(Checkpoint, checkpoint_id)
    assert checkpoint is not None
    if checkpoint.base_model != model_identity:
        raise InvalidInput(
            f"checkpoint {checkpoint.id} was made from base model {checkpoint.base_model[:23]}…, "
            f"not {model_identity[:23]}…; pass the same --model it was made with"
        )
    return checkpoint


def _kept(session: Session, checkpoint_id: int) -> Checkpoint:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"no checkpoint with id {checkpoint_id}")
    if checkpoint.pruned:
        raise InvalidInput(f"checkpoint {checkpoint_id} was pruned by the retention setting; its file is gone")
    return checkpoint
