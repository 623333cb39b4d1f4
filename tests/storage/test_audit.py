"""The audit hash chain: it verifies, and any altered or deleted row is found by `metake audit verify`."""

from __future__ import annotations

import json

import pytest
import sqlalchemy.exc
from sqlalchemy import select, text

from storage.audit import GENESIS_HASH, append_event, event_hash, verify_chain
from storage.intake import make_correction
from storage.models import AuditEvent, Checkpoint
from storage.queue import claim_batch, submit_many


def fill(sessions, count: int = 3) -> None:
    corrections = [make_correction("The capital of {} is", f"Country {i}", "Paris") for i in range(count)]
    with sessions.begin() as session:
        submit_many(session, corrections, "alice")
    with sessions.begin() as session:
        claim_batch(session, count, "worker")


def test_chain_links_each_event_to_the_previous(sessions):
    fill(sessions)
    with sessions() as session:
        chain = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        assert [e.id for e in chain] == [1, 2, 3, 4, 5, 6]
        assert chain[0].prev_hash == GENESIS_HASH
        assert all(later.prev_hash == earlier.hash for earlier, later in zip(chain, chain[1:], strict=False))
        assert all(event_hash(e) == e.hash for e in chain)
        assert verify_chain(session) is None


def test_payload_is_stored_as_it_is_hashed(sessions):
    with sessions.begin() as session:
        checkpoint = Checkpoint(path="checkpoints/1.safetensors", sha256="ab" * 32, size_bytes=10, base_model="m")
        session.add(checkpoint)
        session.flush()
        append_event(
            session,
            "checkpoint_written",
            actor="daemon",
            checkpoint_id=checkpoint.id,
            payload={2: "int keys", 10: [1.5, (1, 2)], "nested": {"b": 1, "a": None}},
        )
    with sessions() as session:
        event = session.scalars(select(AuditEvent)).one()
        assert event.payload == {"2": "int keys", "10": [1.5, [1, 2]], "nested": {"b": 1, "a": None}}
        assert verify_chain(session) is None


def test_orm_refuses_to_change_or_delete_events(sessions):
    fill(sessions, 1)
    with sessions() as session:
        event = session.get(AuditEvent, 1)
        event.actor = "mallory"
        with pytest.raises(PermissionError, match="append-only"):
            session.flush()
        session.rollback()
        session.delete(session.get(AuditEvent, 1))
        with pytest.raises(PermissionError, match="append-only"):
            session.flush()


@pytest.mark.parametrize(
    ("tamper", "bad_event", "reason"),
    [
        (
            "UPDATE audit_events SET actor = 'mallory' WHERE id = 3",
            3,
            "its contents do not match its hash (the row was altered)",
        ),
        ("DELETE FROM audit_events WHERE id = 2", 3, "expected event 2 here; events are missing"),
        (
            "UPDATE audit_events SET hash = '{}' WHERE id = 4".format("0" * 64),
            4,
            "its contents do not match its hash (the row was altered)",
        ),
        (
            "UPDATE audit_events SET prev_hash = '{}' WHERE id = 5".format("1" * 64),
            5,
            "its prev_hash does not match the hash of the event before it",
        ),
    ],
    ids=["altered", "deleted", "rehashed", "relinked"],
)
def test_tampering_is_detected_by_audit_verify(sessions, engine, metake, tamper, bad_event, reason):
    fill(sessions)
    assert metake("audit", "verify").stdout == "audit chain verified: 6 events\n"
    with engine.begin() as connection:
        connection.execute(text(tamper))
    result = metake("audit", "verify")
    assert result.exit_code == 1
    assert result.stderr == f"Error: audit chain broken at event {bad_event}: {reason}\n"
    as_json = metake("audit", "verify", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)[0]["first_bad_event"] == bad_event


def test_altered_payload_is_detected(sessions, engine, metake):
    fill(sessions)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE audit_events SET payload = :payload WHERE id = 1"),
            {"payload": json.dumps({"target": "German", "priority": 0})},
        )
    result = metake("audit", "verify")
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: audit chain broken at event 1: its contents do not match its hash (the row was altered)\n",
    )


def test_a_payload_that_is_not_json_is_a_break_not_a_traceback(sessions, engine, metake):
    """Only SQLite can hold it (PostgreSQL's json type refuses the update), so only it is tampered."""
    fill(sessions)
    if engine.dialect.name != "sqlite":
        with pytest.raises(sqlalchemy.exc.DataError), engine.begin() as connection:
            connection.execute(text("UPDATE audit_events SET payload = 'not json' WHERE id = 2"))
        return
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET payload = 'not json' WHERE id = 2"))
    result = metake("audit", "verify")
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: audit chain broken at event 2: its payload is not JSON (the row was altered)\n",
    )
