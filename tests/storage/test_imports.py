"""Chunked bulk imports: short transactions, yet all or nothing as the queue and the audit log see it."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from sqlalchemy import select, text
from store_fixtures import EARLIER_FACT, SUPERSEDING_BATCH, fact, superseding_rows

from storage import imports
from storage.audit import verify_chain
from storage.audit_rows import verify_rows
from storage.imports import (
    ImportAbandoned,
    abandon_dead_imports,
    complete_import,
    import_corrections,
    stage_chunk,
    start_import,
)
from storage.models import AuditEvent, Correction, Import, ImportStatus
from storage.queries import queued_corrections
from storage.queue import claim_batch, submit


def rows(session) -> dict[int, tuple[str, str, int | None]]:
    return {c.id: (c.target, c.status.value, c.superseded_by) for c in session.scalars(select(Correction))}


def kinds(session) -> list[tuple[str, int | None]]:
    return [(e.kind, e.correction_id) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def verified(session) -> bool:
    return verify_chain(session) is None and verify_rows(session).mismatch is None


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def test_a_chunked_import_ends_as_one_submit_at_a_time_would(sessions, monkeypatch):
    """Staged in chunks of 2, completed at once: the same rows and supersession chain as
    storage.queue's one-transaction bulk submit (tests/storage/test_queue.py)."""
    monkeypatch.setattr(imports, "IMPORT_CHUNK", 2)
    with sessions.begin() as session:
        earlier = submit(session, EARLIER_FACT, "alice")
    progress: list[int] = []
    ids = import_corrections(
        sessions, SUPERSEDING_BATCH, "bob", model="default", source="five.jsonl", progress=progress.append
    )
    assert progress == [2, 2, 1]
    with sessions() as session:
        assert rows(session) == superseding_rows(earlier, ids)
        assert kinds(session)[1:] == [
            ("import_started", None),
            *[("submitted", i) for i in ids],
            ("import_completed", None),
            ("superseded", earlier),
            ("superseded", ids[0]),
            ("superseded", ids[1]),
            ("superseded", ids[2]),
        ]
        (found,) = session.scalars(select(Import))
        assert (found.status, found.records, found.source, found.submitter) == (
            ImportStatus.COMPLETE,
            5,
            "five.jsonl",
            "bob",
        )
        assert {c.import_id for c in session.scalars(select(Correction).where(Correction.id.in_(ids)))} == {found.id}
        assert verified(session)


def test_a_file_that_fits_one_chunk_is_one_plain_submit(sessions):
    ids = import_corrections(sessions, [fact("Danielle Darrieux"), fact("Toko Yasuda")], "bob", model="default")
    with sessions() as session:
        assert kinds(session) == [("submitted", ids[0]), ("submitted", ids[1])]
        assert session.scalars(select(Import)).all() == []
        assert [rows(session)[i][1] for i in ids] == ["pending", "pending"]


def test_staged_corrections_are_invisible_until_the_import_completes(sessions):
    with sessions.begin() as session:
        older = submit(session, fact("Danielle Darrieux", "German"), "alice")
        import_id = start_import(session, 2, "bob", model="default", source=None).id
    with sessions.begin() as session:
        staged = stage_chunk(session, import_id, [fact("Danielle Darrieux"), fact("Toko Yasuda")], "bob", "default")
    with sessions.begin() as session:
        assert [c.id for c in queued_corrections(session)] == [older]  # not listed
        assert verified(session)  # staged rows match their events
        assert [c.id for c in claim_batch(session, 10, "daemon@h:1:abc")] == [older]  # not claimed
    with sessions.begin() as session:  # the claimed older one is applying: not superseded
        assert complete_import(session, import_id, "bob") == 0
    with sessions() as session:
        assert [rows(session)[i][1] for i in (older, *staged)] == ["applying", "pending", "pending"]
        assert verified(session)


def test_an_import_whose_process_died_is_abandoned_with_everything_it_staged(sessions):
    with sessions.begin() as session:
        alive = submit(session, fact("Danielle Darrieux", "German"), "alice")
        found = start_import(session, 4, "bob", model="default", source="big.jsonl")
        import_id = found.id
    with sessions.begin() as session:
        staged = stage_chunk(session, import_id, [fact("Danielle Darrieux"), fact("Toko Yasuda")], "bob", "default")
        session.execute(text("UPDATE imports SET pid = :pid"), {"pid": dead_pid()})
    with sessions.begin() as session:
        assert abandon_dead_imports(session, "carol") == [import_id]
    with sessions.begin() as session:
        assert rows(session) == {
            alive: ("German", "pending", None),  # never superseded by what never completed
            staged[0]: ("English", "abandoned", None),
            staged[1]: ("English", "abandoned", None),
        }
        assert session.get(Import, import_id).status == ImportStatus.ABANDONED
        assert kinds(session)[-1] == ("import_abandoned", None)
        assert verified(session)
        assert abandon_dead_imports(session, "carol") == []
    with sessions.begin() as session, pytest.raises(ImportAbandoned, match=f"import {import_id} was marked abandoned"):
        stage_chunk(session, import_id, [fact("Toko Yasuda")], "bob", "default")
    with sessions.begin() as session, pytest.raises(ImportAbandoned, match="it is abandoned; nothing of it is queued"):
        complete_import(session, import_id, "bob")


def test_a_live_import_is_left_alone(sessions):
    with sessions.begin() as session:
        import_id = start_import(session, 4, "bob", model="default", source=None).id
        session.execute(text("UPDATE imports SET pid = :pid"), {"pid": subprocess.os.getppid()})
    with sessions.begin() as session:
        assert abandon_dead_imports(session, "carol") == []
        assert session.get(Import, import_id).status == ImportStatus.RUNNING


def test_an_import_that_fails_midway_abandons_itself(sessions, monkeypatch):
    monkeypatch.setattr(imports, "IMPORT_CHUNK", 2)
    real = imports.stage_chunk
    calls = []

    def failing(session, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(session, *args)

    monkeypatch.setattr(imports, "stage_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        import_corrections(sessions, [fact(f"Person {i}") for i in range(5)], "bob", model="default")
    with sessions() as session:
        assert sorted(status for _t, status, _s in rows(session).values()) == ["abandoned", "abandoned"]
        assert session.scalars(select(Import.status)).all() == [ImportStatus.ABANDONED]
        assert verified(session)


@pytest.mark.parametrize(
    ("tamper", "found"),
    [
        ("UPDATE corrections SET status = 'pending' WHERE status = 'staged'", "its events say staged"),
        ("UPDATE imports SET status = 'complete'", "its status is complete, its events say running"),
        ("UPDATE imports SET records = 3", "its records differs from its import_started event"),
        ("UPDATE corrections SET import_id = NULL", "its import_id differs from its submitted event"),
        (
            "INSERT INTO imports (id, model, submitter, records, status, host, pid, started_at, heartbeat_at) "
            "SELECT 99, model, submitter, records, status, host, pid, started_at, heartbeat_at FROM imports",
            "imports 99: it has no import_started event",
        ),
    ],
)
def test_tampering_with_an_import_is_found(sessions, tamper, found):
    with sessions.begin() as session:
        import_id = start_import(session, 2, "bob", model="default", source=None).id
    with sessions.begin() as session:
        stage_chunk(session, import_id, [fact("Danielle Darrieux"), fact("Toko Yasuda")], "bob", "default")
    with sessions.begin() as session:
        session.execute(text(tamper))
    with sessions() as session:
        mismatch = verify_rows(session).mismatch
        assert mismatch is not None and found in f"{mismatch.table} {mismatch.row_id}: {mismatch.reason}"


def test_a_submit_during_a_completion_waits_and_sees_its_rows(sessions, monkeypatch):
    """A single submit of a fact that a completing import is about to queue runs either wholly
    before the completion or wholly after it (then superseding the import's row): never both
    pending. The completion pauses after reading what it supersedes; the submit must wait."""
    monkeypatch.setattr(imports, "IMPORT_CHUNK", 1)
    read, submitted = threading.Event(), threading.Event()
    real = imports.pending_for_facts

    def pausing(session, facts, model):
        found = real(session, facts, model)
        read.set()
        submitted.wait(timeout=1.0)  # a submit that does not wait for us finishes meanwhile
        return found

    monkeypatch.setattr(imports, "pending_for_facts", pausing)
    late: list[int] = []

    def submitting() -> None:
        read.wait(timeout=30)
        with sessions.begin() as session:
            late.append(submit(session, fact("Danielle Darrieux", "German"), "alice"))
        submitted.set()

    worker = threading.Thread(target=submitting)
    worker.start()
    ids = import_corrections(sessions, [fact("Danielle Darrieux"), fact("Toko Yasuda")], "bob", model="default")
    worker.join()
    with sessions() as session:
        assert rows(session)[ids[0]] == ("English", "superseded", late[0])
        assert rows(session)[late[0]] == ("German", "pending", None)
        assert verified(session)
