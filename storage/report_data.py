"""What `metake report` draws, read from the database in one pass per table (storage owns the SQL).

Plain rows (tuples and dicts), so that drawing needs no session and 10,000 corrections stay a few
queries, not one per correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import AuditKind
from storage.edits import edits_of_model
from storage.models import AuditEvent, Checkpoint, Correction, Edit, Metric, Phase

PROBABILITY_METRICS = ("target_prob", "original_prob")
LATEST = 50
"""Corrections listed in the report's table."""


@dataclass
class ReportData:
    since: datetime | None
    corrections: list[dict[str, Any]] = field(default_factory=list)
    """id, model, subject, target, status, submitted_at, applied_at (of its edit), in id order."""
    probabilities: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per applied correction: ``target_prob.pre`` / ``.post`` and the same for ``original_prob``."""
    realised_gain: list[float] = field(default_factory=list)
    weight_change: list[tuple[datetime, str, float]] = field(default_factory=list)
    """(edit finished, layer, ||dW|| / ||W||) per edit and layer."""
    health: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def report_data(session: Session, since: datetime | None = None, model: str | None = None) -> ReportData:
    """The report's figures and tables: of every model, or only of the model named ``model``."""
    data = ReportData(since)
    query = (
        select(
            Correction.id,
            Correction.model,
            Correction.subject,
            Correction.target,
            Correction.status,
            Correction.submitted_at,
        )
        .add_columns(Edit.finished_at)
        .outerjoin(Edit, Edit.id == Correction.edit_id)
        .order_by(Correction.id)
    )
    if since is not None:
        query = query.where(Correction.submitted_at >= since)
    if model is not None:
        query = query.where(Correction.model == model)
    for row in session.execute(query):
        data.corrections.append(
            {
                "id": row.id,
                "model": row.model,
                "subject": row.subject,
                "target": row.target,
                "status": row.status.value,
                "submitted_at": row.submitted_at,
                "applied_at": row.finished_at,
            }
        )
    first_id = data.corrections[0]["id"] if data.corrections else None
    metrics = (
        select(Metric.correction_id, Metric.name, Metric.phase, Metric.value, Edit.finished_at)
        .join(Edit, Edit.id == Metric.edit_id)
        .where(
            (Metric.name.in_([*PROBABILITY_METRICS, "realised_gain"])) | Metric.name.like("relative_weight_change.%")
        )
    )
    if since is not None:
        metrics = metrics.where(Edit.finished_at >= since)
    if model is not None:
        metrics = metrics.where(Edit.id.in_(edits_of_model(model)))
    for correction_id, name, phase, value, finished in session.execute(metrics):
        if name == "realised_gain":
            data.realised_gain.append(value)
        elif name.startswith("relative_weight_change.") and finished is not None:
            data.weight_change.append((finished, name.removeprefix("relative_weight_change."), value))
        elif correction_id is not None and (first_id is None or correction_id >= first_id):
            key = f"{name}.{'pre' if phase == Phase.PRE else 'post'}"
            data.probabilities.setdefault(correction_id, {})[key] = value
    health = select(AuditEvent.at, AuditEvent.payload).where(AuditEvent.kind == AuditKind.HEALTH_CHECKED)
    if since is not None:
        health = health.where(AuditEvent.at >= since)
    if model is not None:  # a health check follows an edit of its model
        health = health.where(AuditEvent.edit_id.in_(edits_of_model(model)))
    for at, payload in session.execute(health.order_by(AuditEvent.id)):
        data.health.append({"at": at, **{k: payload.get(k) for k in ("retention", "perplexity_ratio", "tested")}})
    checkpoints = select(Checkpoint).order_by(Checkpoint.id)
    if model is not None:
        checkpoints = checkpoints.where(Checkpoint.model == model)
    for row in session.scalars(checkpoints):
        manifest = row.manifest or {}
        data.checkpoints.append(
            {
                "id": row.id,
                "parent": row.parent_id,
                "created_at": row.created_at,
                "kind": manifest.get("kind"),
                "pruned": row.pruned,
                "size_bytes": row.size_bytes,
            }
        )
    return data
