"""Edit rows and the metrics measured about them (before and after, per correction or per batch).

Writers work inside the caller's transaction and never commit, like storage.queue: a batch's
checkpoint, edit, metrics, status changes and audit events commit together or not at all.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from storage.audit import canonical_json
from storage.models import Checkpoint, Edit, Metric, Phase


@dataclass(frozen=True)
class MetricValue:
    """A metric to record: about a correction (or the whole batch when None), before or after."""

    correction_id: int | None
    name: str
    phase: Phase
    value: float


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


def add_metrics(session: Session, edit_id: int, values: Iterable[MetricValue]) -> int:
    """Store the finite values (a NaN says nothing and JSON cannot carry it); returns how many."""
    rows = [
        Metric(edit_id=edit_id, correction_id=v.correction_id, name=v.name, phase=v.phase, value=float(v.value))
        for v in values
        if math.isfinite(v.value)
    ]
    session.add_all(rows)
    session.flush()
    return len(rows)


def edit_digest(session: Session, edit_id: int) -> str:
    """sha256 of an edit's row and its metrics as the batch recorded them (health checks, which add
    ``health.*`` metrics to an edit later, are left out); the batch's checkpoint_written event
    carries it, so that `audit verify` finds an edit or a metric changed afterwards."""
    edit = session.get(Edit, edit_id)
    if edit is None:
        raise ValueError(f"edit {edit_id} does not exist")
    metrics = session.execute(
        select(Metric.correction_id, Metric.name, Metric.phase, Metric.value)
        .where(Metric.edit_id == edit_id, ~Metric.name.like("health.%"))
        .order_by(Metric.correction_id, Metric.name, Metric.phase, Metric.value)
    ).all()
    content = {
        "method": edit.method,
        "model": edit.model,
        "layers": list(edit.layers),
        "hparams": edit.hparams,
        "before": edit.checkpoint_before_id,
        "after": edit.checkpoint_after_id,
        "metrics": [[c, n, Phase(p).value, repr(float(v))] for c, n, p, v in metrics],
    }
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def edits_of_model(model: str) -> Select[tuple[int]]:
    """The ids of the edits of the model named ``model`` (for ``IN``): an edit belongs to the model
    of the checkpoint it produced."""
    after = Checkpoint.id == Edit.checkpoint_after_id
    return select(Edit.id).join(Checkpoint, after).where(Checkpoint.model == model)
