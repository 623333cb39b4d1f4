"""The correction queue: submitting, claiming and settling corrections, each step audited.

All functions work inside the caller's transaction and do not commit. Commit right after each
call: on PostgreSQL the audit append holds the chain lock until commit, and on SQLite every
transaction holds the database write lock. Do the slow work (editing the model) between
transactions, not inside one.

Claiming uses ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent claimers take
disjoint rows; on SQLite the same statement runs without the locking clause inside a
``BEGIN IMMEDIATE`` transaction, which serialises claimers. Lock order is always: submit key
lock, then correction rows, then the audit chain lock, so transactions never wait on each other
in a cycle; an import's completion takes a table lock instead of the key locks (storage.imports).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import TypeVar

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from storage.audit import AuditKind, NewEvent, append_event, append_events
from storage.audit_rows import submitted_payload
from storage.errors import InvalidTransition
from storage.intake import CorrectionInput, make_correction
from storage.models import DEFAULT_MODEL_NAME, Correction, CorrectionStatus, DaemonLease
from storage.types import utcnow

# Class of the PostgreSQL advisory locks that serialise submissions for one subject and prompt.
SUBMIT_LOCK_CLASS = 0x6D6B
Item = TypeVar("Item")
CLAIM_ORDER = (Correction.priority.desc(), Correction.submitted_at, Correction.id)


def _fact_key(prompt: str, subject: str) -> int:
    digest = hashlib.sha256(f"{prompt}\x1f{subject}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def _lock_facts(session: Session, facts: Iterable[tuple[str, str]]) -> None:
    """Serialise submissions of the same facts, so two of them cannot both stay pending.

    Locks are taken in key order in one statement, so two imports never wait on each other in a
    cycle; the audit chain's lock comes after them (storage.audit)."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: the transaction already holds the database's write lock
    keys = sorted({_fact_key(prompt, subject) for prompt, subject in facts})
    statement = text("SELECT pg_advisory_xact_lock(:lock_class, k) FROM unnest(CAST(:keys AS integer[])) AS k")
    session.execute(statement, {"lock_class": SUBMIT_LOCK_CLASS, "keys": keys})


def submit(session: Session, correction: CorrectionInput, submitter: str, *, model: str = DEFAULT_MODEL_NAME) -> int:
    """Queue a correction for ``model`` and return its id; older pending ones for the same fact
    and model are superseded."""
    return submit_many(session, [correction], submitter, model=model)[0]


SUBMIT_CHUNK = 1000
"""Corrections inserted per round trip by a bulk submit (one transaction, whatever its size)."""


def submit_many(
    session: Session, corrections: Iterable[CorrectionInput], submitter: str, *, model: str = DEFAULT_MODEL_NAME
) -> list[int]:
    """Submit corrections for ``model`` in order, in the caller's transaction: each supersedes the
    older pending ones for its fact and model, in the file too. Chunks share their queries,
    flushes and audit appends."""
    items = list(corrections)
    ids: list[int] = []
    for start in range(0, len(items), SUBMIT_CHUNK):
        ids += _submit_chunk(session, items[start : start + SUBMIT_CHUNK], submitter, model)
    return ids


def pending_for_facts(
    session: Session, facts: set[tuple[str, str]], model: str
) -> dict[tuple[str, str], list[Correction]]:
    """``model``'s pending corrections of these (prompt, subject) facts, locked, oldest first."""
    pending: dict[tuple[str, str], list[Correction]] = {}
    subjects = sorted({subject for _, subject in facts})
    for start in range(0, len(subjects), 500):
        query = (
            select(Correction)
            .where(
                Correction.model == model,
                Correction.status == CorrectionStatus.PENDING,
                Correction.subject.in_(subjects[start : start + 500]),
            )
            .order_by(Correction.id)
            .with_for_update()
        )
        for row in session.scalars(query):
            if (row.prompt, row.subject) in facts:
                pending.setdefault((row.prompt, row.subject), []).append(row)
    return pending


def supersede_pending(pending: dict[tuple[str, str], list[Item]], fact: tuple[str, str], new: Item) -> list[Item]:
    """What ``new`` supersedes: the pending ones of its fact, oldest first; it becomes the pending one.

    Applied in submission order, this gives the chain a one-at-a-time submit would (each
    correction superseded by the next one for its fact)."""
    older = pending.get(fact, [])
    pending[fact] = [new]
    return older


REHEARSAL_SOURCE = re.compile(r"rehearsal (\d+) of #(\d+)")
"""The source of a correction queued by rehearsal: the how-many-th, of which original correction."""


def rehearsal_of(correction: Correction) -> tuple[int, int]:
    """(rehearsals so far, the original correction's id): (0, its own id) for one nobody rehearsed."""
    found = REHEARSAL_SOURCE.fullmatch(correction.source or "")
    return (int(found[1]), int(found[2])) if found else (0, correction.id)


def resubmit_for_rehearsal(
    session: Session,
    corrections: Sequence[Correction],
    submitter: str,
    *,
    model: str = DEFAULT_MODEL_NAME,
    max_rehearsals: int = 3,
) -> dict[int, int]:
    """Queue applied ``corrections`` again, as new corrections of the same fact and target
    (source ``rehearsal N of #original``), for the ones a health check found the model no longer
    says; returns {rehearsed id: new id}.

    A correction is left out when its fact has a pending correction (the copy would supersede
    what somebody asked for since), a newer applied one (re-applying it would undo that one), or
    when its original has been rehearsed ``max_rehearsals`` times (a fact that will not stay said
    must not take every later edit's room)."""
    facts = {(c.prompt, c.subject) for c in corrections}
    if not facts:
        return {}
    lock_for_submitting(session)
    _lock_facts(session, facts)
    pending = pending_for_facts(session, facts, model)
    chosen: list[Correction] = []
    copies: list[CorrectionInput] = []
    for c in sorted(corrections, key=lambda c: c.id):
        fact, (times, origin) = (c.prompt, c.subject), rehearsal_of(c)
        if c.status != CorrectionStatus.APPLIED or fact in pending or times >= max_rehearsals:
            continue
        newer = select(func.count()).where(
            Correction.model == model,
            Correction.status == CorrectionStatus.APPLIED,
            Correction.prompt == c.prompt,
            Correction.subject == c.subject,
            Correction.id > c.id,
        )
        if session.scalar(newer):
            continue
        chosen.append(c)
        copies.append(
            make_correction(
                c.prompt,
                c.subject,
                c.target,
                paraphrases=c.paraphrases,
                neighbors=c.neighbors,
                priority=c.priority,
                original_answer=c.original_answer,
                source=f"rehearsal {times + 1} of #{origin}",
            )
        )
        pending[fact] = [c]  # a fact is rehearsed once a check
    return dict(zip([c.id for c in chosen], submit_many(session, copies, submitter, model=model), strict=True))


def lock_for_submitting(session: Session) -> None:
    """PostgreSQL: the table lock every submitter holds (it conflicts only with an import's
    completion, ``lock_out_submitters``), taken before reading what a submission supersedes so
    that the two always see each other's committed rows."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE corrections IN ROW EXCLUSIVE MODE"))


def lock_out_submitters(session: Session) -> None:
    """PostgreSQL: wait for running submitters and hold off new ones until this transaction ends
    (an import's completion, which supersedes any number of facts at once: one advisory lock per
    fact would exhaust PostgreSQL's lock table at tens of thousands). Readers are not blocked."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE corrections IN SHARE ROW EXCLUSIVE MODE"))


def _submit_chunk(session: Session, chunk: list[CorrectionInput], submitter: str, model: str) -> list[int]:
    facts = {(c.prompt, c.subject) for c in chunk}
    lock_for_submitting(session)
    _lock_facts(session, facts)
    pending = pending_for_facts(session, facts, model)
    rows = new_rows(chunk, submitter, model)
    session.add_all(rows)
    session.flush()
    events: list[NewEvent] = []
    for row in rows:
        events.append(NewEvent(AuditKind.SUBMITTED, submitter, row.id, payload=submitted_payload(row)))
        for old in supersede_pending(pending, (row.prompt, row.subject), row):
            old.status = CorrectionStatus.SUPERSEDED
            old.superseded_by = row.id
            events.append(NewEvent(AuditKind.SUPERSEDED, submitter, old.id, payload={"superseded_by": row.id}))
    session.flush()
    append_events(session, events)
    return [row.id for row in rows]


def new_rows(
    chunk: Sequence[CorrectionInput],
    submitter: str,
    model: str,
    status: CorrectionStatus = CorrectionStatus.PENDING,
    import_id: int | None = None,
) -> list[Correction]:
    """Correction rows for validated inputs (not yet added to a session)."""
    now = utcnow()
    return [
        Correction(
            model=model,
            prompt=c.prompt,
            subject=c.subject,
            target=c.target,
            original_answer=c.original_answer,
            paraphrases=list(c.paraphrases),
            neighbors=[{"prompt": n.prompt, "answer": n.answer} for n in c.neighbors],
            priority=c.priority,
            submitter=submitter,
            source=c.source,
            submitted_at=now,
            status=status,
            attempts=0,
            import_id=import_id,
        )
        for c in chunk
    ]


def claim_batch(session: Session, limit: int, worker: str, *, model: str = DEFAULT_MODEL_NAME) -> list[Correction]:
    """Move up to ``limit`` of ``model``'s pending corrections to applying for ``worker``, highest
    priority first; other models' corrections are never touched."""
    if limit < 1:
        raise ValueError(f"batch size must be at least 1, got {limit}")
    claimed = session.scalars(
        select(Correction)
        .where(Correction.model == model, Correction.status == CorrectionStatus.PENDING)
        .order_by(*CLAIM_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    now = utcnow()
    for correction in claimed:
        correction.status = CorrectionStatus.APPLYING
        correction.attempts += 1
        correction.claimed_by = worker
        correction.claimed_at = now
        append_event(
            session,
            AuditKind.CLAIMED,
            actor=worker,
            correction_id=correction.id,
            payload={"attempt": correction.attempts},
        )
    session.flush()
    return list(claimed)


def release_claimed(
    session: Session, worker: str | None, *, actor: str, reason: str, model: str | None = None
) -> list[int]:
    """Put corrections left in applying back to pending (after a crash); all workers if None,
    all models if ``model`` is None."""
    query = select(Correction).where(Correction.status == CorrectionStatus.APPLYING)
    if model is not None:
        query = query.where(Correction.model == model)
    if worker is not None:
        query = query.where(Correction.claimed_by == worker)
    released = session.scalars(query.order_by(Correction.id).with_for_update()).all()
    for correction in released:
        payload = {"worker": correction.claimed_by, "reason": reason}
        correction.status = CorrectionStatus.PENDING
        correction.claimed_by = None
        correction.claimed_at = None
        append_event(session, AuditKind.RELEASED, actor=actor, correction_id=correction.id, payload=payload)
    session.flush()
    return [correction.id for correction in released]


def release_stale_claims(session: Session, me: str, reason: str, *, model: str = DEFAULT_MODEL_NAME) -> list[int]:
    """Return to pending every correction of ``model`` claimed by a worker that holds no live lease.

    A claim outlives its worker only when the worker died between claiming and recording, so
    its corrections were never applied; the caller holds the model's lease, so no one else is
    applying them.
    """
    now = utcnow()
    live = set(session.scalars(select(DaemonLease.holder).where(DaemonLease.expires_at > now)))
    applying = session.scalars(
        select(Correction)
        .where(Correction.model == model, Correction.status == CorrectionStatus.APPLYING)
        .order_by(Correction.id)
        .with_for_update()
    ).all()
    others = live - {me}
    stale_workers = sorted({c.claimed_by for c in applying if c.claimed_by is not None and c.claimed_by not in others})
    released: list[int] = []
    for worker in stale_workers:
        released += release_claimed(session, worker, actor=me[:100], reason=reason, model=model)
    return released


def lock_corrections(session: Session, ids: Iterable[int]) -> list[Correction]:
    """Lock these corrections' rows (in id order) before the first audit append; returns them."""
    wanted = sorted(set(ids))
    if not wanted:
        return []
    query = select(Correction).where(Correction.id.in_(wanted)).order_by(Correction.id).with_for_update()
    return list(session.scalars(query))


def pending_count(session: Session, model: str | None = None) -> int:
    """Pending corrections of ``model`` (of every model when None)."""
    query = select(func.count()).select_from(Correction).where(Correction.status == CorrectionStatus.PENDING)
    if model is not None:
        query = query.where(Correction.model == model)
    return session.scalar(query) or 0


def _lock_claimed(session: Session, correction: Correction, worker: str, operation: str) -> Correction:
    """The correction's current row, locked, checked to be applying under ``worker``'s claim."""
    current = session.get(Correction, correction.id, with_for_update=True, populate_existing=True)
    if current is None:
        raise InvalidTransition(f"correction {correction.id} does not exist")
    if current.status != CorrectionStatus.APPLYING:
        raise InvalidTransition(
            f"correction {current.id} is {current.status.value}; only applying ones can be {operation}"
        )
    if current.claimed_by != worker:
        raise InvalidTransition(f"correction {current.id} is claimed by {current.claimed_by}, not {worker}")
    return current


def mark_applied(session: Session, corrections: Sequence[Correction], edit_id: int, *, worker: str) -> None:
    """Record that ``edit_id`` applied these corrections, which ``worker`` claimed."""
    current = [_lock_claimed(session, correction, worker, "marked applied") for correction in corrections]
    for correction in current:
        correction.status = CorrectionStatus.APPLIED
        correction.edit_id = edit_id
        correction.last_error = None
        append_event(session, AuditKind.APPLIED, actor=worker, correction_id=correction.id, edit_id=edit_id)
    session.flush()


def mark_failed(session: Session, correction: Correction, reason: str, *, worker: str, retry: bool = False) -> None:
    """Record a failed attempt: back to pending when ``retry``, else failed for good."""
    current = _lock_claimed(session, correction, worker, "marked failed")
    current.status = CorrectionStatus.PENDING if retry else CorrectionStatus.FAILED
    current.last_error = reason
    current.claimed_by = None
    current.claimed_at = None
    append_event(
        session,
        AuditKind.FAILED,
        actor=worker,
        correction_id=current.id,
        payload={"reason": reason, "attempt": current.attempts, "retry": retry},
    )
    session.flush()


def mark_rejected(session: Session, correction: Correction, reason: str, *, worker: str) -> None:
    """Record that the editing method cannot apply this correction at all (e.g. untokenisable)."""
    current = _lock_claimed(session, correction, worker, "rejected")
    current.status = CorrectionStatus.REJECTED
    current.last_error = reason
    append_event(session, AuditKind.REJECTED, actor=worker, correction_id=current.id, payload={"reason": reason})
    session.flush()
