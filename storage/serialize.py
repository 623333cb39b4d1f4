"""Plain-dict views of stored rows, for ``--json`` output and exports.

Times are ISO 8601 in UTC; enums are their string values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from storage.models import AuditEvent, Checkpoint, Correction, Edit, Metric


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def correction_to_dict(correction: Correction) -> dict[str, Any]:
    return {
        "id": correction.id,
        "model": correction.model,
        "status": correction.status.value,
        "prompt": correction.prompt,
        "subject": correction.subject,
        "target": correction.target,
        "original_answer": correction.original_answer,
        "paraphrases": list(correction.paraphrases),
        "neighbors": list(correction.neighbors),
        "priority": correction.priority,
        "submitter": correction.submitter,
        "source": correction.source,
        "submitted_at": iso(correction.submitted_at),
        "attempts": correction.attempts,
        "last_error": correction.last_error,
        "claimed_by": correction.claimed_by,
        "claimed_at": iso(correction.claimed_at),
        "edit_id": correction.edit_id,
        "superseded_by": correction.superseded_by,
    }


def event_to_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": iso(event.at),
        "kind": event.kind,
        "actor": event.actor,
        "correction_id": event.correction_id,
        "edit_id": event.edit_id,
        "checkpoint_id": event.checkpoint_id,
        "payload": event.payload,
        "hash": event.hash,
    }


def edit_to_dict(edit: Edit) -> dict[str, Any]:
    return {
        "id": edit.id,
        "method": edit.method,
        "model": edit.model,
        "hparams": edit.hparams,
        "layers": edit.layers,
        "started_at": iso(edit.started_at),
        "finished_at": iso(edit.finished_at),
        "timings": edit.timings,
        "checkpoint_before_id": edit.checkpoint_before_id,
        "checkpoint_after_id": edit.checkpoint_after_id,
    }


def metric_to_dict(metric: Metric) -> dict[str, Any]:
    return {
        "id": metric.id,
        "edit_id": metric.edit_id,
        "correction_id": metric.correction_id,
        "name": metric.name,
        "phase": metric.phase.value,
        "value": metric.value,
    }


def checkpoint_to_dict(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "model": checkpoint.model,
        "status": "pruned" if checkpoint.pruned else "kept",
        "parent_id": checkpoint.parent_id,
        "path": checkpoint.path,
        "sha256": checkpoint.sha256,
        "size_bytes": checkpoint.size_bytes,
        "base_model": checkpoint.base_model,
        "created_at": iso(checkpoint.created_at),
        "pruned": checkpoint.pruned,
        "pruned_at": iso(checkpoint.pruned_at),
        "manifest": checkpoint.manifest,
    }
