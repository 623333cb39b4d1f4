"""The rows the daemon writes: checkpoints, edits, metrics, pruning, and releasing stale claims.

These functions work inside the caller's transaction and never commit, like storage.queue:
a batch's checkpoint, edit, metrics, status changes and audit events commit together or not at
all. Callers lock correction rows before the first audit append (the store's lock order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from daemon.checkpoint_files import WrittenFile
from daemon.lineage import model_checkpoints
from daemon.retention import checkpoints_to_prune
from daemon.settings import Retention
from storage.audit import AuditKind, append_event
from storage.models import (
    Checkpoint,
    Correction,
    CorrectionStatus,
    DaemonLease,
    Edit,
    Metric,
    Phase,
    RevertRequest,
    RevertStatus,
)
from storage.queue import release_claimed
from storage.types import utcnow


@dataclass(frozen=True)
class Figure:
    """One measured value: about a correction (or the whole batch when None), before or after."""

    correction_id: int | None
    name: str
    phase: Phase
    value: float


def add_checkpoint(
    session: Session,
    written: WrittenFile,
    *,
    model: str,
    parent_id: int | None,
    manifest: dict[str, Any],
    created_at: datetime,
) -> Checkpoint:
    """The checkpoint row; its manifest gets the file's sha256 (which the file cannot hold)."""
    row = Checkpoint(
        parent_id=parent_id,
        path=written.relative_path,
        sha256=written.sha256,
        size_bytes=written.size_bytes,
        base_model=model,
        created_at=created_at,
        pruned=False,
        manifest=manifest | {"sha256": written.sha256, "size_bytes": written.size_bytes},
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
            "parent": checkpoint.parent_id,
            "sha256": checkpoint.sha256,
            "size_bytes": checkpoint.size_bytes,
        },
    )


def add_edit(
    session: Session,
    *,
    method: str,
    model: str,
    hparams: dict[str, Any],
    layers: list[int],
    started_at: datetime,
    finished_at: datetime,
    timings: dict[str, Any],
    before_id: int | None,
    after_id: int,
) -> Edit:
    edit = Edit(
        method=method,
        model=model,
        hparams=hparams,
        layers=layers,
        started_at=started_at,
        finished_at=finished_at,
        timings=timings,
        checkpoint_before_id=before_id,
        checkpoint_after_id=after_id,
    )
    session.add(edit)
    session.flush()
    return edit


def add_metrics(session: Session, edit_id: int, figures: Iterable[Figure]) -> int:
    """Store the finite figures (a NaN says nothing and JSON cannot carry it); returns how many."""
    rows = [
        Metric(edit_id=edit_id, correction_id=f.correction_id, name=f.name, phase=f.phase, value=float(f.value))
        for f in figures
        if math.isfinite(f.value)
    ]
    session.add_all(rows)
    session.flush()
    return len(rows)


def prune(session: Session, model: str, retention: Retention, actor: str) -> list[str]:
    """Mark the checkpoints retention lets go as pruned; returns their files for deletion after commit."""
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


def release_stale_claims(session: Session, me: str, reason: str) -> list[int]:
    """Return to pending every correction claimed by a worker that holds no live lease.

    A claim outlives its worker only when the worker died between claiming and recording, so
    its corrections were never applied; the caller holds the lease, so no one else is applying.
    """
    now = utcnow()
    live = set(session.scalars(select(DaemonLease.holder).where(DaemonLease.expires_at > now)))
    applying = session.scalars(
        select(Correction)
        .where(Correction.status == CorrectionStatus.APPLYING)
        .order_by(Correction.id)
        .with_for_update()
    ).all()
    others = live - {me}
    stale_workers = sorted({c.claimed_by for c in applying if c.claimed_by is not None and c.claimed_by not in others})
    released: list[int] = []
    for worker in stale_workers:
        released += release_claimed(session, worker, actor=me[:100], reason=reason)
    return released


def lock_corrections(session: Session, ids: Iterable[int]) -> None:
    """Take the row locks of a batch's corrections before the first audit append."""
    wanted = sorted(set(ids))
    if wanted:
        session.scalars(select(Correction.id).where(Correction.id.in_(wanted)).with_for_update()).all()


def pending_count(session: Session) -> int:
    query = select(func.count()).select_from(Correction).where(Correction.status == CorrectionStatus.PENDING)
    return session.scalar(query) or 0
