"""The audit hash chain: it verifies, and any altered or deleted row is found by `metake audit verify`."""

from __future__ import annotations

import hashlib
import hmac
import json
from types import SimpleNamespace

import pytest
import sqlalchemy.exc
from sqlalchemy import select, text

from storage.audit import GENESIS_HASH, ChainBreak, append_event, event_hash, verify_chain
from storage.checkpoints import audit_checkpoint
from storage.db import session_factory
from storage.intake import make_correction
from storage.models import AuditEvent, Checkpoint, Correction, CorrectionStatus, Edit, Metric, Phase
from storage.queue import claim_batch, mark_applied, submit_many


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
    assert metake("audit", "verify").stdout.splitlines()[0] == "audit chain verified: 6 events"
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


def fill_with_checkpoint(sessions) -> None:
    fill(sessions)
    with sessions.begin() as session:
        checkpoint = Checkpoint(path="m/1.safetensors", sha256="ab" * 32, size_bytes=10, base_model="m")
        session.add(checkpoint)
        session.flush()
        audit_checkpoint(session, checkpoint, "worker")


def _forge(sessions) -> None:
    with sessions.begin() as session:
        original = session.get(Correction, 1)
        session.add(
            Correction(
                prompt=original.prompt,
                subject="Forged",
                target="Rome",
                submitter="alice",
                submitted_at=original.submitted_at,
                status=CorrectionStatus.PENDING,
            )
        )


ROW_TAMPERING = [
    (
        "UPDATE corrections SET target = 'Berlin' WHERE id = 2",
        "correction 2",
        "its target differs from its submitted event",
    ),
    (
        "UPDATE corrections SET priority = 9 WHERE id = 1",
        "correction 1",
        "its priority differs from its submitted event",
    ),
    ("UPDATE corrections SET submitter = 'mallory' WHERE id = 1", "correction 1", "its submitter differs"),
    (
        "UPDATE corrections SET status = 'applied' WHERE id = 3",
        "correction 3",
        "its status is applied, its events say applying",
    ),
    (
        "DELETE FROM audit_events WHERE id = 7",
        "checkpoint 1",
        "it has no checkpoint_written event (the row was forged)",
    ),
    ("DELETE FROM audit_events WHERE id >= 6", "correction 3", "its status is applying, its events say pending"),
    ("DELETE FROM audit_events", "correction 1", "it has no submitted event (the row was forged)"),
    ("UPDATE checkpoints SET sha256 = '{}' WHERE id = 1".format("cd" * 32), "checkpoint 1", "its sha256 differs"),
    (_forge, "correction 4", "it has no submitted event (the row was forged)"),
    ("UPDATE corrections SET model = 'other-bot' WHERE id = 2", "correction 2", "its model differs"),
    ("UPDATE checkpoints SET model = 'other-bot' WHERE id = 1", "checkpoint 1", "its model differs"),
]


@pytest.mark.parametrize(
    ("tamper", "row", "reason"),
    ROW_TAMPERING,
    ids=[
        "target",
        "priority",
        "submitter",
        "status",
        "checkpoint-event",
        "newest-events",
        "all-events",
        "sha",
        "forged",
        "correction-model",
        "checkpoint-model",
    ],
)
def test_rows_that_differ_from_their_events_are_found(sessions, engine, metake, tamper, row, reason):
    """The chain alone passes all of these (what is left of it is intact); the row check does not."""
    fill_with_checkpoint(sessions)
    expected = "rows match their events: 3 corrections, 1 checkpoints, 0 edits"
    assert metake("audit", "verify").stdout.splitlines()[1] == expected
    if callable(tamper):
        tamper(sessions)
    else:
        with engine.begin() as connection:
            connection.execute(text(tamper))
    with sessions() as session:
        assert verify_chain(session) is None
    result = metake("audit", "verify")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: audit chain verified, but {row} does not match its events: {reason}")
    assert len(result.stderr.splitlines()) == 1
    as_json = json.loads(metake("audit", "verify", "--json").stdout)[0]
    assert as_json["ok"] is False and as_json["first_bad_row"]["id"] == int(row.split()[1])


def test_submitted_event_records_the_whole_correction(sessions):
    correction = make_correction(
        "The capital of {} is",
        "France",
        "Rome",
        paraphrases=["France's capital is"],
        neighbors=[{"prompt": "The capital of Spain is", "answer": "Madrid"}],
        priority=3,
        original_answer="Paris",
    )
    with sessions.begin() as session:
        submit_many(session, [correction], "alice", model="support-bot")
    with sessions() as session:
        event = session.scalars(select(AuditEvent)).one()
    assert (event.kind, event.actor) == ("submitted", "alice")
    assert event.payload == {
        "model": "support-bot",
        "prompt": "The capital of {} is",
        "subject": "France",
        "target": "Rome",
        "original_answer": "Paris",
        "paraphrases": ["France's capital is"],
        "neighbors": [{"prompt": "The capital of Spain is", "answer": "Madrid"}],
        "priority": 3,
    }


def test_a_recorded_head_finds_removed_and_rewritten_newest_events(sessions, engine, metake, tmp_path):
    """Deleting the newest events, or rewriting them with fresh hashes, leaves a valid chain;
    a head kept outside the database shows both."""
    fill(sessions)
    head = tmp_path / "head.json"
    written = metake("audit", "head")
    assert written.exit_code == 0
    head.write_text(written.stdout)
    assert json.loads(written.stdout)["event"] == 6
    ok = metake("audit", "verify", "--head", str(head))
    assert ok.stdout.splitlines()[-1] == "the recorded head, event 6, is in the chain"
    with engine.begin() as connection:
        connection.execute(text("UPDATE corrections SET status = 'pending' WHERE id = 3"))
        connection.execute(text("DELETE FROM audit_events WHERE id = 6"))
    assert metake("audit", "verify", "--head", str(head)).stderr == (
        "Error: audit chain broken at event 6: the chain ends at event 5, before the recorded head 6 "
        "(events were removed)\n"
    )
    with sessions.begin() as session:  # the attacker re-appends a different event 6 with a valid hash
        append_event(session, "claimed", actor="mallory", correction_id=3, payload={"attempt": 1})
    with sessions() as session:
        assert verify_chain(session) is None
    assert metake("audit", "verify", "--head", str(head)).stderr == (
        "Error: audit chain broken at event 6: event 6 is not the one recorded as the head (the chain was rewritten)\n"
    )


def test_a_head_file_that_is_not_one_is_one_line(metake, sessions, tmp_path):
    fill(sessions)
    bad = tmp_path / "head.json"
    bad.write_text("{}")
    assert metake("audit", "verify", "--head", str(bad)).stderr == (
        f"Error: {bad} is not a head written by `metake audit head`\n"
    )


def _applied_edit(sessions) -> None:
    """Correction 1 applied by edit 1 with two metrics; its checkpoint_written event carries the digest."""
    fill(sessions, count=1)
    with sessions.begin() as session:
        checkpoint = Checkpoint(path="m/1.safetensors", sha256="ab" * 32, size_bytes=10, base_model="m")
        session.add(checkpoint)
        session.flush()
        edit = Edit(method="metake", model="m", layers=[4], checkpoint_after_id=checkpoint.id)
        session.add(edit)
        session.flush()
        session.add_all(
            [
                Metric(edit_id=edit.id, correction_id=1, name="target_prob", phase=Phase.PRE, value=0.01),
                Metric(edit_id=edit.id, correction_id=1, name="target_prob", phase=Phase.POST, value=0.93),
            ]
        )
        session.flush()
        mark_applied(session, session.scalars(select(Correction)).all(), edit.id, worker="worker")
        audit_checkpoint(session, checkpoint, "worker", edit_id=edit.id)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("UPDATE metrics SET value = 0.02 WHERE phase = 'post'", "its row or its metrics differ"),
        ("UPDATE edits SET method = 'memit'", "its row or its metrics differ"),
        ("DELETE FROM metrics WHERE phase = 'pre'", "its row or its metrics differ"),
        (
            "INSERT INTO edits (method, model, hparams, layers, started_at, timings) "
            "SELECT method, model, hparams, layers, started_at, timings FROM edits",
            "it has no checkpoint_written event (the row was forged)",
        ),
    ],
    ids=["metric-value", "edit-method", "metric-deleted", "forged-edit"],
)
def test_edits_and_their_metrics_are_checked_against_their_checkpoint_event(sessions, engine, metake, tamper, reason):
    _applied_edit(sessions)
    with sessions.begin() as session:  # a later health check adds metrics to the edit: still fine
        session.add(Metric(edit_id=1, correction_id=1, name="health.holds", phase=Phase.POST, value=1.0))
    assert metake("audit", "verify").stdout.splitlines()[1].endswith("1 checkpoints, 1 edits")
    with engine.begin() as connection:
        connection.execute(text(tamper))
    result = metake("audit", "verify")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: audit chain verified, but edit ") and reason in result.stderr


def test_a_walk_from_a_later_event_links_it_to_the_one_before(sessions, engine):
    """`metake status` checks only the newest events this way; the first of them must still link."""
    fill(sessions)
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE id = 2"))
    with sessions() as session:
        assert verify_chain(session, start=4) is None  # the altered event is before the window
        assert verify_chain(session, start=2).event_id == 2
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET prev_hash = :h WHERE id = 4"), {"h": "1" * 64})
    with sessions() as session:
        assert verify_chain(session, start=4) == ChainBreak(
            4, "its prev_hash does not match the hash of the event before it"
        )


def _rewrite_without_key(engine, from_id: int, new_payload: str) -> None:
    """What an attacker with database access can do: change an event and recompute every hash after it."""
    with engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET payload = :p WHERE id = :i"), {"p": new_payload, "i": from_id})
        rows = connection.execute(select(AuditEvent.__table__).order_by(AuditEvent.id)).all()
        prev = GENESIS_HASH
        for row in rows:
            new_hash = event_hash(SimpleNamespace(**(dict(row._mapping) | {"prev_hash": prev})))
            connection.execute(
                text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE id = :i"),
                {"p": prev, "h": new_hash, "i": row.id},
            )
            prev = new_hash


def test_an_audit_key_finds_a_chain_rewritten_without_it(engine, metake, tmp_path):
    key_file = tmp_path / "audit.key"
    assert metake("audit", "new-key", str(key_file)).exit_code == 0
    assert len(key_file.read_bytes()) == 32 and key_file.stat().st_mode & 0o777 == 0o600
    assert metake("audit", "new-key", str(key_file)).stderr.endswith(
        "already exists; an audit key is never overwritten\n"
    )
    keyed = lambda *args: metake("--audit-key", str(key_file), *args)  # noqa: E731
    unsealed = metake("submit", "--prompt", "The capital of {} is", "--subject", "Chile", "--target", "Lima")
    assert unsealed.exit_code == 0  # event 1: written before the key was used
    for country in ("France", "Peru"):
        assert (
            keyed("submit", "--prompt", "The capital of {} is", "--subject", country, "--target", "Rome").exit_code == 0
        )
    ok = keyed("audit", "verify")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines()[-1] == (
        "MACs under the audit key verified from event 2 on (events 1-1 were written before the key was used)"
    )
    with engine.connect() as connection:
        seals = connection.execute(text("SELECT id, mac FROM audit_events ORDER BY id")).all()
    with engine.begin() as connection:  # dropping the seals of the newest events
        connection.execute(text("UPDATE audit_events SET mac = NULL WHERE id >= 3"))
    assert "event 3: it has no MAC but earlier events do" in keyed("audit", "verify").stderr
    with engine.begin() as connection:  # or of all of them
        connection.execute(text("UPDATE audit_events SET mac = NULL"))
    assert "event 3: no event has a MAC made with this audit key" in keyed("audit", "verify").stderr
    with engine.begin() as connection:
        for event_id, mac in seals:
            connection.execute(text("UPDATE audit_events SET mac = :m WHERE id = :i"), {"m": mac, "i": event_id})
    assert keyed("audit", "verify").exit_code == 0
    _rewrite_without_key(engine, 2, json.dumps({"target": "Lima", "priority": 0}))
    assert metake("audit", "verify").stderr.startswith("Error: audit chain verified, but correction 2")  # rows only
    assert keyed("audit", "verify").stderr == (
        "Error: audit chain broken at event 2: its MAC does not match (written without the audit key, or under "
        "another key)\n"
    )
    other = tmp_path / "other.key"
    other.write_bytes(b"x" * 32)
    assert "event 1: its MAC does not match" not in metake("--audit-key", str(other), "audit", "verify").stderr
    assert "event 2: its MAC does not match" in metake("--audit-key", str(other), "audit", "verify").stderr
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 8)
    assert metake("--audit-key", str(short), "queue").stderr == (
        f"Error: the audit key {short} has 8 bytes; it needs at least 16\n"
    )
    assert metake("--audit-key", str(tmp_path / "missing.key"), "queue").exit_code == 1


def test_events_appended_with_a_key_carry_its_mac(engine):
    key = b"k" * 32
    with session_factory(engine, key).begin() as session:
        append_event(session, "submitted", actor="alice", payload={"target": "Rome"})
    with session_factory(engine).begin() as session:
        append_event(session, "submitted", actor="bob", payload={"target": "Lima"})  # a writer without the key
    with session_factory(engine)() as session:
        first, second = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert first.mac == hmac.new(key, first.hash.encode(), hashlib.sha256).hexdigest() and second.mac is None
        assert verify_chain(session) is None
        assert verify_chain(session, key=key) == ChainBreak(
            2, "it has no MAC but earlier events do (written without the audit key)"
        )
