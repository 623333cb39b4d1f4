"""The rows people read, checked against the audit events that made them.

The hash chain (``storage.audit``) proves that the events were not changed. This proves that the
rows the tools show still say what the events recorded: each correction's text and submitter
against its ``submitted`` event, its status against its latest event, each checkpoint's file hash,
size and parent against its ``checkpoint_written`` event and its pruned flag against a
``checkpoint_pruned`` event. A row without the event that created it was forged; an event whose
row is gone means the row was deleted.

Submitted events written before the whole correction was recorded in them carry only the target
and priority, and those written before several models shared a database carry no model; for
those rows only what they carry is compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import AuditKind, payload_text
from storage.edits import edit_digest
from storage.models import AuditEvent, Checkpoint, Correction, CorrectionStatus, Edit, Import, ImportStatus

SUBMITTED_FIELDS = (
    "model",
    "prompt",
    "subject",
    "target",
    "original_answer",
    "paraphrases",
    "neighbors",
    "priority",
    "source",
    "import_id",
)
"""What a ``submitted`` event records of its correction (besides the submitter, its actor)."""

_OPTIONAL_FIELDS = ("source", "import_id")
"""Recorded only when set; a whole (``prompt``-carrying) event without one says the row has none."""

_STATUS_AFTER = {
    AuditKind.SUBMITTED: CorrectionStatus.PENDING,
    AuditKind.SUPERSEDED: CorrectionStatus.SUPERSEDED,
    AuditKind.CLAIMED: CorrectionStatus.APPLYING,
    AuditKind.RELEASED: CorrectionStatus.PENDING,
    AuditKind.APPLIED: CorrectionStatus.APPLIED,
    AuditKind.REJECTED: CorrectionStatus.REJECTED,
    AuditKind.REVERTED: CorrectionStatus.REVERTED,
}


def submitted_payload(correction: Correction) -> dict[str, Any]:
    """The ``submitted`` event's payload: the whole correction as it was queued."""
    payload = {name: getattr(correction, name) for name in SUBMITTED_FIELDS}
    for optional in _OPTIONAL_FIELDS:
        if payload[optional] is None:
            del payload[optional]
    return payload


@dataclass(frozen=True)
class RowMismatch:
    """The first row that does not match its events, and how."""

    table: str
    row_id: int
    reason: str


@dataclass
class _Story:
    submitted: dict[str, Any] | None = None
    submitter: str | None = None
    status: CorrectionStatus | None = None


@dataclass
class _CheckpointStory:
    written: dict[str, Any] | None = None
    pruned: bool = False


@dataclass
class _ImportStory:
    started: dict[str, Any]
    submitter: str
    status: ImportStatus = ImportStatus.RUNNING
    corrections: list[int] = field(default_factory=list)


@dataclass
class RowReport:
    corrections: int = 0
    checkpoints: int = 0
    edits: int = 0
    imports: int = 0
    mismatch: RowMismatch | None = None


def _events(session: Session) -> Iterator[tuple[str, int | None, int | None, str, dict[str, Any], int | None]]:
    table = AuditEvent.__table__
    query = (
        select(
            table.c.kind,
            table.c.correction_id,
            table.c.checkpoint_id,
            table.c.actor,
            payload_text(),
            table.c.edit_id,
        )
        .order_by(table.c.id)
        .execution_options(yield_per=1000)
    )
    with session.execute(query) as rows:
        for kind, correction_id, checkpoint_id, actor, payload, edit_id in rows:
            yield kind, correction_id, checkpoint_id, actor, json.loads(payload) if payload else {}, edit_id


def verify_rows(session: Session) -> RowReport:
    """Compare every correction and checkpoint row with its events; stops at the first mismatch.

    Call it after ``verify_chain`` has passed (the events themselves are then trusted).
    """
    stories: dict[int, _Story] = {}
    checkpoints: dict[int, _CheckpointStory] = {}
    edits: dict[int, str | None] = {}
    """Edit id -> the digest its checkpoint_written event recorded (None: an event from before digests)."""
    imports: dict[int, _ImportStory] = {}
    for kind, correction_id, checkpoint_id, actor, payload, edit_id in _events(session):
        if kind == AuditKind.CHECKPOINT_WRITTEN and edit_id is not None:
            edits[edit_id] = payload.get("edit_sha256")
        if kind in _IMPORT_KINDS:
            _import_event(AuditKind(kind), payload, actor, imports, stories)
        if correction_id is not None:
            story = stories.setdefault(correction_id, _Story())
            if kind == AuditKind.SUBMITTED:
                story.submitted, story.submitter = payload, actor
            if kind == AuditKind.SUBMITTED and payload.get("import_id") is not None:
                story.status = CorrectionStatus.STAGED
                if payload["import_id"] in imports:
                    imports[payload["import_id"]].corrections.append(correction_id)
            elif kind == AuditKind.FAILED:
                story.status = CorrectionStatus.PENDING if payload.get("retry") else CorrectionStatus.FAILED
            elif kind in _STATUS_AFTER:
                story.status = _STATUS_AFTER[AuditKind(kind)]
        elif checkpoint_id is not None and kind == AuditKind.CHECKPOINT_WRITTEN:
            checkpoints.setdefault(checkpoint_id, _CheckpointStory()).written = payload
        if checkpoint_id is not None and kind == AuditKind.CHECKPOINT_PRUNED:
            checkpoints.setdefault(checkpoint_id, _CheckpointStory()).pruned = True
    report = RowReport()
    report.mismatch = (
        _check_corrections(session, stories, report)
        or _check_checkpoints(session, checkpoints, report)
        or _check_edits(session, edits, report)
        or _check_imports(session, imports, report)
    )
    return report


_IMPORT_KINDS = frozenset({AuditKind.IMPORT_STARTED, AuditKind.IMPORT_COMPLETED, AuditKind.IMPORT_ABANDONED})


def _import_event(
    kind: AuditKind, payload: dict[str, Any], actor: str, imports: dict[int, _ImportStory], stories: dict[int, _Story]
) -> None:
    """An import's start, or its end, which settles every correction it staged at once."""
    import_id = payload.get("import_id")
    if kind == AuditKind.IMPORT_STARTED:
        imports[import_id] = _ImportStory(payload, actor)
        return
    found = imports.get(import_id)
    if found is None:
        return  # an end without a start: _check_imports reports the row, or nothing exists to check
    found.status = ImportStatus.COMPLETE if kind == AuditKind.IMPORT_COMPLETED else ImportStatus.ABANDONED
    settled = CorrectionStatus.PENDING if kind == AuditKind.IMPORT_COMPLETED else CorrectionStatus.ABANDONED
    for correction_id in found.corrections:
        if stories[correction_id].status == CorrectionStatus.STAGED:
            stories[correction_id].status = settled


def _check_imports(session: Session, stories: dict[int, _ImportStory], report: RowReport) -> RowMismatch | None:
    """Each import row against its import_started event and the event that ended it."""
    seen: set[int] = set()
    for row in session.scalars(select(Import).order_by(Import.id)):
        seen.add(row.id)
        report.imports += 1
        story = stories.get(row.id)
        if story is None:
            return RowMismatch("imports", row.id, "it has no import_started event (the row was forged)")
        fields = {"records": row.records, "model": row.model, "source": row.source}
        for name, value in fields.items():
            if story.started.get(name) != value:
                return RowMismatch("imports", row.id, f"its {name} differs from its import_started event")
        if row.submitter != story.submitter:
            return RowMismatch("imports", row.id, "its submitter differs from its import_started event")
        if row.status != story.status:
            said = story.status.value
            return RowMismatch("imports", row.id, f"its status is {row.status.value}, its events say {said}")
    for import_id in sorted(set(stories) - seen):
        return RowMismatch("imports", import_id, "its events exist but the row is gone (deleted)")
    return None


def _check_edits(session: Session, recorded: dict[int, str | None], report: RowReport) -> RowMismatch | None:
    """Each edit against the digest of its row and metrics in its checkpoint_written event."""
    for edit_id in session.scalars(select(Edit.id).order_by(Edit.id)):
        report.edits += 1
        if edit_id not in recorded:
            return RowMismatch("edits", edit_id, "it has no checkpoint_written event (the row was forged)")
        digest = recorded[edit_id]
        if digest is not None and digest != edit_digest(session, edit_id):
            return RowMismatch("edits", edit_id, "its row or its metrics differ from its checkpoint_written event")
    return None


def _check_corrections(session: Session, stories: dict[int, _Story], report: RowReport) -> RowMismatch | None:
    seen: set[int] = set()
    for row in session.scalars(select(Correction).order_by(Correction.id).execution_options(yield_per=1000)):
        seen.add(row.id)
        report.corrections += 1
        story = stories.get(row.id)
        if story is None or story.submitted is None:
            return RowMismatch("corrections", row.id, "it has no submitted event (the row was forged)")
        recorded = submitted_payload(row)
        for name in SUBMITTED_FIELDS:
            if name in story.submitted and story.submitted[name] != recorded.get(name):
                return RowMismatch("corrections", row.id, f"its {name} differs from its submitted event")
        for optional in _OPTIONAL_FIELDS:
            if "prompt" in story.submitted and optional not in story.submitted and recorded.get(optional) is not None:
                return RowMismatch("corrections", row.id, f"its {optional} differs from its submitted event")  # added
        if row.submitter != story.submitter:
            return RowMismatch("corrections", row.id, "its submitter differs from its submitted event")
        if row.status != story.status:
            expected = story.status.value if story.status else "unknown"
            return RowMismatch("corrections", row.id, f"its status is {row.status.value}, its events say {expected}")
    for correction_id in sorted(set(stories) - seen):
        return RowMismatch("corrections", correction_id, "its events exist but the row is gone (deleted)")
    return None


def _check_checkpoints(session: Session, stories: dict[int, _CheckpointStory], report: RowReport) -> RowMismatch | None:
    seen: set[int] = set()
    for row in session.scalars(select(Checkpoint).order_by(Checkpoint.id)):
        seen.add(row.id)
        report.checkpoints += 1
        story = stories.get(row.id)
        if story is None or story.written is None:
            return RowMismatch("checkpoints", row.id, "it has no checkpoint_written event (the row was forged)")
        fields = {"sha256": row.sha256, "size_bytes": row.size_bytes, "parent": row.parent_id, "model": row.model}
        for name, value in fields.items():
            if name in story.written and story.written[name] != value:
                return RowMismatch("checkpoints", row.id, f"its {name} differs from its checkpoint_written event")
        if row.pruned != story.pruned:
            return RowMismatch("checkpoints", row.id, "its pruned flag differs from its events")
    for checkpoint_id in sorted(k for k, v in stories.items() if v.written is not None and k not in seen):
        return RowMismatch("checkpoints", checkpoint_id, "its events exist but the row is gone (deleted)")
    return None
