"""Bulk imports in short transactions, all or nothing as the queue sees them.

One transaction for a file of 200,000 corrections would hold SQLite's write lock (PostgreSQL's
audit chain lock) for half a minute and more, so every other writer waits or times out. Instead
an import gets an id (a row in ``imports`` and an ``import_started`` event), writes its
corrections in chunks of ``IMPORT_CHUNK``, each chunk in its own short transaction, as
``staged`` (nobody claims, lists or supersedes a staged correction), and then one last short
transaction completes it: its corrections become ``pending`` together, each supersedes the older
pending ones for its fact and model in file order, and an ``import_completed`` event records it.

An import that dies before completing (killed, lost its connection, interrupted) is marked
``abandoned`` with its staged corrections, by itself when it can, otherwise by the next import or
daemon start that finds its process gone (same host) or its heartbeat older than
``IMPORT_STALE_AFTER`` (another host); ``import_abandoned`` records it. Nothing of it was ever
pending, so the queue sees the whole file or none of it, and the audit log shows both.

A file that fits in one chunk is submitted in one transaction (as short as a chunk), without an id.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.audit import AuditKind, NewEvent, append_events
from storage.audit_rows import submitted_payload
from storage.busy import announce_import
from storage.errors import InvalidTransition
from storage.intake import CorrectionInput
from storage.leases import HOST_CHARS, process_is_gone
from storage.models import Correction, CorrectionStatus, Import, ImportStatus
from storage.queue import lock_out_submitters, new_rows, pending_for_facts, submit_many, supersede_pending
from storage.types import utcnow

IMPORT_CHUNK = 2000
"""Corrections per transaction of a bulk import (about 0.3 s of write lock on SQLite)."""
SQLITE_CHUNK_PAUSE_S = 0.12
"""Pause after each chunk on SQLite: a writer waiting for the lock retries every 100 ms (SQLite's
busy handler), so back-to-back chunks could starve it; PostgreSQL queues lock waiters fairly."""
IMPORT_STALE_AFTER = timedelta(minutes=10)
"""An import on another host whose last chunk is older than this is taken for dead."""

Progress = Callable[[int], None]


class ImportAbandoned(RuntimeError):  # noqa: N818 - reads as "the import was abandoned"
    """The import was marked abandoned (by another process) before it could complete."""


def import_corrections(
    sessions: sessionmaker[Session],
    corrections: Sequence[CorrectionInput],
    submitter: str,
    *,
    model: str,
    source: str | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """Queue a file's corrections all or nothing and return their ids, committing as it goes.

    Imports that died before this one are abandoned first (their process is gone)."""
    if len(corrections) <= IMPORT_CHUNK:
        with sessions.begin() as session, announce_import(session, len(corrections), submitter):
            abandon_dead_imports(session, submitter)
            ids = submit_many(session, corrections, submitter, model=model)
        if progress is not None:
            progress(len(ids))
        return ids
    with sessions.begin() as session:
        abandon_dead_imports(session, submitter)
        started = start_import(session, len(corrections), submitter, model=model, source=source)
        import_id, started_at = started.id, started.started_at
        pause = SQLITE_CHUNK_PAUSE_S if session.get_bind().dialect.name == "sqlite" else 0.0
    ids: list[int] = []
    try:
        for start in range(0, len(corrections), IMPORT_CHUNK):
            chunk = corrections[start : start + IMPORT_CHUNK]
            with sessions.begin() as session, announce_import(session, len(corrections), submitter, started_at):
                ids += stage_chunk(session, import_id, chunk, submitter, model)
            if progress is not None:
                progress(len(chunk))
            time.sleep(pause)
        with sessions.begin() as session:
            complete_import(session, import_id, submitter)
    except BaseException as exc:
        _abandon_after(sessions, import_id, submitter, exc)
        raise
    return ids


def _abandon_after(sessions: sessionmaker[Session], import_id: int, actor: str, exc: BaseException) -> None:
    """Mark our own import abandoned after ``exc``; if even that fails, the next import will."""
    reason = f"the importing process stopped: {type(exc).__name__}"
    try:
        with sessions.begin() as session:
            found = session.get(Import, import_id, with_for_update=True)
            if found is not None and found.status == ImportStatus.RUNNING:
                abandon_import(session, found, actor, reason)
    except Exception:  # noqa: BLE001, S110 - the error that stopped the import is the one to report
        pass


def start_import(session: Session, records: int, submitter: str, *, model: str, source: str | None) -> Import:
    """A new running import of ``records`` corrections, with its ``import_started`` event."""
    now = utcnow()
    found = Import(
        model=model,
        submitter=submitter,
        source=source[:200] if source else None,
        records=records,
        status=ImportStatus.RUNNING,
        host=socket.gethostname()[:HOST_CHARS],
        pid=os.getpid(),
        started_at=now,
        heartbeat_at=now,
    )
    session.add(found)
    session.flush()
    payload = {"import_id": found.id, "records": records, "model": model, "source": found.source}
    append_events(session, [NewEvent(AuditKind.IMPORT_STARTED, submitter, payload=payload)])
    return found


def stage_chunk(
    session: Session, import_id: int, chunk: Sequence[CorrectionInput], submitter: str, model: str
) -> list[int]:
    """Write one chunk as staged corrections of a running import (and renew its heartbeat)."""
    renewed = session.execute(
        update(Import)
        .where(Import.id == import_id, Import.status == ImportStatus.RUNNING)
        .values(heartbeat_at=utcnow())
    )
    if renewed.rowcount != 1:
        raise ImportAbandoned(f"import {import_id} was marked abandoned before it completed; nothing of it is queued")
    rows = new_rows(chunk, submitter, model, CorrectionStatus.STAGED, import_id)
    session.add_all(rows)
    session.flush()
    append_events(
        session, [NewEvent(AuditKind.SUBMITTED, submitter, row.id, payload=submitted_payload(row)) for row in rows]
    )
    return [row.id for row in rows]


def complete_import(session: Session, import_id: int, actor: str) -> int:
    """Queue a running import's staged corrections at once; returns how many it superseded."""
    lock_out_submitters(session)
    found = session.get(Import, import_id, with_for_update=True)
    if found is None or found.status != ImportStatus.RUNNING:
        state = "unknown" if found is None else found.status.value
        raise ImportAbandoned(f"import {import_id} cannot complete: it is {state}; nothing of it is queued")
    staged = session.execute(
        select(Correction.id, Correction.prompt, Correction.subject)
        .where(Correction.import_id == import_id, Correction.status == CorrectionStatus.STAGED)
        .order_by(Correction.id)
    ).all()
    facts = {(prompt, subject) for _id, prompt, subject in staged}
    older = {fact: [row.id for row in rows] for fact, rows in pending_for_facts(session, facts, found.model).items()}
    session.execute(
        update(Correction)
        .where(Correction.import_id == import_id, Correction.status == CorrectionStatus.STAGED)
        .values(status=CorrectionStatus.PENDING)
        .execution_options(synchronize_session=False)
    )
    events = [NewEvent(AuditKind.IMPORT_COMPLETED, actor, payload={"import_id": import_id, "records": len(staged)})]
    superseded: list[dict[str, object]] = []
    for new_id, prompt, subject in staged:
        for old_id in supersede_pending(older, (prompt, subject), new_id):
            superseded.append({"id": old_id, "status": CorrectionStatus.SUPERSEDED, "superseded_by": new_id})
            events.append(NewEvent(AuditKind.SUPERSEDED, actor, old_id, payload={"superseded_by": new_id}))
    if superseded:
        session.execute(update(Correction), superseded)
    found.status, found.finished_at = ImportStatus.COMPLETE, utcnow()
    append_events(session, events)
    return len(superseded)


def abandon_import(session: Session, found: Import, actor: str, reason: str) -> int:
    """Mark a running import and its staged corrections abandoned; returns how many were staged."""
    if found.status != ImportStatus.RUNNING:
        raise InvalidTransition(f"import {found.id} is {found.status.value}, not running")
    result = session.execute(
        update(Correction)
        .where(Correction.import_id == found.id, Correction.status == CorrectionStatus.STAGED)
        .values(status=CorrectionStatus.ABANDONED)
        .execution_options(synchronize_session=False)
    )
    found.status, found.finished_at = ImportStatus.ABANDONED, utcnow()
    payload = {"import_id": found.id, "staged": result.rowcount, "reason": reason}
    append_events(session, [NewEvent(AuditKind.IMPORT_ABANDONED, actor, payload=payload)])
    return int(result.rowcount)


def abandon_dead_imports(session: Session, actor: str) -> list[int]:
    """Abandon running imports whose process is gone (this host) or silent too long (any host)."""
    here = socket.gethostname()[:HOST_CHARS]
    now = utcnow()
    abandoned = []
    running = select(Import).where(Import.status == ImportStatus.RUNNING).order_by(Import.id).with_for_update()
    for found in session.scalars(running).all():
        if found.host == here and found.pid != os.getpid() and process_is_gone(found.pid):
            reason = f"its process {found.pid} is gone"
        elif now - found.heartbeat_at > IMPORT_STALE_AFTER:
            reason = f"no chunk for {int((now - found.heartbeat_at).total_seconds())} s"
        else:
            continue
        abandon_import(session, found, actor, reason)
        abandoned.append(found.id)
    return abandoned
