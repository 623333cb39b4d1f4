"""What `metake status` shows: one screen on the model, its daemon, its queue, its health.

Everything is read from the database in one read-only transaction, so it works while a daemon
is editing and on a machine without the model (an operator's laptop against PostgreSQL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.audit import AuditKind, verify_chain
from storage.checkpoints import head_checkpoint
from storage.edits import edits_of_model
from storage.models import AuditEvent, Checkpoint, Correction, CorrectionStatus, DaemonLease, Edit, Import, ImportStatus
from storage.serialize import iso
from storage.types import utcnow

QUICK_CHECK_EVENTS = 1000
"""How many of the newest events the quick audit check re-hashes (the full walk: `audit verify`)."""


@dataclass
class ModelStatus:
    name: str
    identity: str | None
    """The base model's identity (of its newest checkpoint); None before the first checkpoint."""
    pending: int
    source: str | None
    method: str | None
    layers: list[int]
    edits: int | None
    head_checkpoint: dict[str, Any] | None
    lease: dict[str, Any] | None
    """Holder, since, expires; None when no daemon holds a live lease."""


@dataclass
class Status:
    now: datetime
    models: list[ModelStatus] = field(default_factory=list)
    queue: dict[str, int] = field(default_factory=dict)
    last_applied: dict[str, Any] | None = None
    last_health: dict[str, Any] | None = None
    audit_events: int = 0
    audit_quick_check: str = "empty"
    """``ok`` (the newest events re-hash and link), ``empty``, or what is wrong."""
    imports: list[dict[str, Any]] = field(default_factory=list)
    """Chunked imports still running: id, model, submitter, records, staged so far, started, heartbeat."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": iso(self.now),
            "models": [vars(m) for m in self.models],
            "queue": self.queue,
            "last_applied": self.last_applied,
            "last_health": self.last_health,
            "audit": {"events": self.audit_events, "quick_check": self.audit_quick_check},
            "imports": [
                {**found, "started": iso(found["started"]), "heartbeat": iso(found["heartbeat"])}
                for found in self.imports
            ],
        }


def gather_status(session: Session, model: str | None = None) -> Status:
    """The one-screen status: of every model, or of the model named ``model`` (the queue and the
    last correction and health check then count only its own)."""
    now = utcnow()
    status = Status(now)
    counts_query = select(Correction.status, func.count()).group_by(Correction.status)
    names_query = select(Checkpoint.model).distinct().order_by(Checkpoint.model)
    leases_query = select(DaemonLease).where(DaemonLease.expires_at > now).order_by(DaemonLease.model)
    pending_query = select(Correction.model, func.count()).where(Correction.status == CorrectionStatus.PENDING)
    if model is not None:
        counts_query = counts_query.where(Correction.model == model)
        names_query = names_query.where(Checkpoint.model == model)
        leases_query = leases_query.where(DaemonLease.model == model)
    counts = dict(session.execute(counts_query).all())
    status.imports = _running_imports(session, model)
    status.queue = {s.value: int(counts.get(s, 0)) for s in CorrectionStatus}
    pending = dict(session.execute(pending_query.group_by(Correction.model)).all())
    for name in session.scalars(names_query):
        status.models.append(_model_status(session, name, int(pending.get(name, 0)), now))
    named = {m.name for m in status.models}
    for lease in session.scalars(leases_query):
        if lease.model not in named:  # a daemon that has not written its base checkpoint yet
            waiting = int(pending.get(lease.model, 0))
            status.models.append(ModelStatus(lease.model, None, waiting, None, None, [], None, None, _lease(lease)))
    status.last_applied = _last_applied(session, model)
    status.last_health = _last_health(session, model)
    status.audit_events, status.audit_quick_check = _quick_audit(session)
    return status


def _lease(row: DaemonLease) -> dict[str, Any]:
    return {"holder": row.holder, "since": row.acquired_at, "expires": row.expires_at}


def _model_status(session: Session, model: str, pending: int, now: datetime) -> ModelStatus:
    head = head_checkpoint(session, model)
    assert head is not None
    manifest = head.manifest or {}
    hparams = manifest.get("hparams") or {}
    lease = session.scalars(select(DaemonLease).where(DaemonLease.model == model, DaemonLease.expires_at > now)).first()
    return ModelStatus(
        name=model,
        identity=head.base_model,
        pending=pending,
        source=manifest.get("model_source"),
        method=manifest.get("method"),
        layers=list(hparams.get("layers") or []),
        edits=manifest.get("edits"),
        head_checkpoint={
            "id": head.id,
            "created_at": head.created_at,
            "size_bytes": head.size_bytes,
            "kind": manifest.get("kind"),
        },
        lease=_lease(lease) if lease is not None else None,
    )


def _last_applied(session: Session, model: str | None) -> dict[str, Any] | None:
    query = (
        select(Correction.id, Correction.subject, Correction.target, Edit.finished_at)
        .join(Edit, Edit.id == Correction.edit_id)
        .where(Correction.status == CorrectionStatus.APPLIED)
        .order_by(Edit.id.desc(), Correction.id.desc())
        .limit(1)
    )
    if model is not None:
        query = query.where(Correction.model == model)
    row = session.execute(query).first()
    if row is None:
        return None
    return {"id": row.id, "subject": row.subject, "target": row.target, "at": row.finished_at}


def _last_health(session: Session, model: str | None) -> dict[str, Any] | None:
    query = (
        select(AuditEvent.at, AuditEvent.payload)
        .where(AuditEvent.kind == AuditKind.HEALTH_CHECKED)
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    if model is not None:  # a health check follows an edit, whose after-checkpoint names the model
        query = query.where(AuditEvent.edit_id.in_(edits_of_model(model)))
    row = session.execute(query).first()
    if row is None:
        return None
    payload = row.payload or {}
    keep = ("retention", "gen_retention", "tested", "perplexity", "base_perplexity", "perplexity_ratio")
    return {"at": row.at} | {k: payload.get(k) for k in keep if k in payload}


def _quick_audit(session: Session) -> tuple[int, str]:
    """The chain's length and a check of its newest events (ids consecutive, links and hashes)."""
    newest = session.scalar(select(func.max(AuditEvent.id)))
    count = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
    if not newest:
        return 0, "empty"
    if newest != count:
        return count, f"the newest id is {newest} but there are {count} events (events are missing)"
    broken = verify_chain(session, start=max(1, newest - QUICK_CHECK_EVENTS + 1))
    return count, "ok" if broken is None else f"broken at event {broken.event_id}: {broken.reason}"


def _running_imports(session: Session, model: str | None) -> list[dict[str, Any]]:
    staged = (
        select(func.count())
        .where(Correction.import_id == Import.id, Correction.status == CorrectionStatus.STAGED)
        .scalar_subquery()
    )
    query = select(Import, staged).where(Import.status == ImportStatus.RUNNING).order_by(Import.id)
    if model is not None:
        query = query.where(Import.model == model)
    return [
        {
            "id": found.id,
            "model": found.model,
            "submitter": found.submitter,
            "records": found.records,
            "staged": int(count),
            "started": found.started_at,
            "heartbeat": found.heartbeat_at,
        }
        for found, count in session.execute(query).all()
    ]
