"""Read-only questions the CLI, the demo and the health checks ask of the store."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from storage.errors import NotFound
from storage.models import AuditEvent, Correction, CorrectionStatus, Edit, Metric
from storage.queue import CLAIM_ORDER


@dataclass(frozen=True)
class CorrectionStory:
    """One correction with everything recorded about it."""

    correction: Correction
    events: list[AuditEvent]
    edit: Edit | None
    metrics: list[Metric]


def queued_corrections(
    session: Session,
    statuses: Collection[CorrectionStatus] = (CorrectionStatus.PENDING, CorrectionStatus.APPLYING),
    model: str | None = None,
) -> list[Correction]:
    """Corrections in the given statuses (of one model, or all), in the order a daemon would claim them."""
    query = select(Correction).where(Correction.status.in_(list(statuses))).order_by(*CLAIM_ORDER)
    if model is not None:
        query = query.where(Correction.model == model)
    return list(session.scalars(query))


def correction_history(
    session: Session,
    *,
    subject: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    statuses: Collection[CorrectionStatus] = (),
    limit: int | None = None,
    model: str | None = None,
) -> list[Correction]:
    """Corrections submitted in ``[since, until)``, oldest first, optionally filtered."""
    query = select(Correction)
    if model is not None:
        query = query.where(Correction.model == model)
    if subject is not None:
        query = query.where(Correction.subject == subject)
    if since is not None:
        query = query.where(Correction.submitted_at >= since)
    if until is not None:
        query = query.where(Correction.submitted_at < until)
    if statuses:
        query = query.where(Correction.status.in_(list(statuses)))
    query = query.order_by(Correction.submitted_at, Correction.id).limit(limit)
    return list(session.scalars(query))


def correction_story(session: Session, correction_id: int) -> CorrectionStory:
    """The correction, its audit events, its edit and the metrics about it; NotFound if absent."""
    correction = session.get(Correction, correction_id)
    if correction is None:
        raise NotFound(f"no correction with id {correction_id}")
    about = AuditEvent.correction_id == correction_id
    if correction.edit_id is not None:  # plus the events of its edit as a whole
        about = or_(about, (AuditEvent.edit_id == correction.edit_id) & AuditEvent.correction_id.is_(None))
    events = list(session.scalars(select(AuditEvent).where(about).order_by(AuditEvent.id)))
    metrics: list[Metric] = []
    if correction.edit_id is not None:
        metrics = list(
            session.scalars(
                select(Metric)
                .where(
                    Metric.edit_id == correction.edit_id,
                    or_(Metric.correction_id == correction_id, Metric.correction_id.is_(None)),
                )
                .order_by(Metric.name, Metric.phase, Metric.id)
            )
        )
    return CorrectionStory(correction, events, correction.edit, metrics)


def metrics_by_correction(session: Session, correction_ids: Collection[int]) -> dict[int, list[Metric]]:
    """Every metric recorded about each of these corrections (its edit's and later health checks')."""
    found: dict[int, list[Metric]] = {}
    ids = list(correction_ids)
    for start in range(0, len(ids), 500):  # stay well under the backends' bound-parameter limits
        query = (
            select(Metric)
            .where(Metric.correction_id.in_(ids[start : start + 500]))
            .order_by(Metric.correction_id, Metric.edit_id, Metric.name, Metric.phase, Metric.id)
        )
        for metric in session.scalars(query):
            found.setdefault(metric.correction_id or 0, []).append(metric)
    return found


def sample_applied(session: Session, model: str, exclude: list[int], size: int, seed: int) -> list[Correction]:
    """Up to ``size`` of ``model``'s applied corrections not in ``exclude``, chosen reproducibly from ``seed``."""
    query = select(Correction.id).where(Correction.model == model, Correction.status == CorrectionStatus.APPLIED)
    if exclude:
        query = query.where(Correction.id.not_in(exclude))
    ids = sorted(session.scalars(query))
    chosen = sorted(random.Random(seed).sample(ids, min(len(ids), size)))
    if not chosen:
        return []
    return list(session.scalars(select(Correction).where(Correction.id.in_(chosen)).order_by(Correction.id)))


def all_corrections(session: Session) -> list[Correction]:
    return list(session.scalars(select(Correction).order_by(Correction.id)))


def all_metrics(session: Session) -> list[Metric]:
    return list(session.scalars(select(Metric).order_by(Metric.id)))
