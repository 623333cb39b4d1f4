"""The append-only, hash-chained audit log.

Each event's hash covers its own contents and the previous event's hash, so altering, deleting
or reordering any event breaks the chain at that point. Appends are serialised so that two
writers never both extend the same head: PostgreSQL takes a transaction-scoped advisory lock;
SQLite transactions already hold the database write lock from BEGIN (see storage.db). The
assigned ids are consecutive, and the primary key would reject a fork even if the lock were
bypassed.

Deleting the newest events leaves a valid shorter chain, and whoever can write the database can
recompute every hash: keep a head (``metake audit head``) outside the database to detect both.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import ColumnElement, Row, Text, cast, func, select
from sqlalchemy.orm import Session

from storage.audit_key import SESSION_INFO_KEY, event_mac, mac_matches
from storage.models import AuditEvent
from storage.types import utcnow

GENESIS_HASH = "0" * 64
# Key of the PostgreSQL advisory lock that serialises appends ("metake" in ASCII).
CHAIN_LOCK_KEY = 0x6D6574616B65


class AuditKind(enum.StrEnum):
    """Event kinds written by metake; other strings are accepted for future kinds."""

    SUBMITTED = "submitted"
    SUPERSEDED = "superseded"
    CLAIMED = "claimed"
    RELEASED = "released"
    APPLIED = "applied"
    FAILED = "failed"
    REJECTED = "rejected"
    REVERT_REQUESTED = "revert_requested"
    REVERTED = "reverted"
    CHECKPOINT_WRITTEN = "checkpoint_written"
    CHECKPOINT_PRUNED = "checkpoint_pruned"
    REVERT_REFUSED = "revert_refused"
    LEASE_ACQUIRED = "lease_acquired"
    HEALTH_CHECKED = "health_checked"
    IMPORT_STARTED = "import_started"
    IMPORT_COMPLETED = "import_completed"
    IMPORT_ABANDONED = "import_abandoned"


@dataclass(frozen=True)
class ChainBreak:
    """The first event at which the chain does not verify, and why."""

    event_id: int
    reason: str


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte form that gets hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical_time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(event: AuditEvent | Row[Any] | SimpleNamespace) -> str:
    """sha256 over the canonical JSON of the event's contents, including prev_hash."""
    content = {
        "id": event.id,
        "at": _canonical_time(event.at),
        "kind": event.kind,
        "correction_id": event.correction_id,
        "edit_id": event.edit_id,
        "checkpoint_id": event.checkpoint_id,
        "actor": event.actor,
        "payload": event.payload,
        "prev_hash": event.prev_hash,
    }
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK_KEY)))


@dataclass(frozen=True)
class NewEvent:
    """An event to append, without the chain fields (id, time, links) that appending gives it."""

    kind: AuditKind | str
    actor: str
    correction_id: int | None = None
    edit_id: int | None = None
    checkpoint_id: int | None = None
    payload: Mapping[str, Any] | None = None


def append_events(session: Session, new: list[NewEvent]) -> list[AuditEvent]:
    """Append several events in order with one read of the chain head and one flush (bulk imports)."""
    if not new:
        return []
    _lock_chain(session)
    newest_first = select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc())
    head = session.execute(newest_first.limit(1)).first()
    next_id, prev_hash = (1, GENESIS_HASH) if head is None else (head.id + 1, head.hash)
    key: bytes | None = session.info.get(SESSION_INFO_KEY)
    events = []
    for item in new:
        # A JSON round trip makes the payload exactly what will be read back (str keys, lists).
        stored_payload = json.loads(json.dumps(dict(item.payload or {}), allow_nan=False))
        event = AuditEvent(
            id=next_id,
            at=utcnow(),
            kind=str(item.kind),
            correction_id=item.correction_id,
            edit_id=item.edit_id,
            checkpoint_id=item.checkpoint_id,
            actor=item.actor,
            payload=stored_payload,
            prev_hash=prev_hash,
        )
        event.hash = event_hash(event)
        event.mac = event_mac(key, event.hash) if key is not None else None
        events.append(event)
        next_id, prev_hash = next_id + 1, event.hash
    session.add_all(events)
    session.flush()
    return events


def append_event(
    session: Session,
    kind: AuditKind | str,
    *,
    actor: str,
    correction_id: int | None = None,
    edit_id: int | None = None,
    checkpoint_id: int | None = None,
    payload: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one event in the session's transaction.

    On PostgreSQL this holds the chain lock until the transaction ends, so commit soon after.
    """
    new = NewEvent(kind, actor, correction_id, edit_id, checkpoint_id, payload)
    return append_events(session, [new])[0]


def payload_text() -> ColumnElement[str]:
    """The payload column read as text, for the checks to parse themselves: a row rewritten with a
    payload that is not JSON is then a finding at that row, not an error while fetching it."""
    return cast(AuditEvent.__table__.c.payload, Text).label("payload_text")


_WITHOUT_KEY = "written without the audit key"


def verify_chain(session: Session, start: int = 1, key: bytes | None = None) -> ChainBreak | None:
    """Walk the chain in id order from event ``start``; return the first event that does not verify.

    From a later ``start`` (a quick check of the newest events) the first event is linked to the
    stored hash of the one before it. With the audit ``key`` every event's MAC is checked too:
    events may lack one only before the first that has one (written before the key was used),
    and at least one event must have one.
    """
    sealed = False
    table = AuditEvent.__table__
    expected_id, expected_prev = start, GENESIS_HASH
    if start > 1:
        expected_prev = session.scalar(select(table.c.hash).where(table.c.id == start - 1)) or ""
    # Plain rows, not ORM objects: objects already in the session would hide the stored values.
    columns = [c for c in table.c if c.name != "payload"] + [payload_text()]
    query = select(*columns).where(table.c.id >= start).order_by(table.c.id).execution_options(yield_per=1000)
    with session.execute(query) as rows:  # closes the server-side cursor on an early return
        for row in rows:
            fields = dict(row._mapping)
            try:
                fields["payload"] = json.loads(fields.pop("payload_text"))
            except (TypeError, ValueError):
                return ChainBreak(row.id, "its payload is not JSON (the row was altered)")
            event = SimpleNamespace(**fields)
            if event.id != expected_id:
                return ChainBreak(event.id, f"expected event {expected_id} here; events are missing")
            if event.prev_hash != expected_prev:
                return ChainBreak(event.id, "its prev_hash does not match the hash of the event before it")
            if event_hash(event) != event.hash:
                return ChainBreak(event.id, "its contents do not match its hash (the row was altered)")
            if key is not None:
                if event.mac is not None and not mac_matches(key, event.hash, event.mac):
                    return ChainBreak(event.id, f"its MAC does not match ({_WITHOUT_KEY}, or under another key)")
                if event.mac is None and sealed:
                    return ChainBreak(event.id, f"it has no MAC but earlier events do ({_WITHOUT_KEY})")
                sealed = sealed or event.mac is not None
            expected_id, expected_prev = event.id + 1, event.hash
    if key is not None and not sealed and expected_id > start:
        return ChainBreak(expected_id - 1, "no event has a MAC made with this audit key")
    return None


def sealed_from(session: Session) -> int | None:
    """The id of the first event with a MAC (events before it were written without the audit key)."""
    return session.scalar(select(func.min(AuditEvent.id)).where(AuditEvent.mac.is_not(None)))


@dataclass(frozen=True)
class ChainHead:
    """The newest event's id and hash: kept outside the database, it pins the chain up to there."""

    event_id: int
    hash: str


def chain_head(session: Session) -> ChainHead | None:
    newest = session.execute(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).first()
    return ChainHead(newest.id, newest.hash) if newest is not None else None


def check_head(session: Session, head: ChainHead) -> str | None:
    """Why the chain does not contain ``head`` (removed or rewritten events), or None if it does.

    Run ``verify_chain`` too: together they show that every event up to ``head`` is the one that
    was there when the head was recorded, which the chain alone cannot show for its newest events.
    """
    stored = session.scalar(select(AuditEvent.hash).where(AuditEvent.id == head.event_id))
    if stored is None:
        newest = chain_head(session)
        ends = f"ends at event {newest.event_id}" if newest else "is empty"
        return f"the chain {ends}, before the recorded head {head.event_id} (events were removed)"
    if stored != head.hash:
        return f"event {head.event_id} is not the one recorded as the head (the chain was rewritten)"
    return None


def event_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(AuditEvent)) or 0
