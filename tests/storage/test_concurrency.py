"""Concurrent submitters and claimers on one database: nothing lost, nothing claimed twice.

The acceptance test of the queue: 4 processes submit 250 corrections each while 2 processes
claim batches; afterwards there are 1,000 rows, each claimed exactly once, and the audit chain
verifies. It runs on PostgreSQL (row locks with SKIP LOCKED, advisory lock on the chain) and on
SQLite (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from sqlalchemy import func, select

from storage.audit import verify_chain
from storage.db import make_engine, session_factory
from storage.intake import make_correction
from storage.models import AuditEvent, Correction, CorrectionStatus
from storage.queue import claim_batch, submit

SUBMITTERS = 4
PER_SUBMITTER = 250
CLAIMERS = 2
TOTAL = SUBMITTERS * PER_SUBMITTER
CLAIM_BATCH = 7
DEADLINE_S = 120.0


def submit_corrections(url: str, submitter: int, count: int, same_fact: bool = False) -> list[int]:
    """One submitting process, one transaction per correction: distinct facts, or one fact again."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    ids = []
    try:
        for index in range(count):
            subject = "Danielle Darrieux" if same_fact else f"subject {submitter}-{index}"
            correction = make_correction("The mother tongue of {} is", subject, f"Lang {submitter}-{index}")
            with sessions.begin() as session:
                ids.append(submit(session, correction, f"submitter-{submitter}"))
    finally:
        engine.dispose()
    return ids


def claim_until_done(url: str, worker: str, expected_total: int) -> list[int]:
    """One claiming process: claim batches until every expected correction exists and none is pending."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    claimed: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while time.monotonic() < deadline:
            with sessions.begin() as session:
                batch = [c.id for c in claim_batch(session, CLAIM_BATCH, worker)]
                submitted = session.scalar(select(func.count()).select_from(Correction))
            claimed.extend(batch)
            if not batch and submitted >= expected_total:
                break
            # A daemon edits for seconds between claims; a claimer that re-takes SQLite's lock the
            # instant it lets go starves the other one (SQLite's busy handler retries every 100 ms
            # and queues nobody), which made "both took part" fail on a loaded machine.
            time.sleep(0.005 if not batch else 0.02)
    finally:
        engine.dispose()
    return claimed


def test_concurrent_submitters_and_claimers(db_url, sessions):
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(SUBMITTERS + CLAIMERS, mp_context=context) as pool:
        claimers = [pool.submit(claim_until_done, db_url, f"claimer-{i}", TOTAL) for i in range(CLAIMERS)]
        submitters = [pool.submit(submit_corrections, db_url, i, PER_SUBMITTER) for i in range(SUBMITTERS)]
        submitted = [new_id for future in submitters for new_id in future.result()]
        claims = [future.result() for future in claimers]

    claimed = [new_id for batch in claims for new_id in batch]
    assert len(submitted) == len(set(submitted)) == TOTAL
    assert Counter(claimed) == Counter(submitted)  # every correction claimed exactly once
    assert all(claims), "both claimers should have taken part"
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Correction)) == TOTAL
        statuses = session.execute(select(Correction.status, Correction.attempts).distinct()).all()
        assert statuses == [(CorrectionStatus.APPLYING, 1)]
        kinds = dict(session.execute(select(AuditEvent.kind, func.count()).group_by(AuditEvent.kind)).all())
        assert kinds == {"submitted": TOTAL, "claimed": TOTAL}
        assert verify_chain(session) is None
        assert session.scalar(select(func.max(AuditEvent.id))) == 2 * TOTAL


def test_concurrent_resubmissions_leave_one_pending(db_url, sessions):
    """Racing submissions of the same fact supersede each other; exactly one stays pending."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(SUBMITTERS, mp_context=context) as pool:
        futures = [pool.submit(submit_corrections, db_url, i, 25, True) for i in range(SUBMITTERS)]
        submitted = [new_id for future in futures for new_id in future.result()]
    with sessions() as session:
        rows = session.scalars(select(Correction)).all()
        assert len(rows) == len(submitted) == SUBMITTERS * 25
        pending = [row for row in rows if row.status == CorrectionStatus.PENDING]
        assert len(pending) == 1
        assert pending[0].id == max(submitted)
        superseded = [row for row in rows if row.status == CorrectionStatus.SUPERSEDED]
        assert len(superseded) == len(rows) - 1
        assert all(row.superseded_by is not None and row.superseded_by > row.id for row in superseded)
        assert verify_chain(session) is None
