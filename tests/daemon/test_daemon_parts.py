"""The daemon's parts without a model: retention, schedules, log lines, checkpoint files, leases, reverts."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
import torch
from sqlalchemy import select, update

from daemon.checkpoint_files import (
    CheckpointContents,
    CheckpointFileError,
    read_checkpoint,
    remove_unlisted,
    tensors_sha256,
    write_checkpoint,
)
from daemon.lease import LeaseHeld, LeaseLost, acquire, confirm, live_holder, release
from daemon.ledger import release_stale_claims
from daemon.logs import configure_logging, log_event
from daemon.retention import checkpoints_to_prune
from daemon.reverts import RevertRefused, request_revert
from daemon.schedule import Every, parse_cron
from daemon.settings import DaemonSettings, HealthSettings, Retention
from engine.state import EditorState
from storage.audit import verify_chain
from storage.errors import InvalidInput, NotFound
from storage.models import AuditEvent, Checkpoint, Correction, CorrectionStatus, DaemonLease, RevertRequest
from storage.queue import claim_batch, submit
from storage.records import make_correction

MODEL = "sha256:" + "ab" * 32


# ----- retention --------------------------------------------------------------------------------


def test_retention_keeps_the_newest_every_mth_the_first_and_protected():
    ids = list(range(1, 13))  # ordinals 0..11
    doomed = checkpoints_to_prune(ids, already_pruned=set(), retention=Retention(keep_last=3, keep_every=4))
    # kept: ordinal 0 (id 1), every 4th (ids 5, 9), newest 3 (ids 10, 11, 12)
    assert doomed == [2, 3, 4, 6, 7, 8]
    protected = checkpoints_to_prune(ids, {2, 3}, Retention(keep_last=3, keep_every=4), protected={7})
    assert protected == [4, 6, 8]
    assert checkpoints_to_prune(ids, set(), Retention(keep_last=1, keep_every=0)) == list(range(2, 12))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Retention(keep_last=0), "--keep-last must be at least 1"),
        (lambda: Retention(keep_every=-1), "--keep-every must be 0"),
        (lambda: HealthSettings(retention_warning=1.5), "--retention-warning must be between 0 and 1"),
        (lambda: DaemonSettings(batch_size=0), "--batch-size must be at least 1"),
        (lambda: DaemonSettings(method="rome"), "unknown method 'rome'"),
        (lambda: DaemonSettings(model="/no/such/model"), "--model /no/such/model does not exist"),
        (lambda: DaemonSettings(lease_seconds=1), "--lease-seconds must be at least 3"),
    ],
)
def test_bad_settings_are_refused_with_one_line(make, message):
    with pytest.raises(InvalidInput, match=message):
        make()


# ----- schedules -------------------------------------------------------------------------------


def test_cron_schedules_fire_when_the_expression_says():
    nightly = parse_cron("0 2 * * *", "UTC")
    now = datetime(2026, 1, 31, 14, 30, tzinfo=UTC)
    assert nightly.next_after(now) == datetime(2026, 2, 1, 2, 0, tzinfo=UTC)
    assert not nightly.at_start
    seconds = parse_cron("*/15 * * * * *", "UTC")
    assert seconds.next_after(datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC)) == datetime(2026, 1, 1, 0, 0, 15, tzinfo=UTC)
    weekdays = parse_cron("30 9 * * mon-fri", "UTC")
    assert weekdays.next_after(datetime(2026, 1, 31, 12, 0, tzinfo=UTC)).weekday() == 0  # Saturday -> Monday
    assert Every(5).next_after(now) == now + timedelta(seconds=5) and Every(5).at_start


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 2 * *", "expected 5 fields"),
        ("0 2 * * 1", "write the day of the week as mon..sun"),
        ("99 2 * * *", "--schedule '99 2 \\* \\* \\*'"),
    ],
)
def test_bad_cron_expressions_are_refused(expression, message):
    with pytest.raises(InvalidInput, match=message):
        parse_cron(expression)


# ----- log lines -------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["text", "json"])
def test_events_are_one_structured_line_each(style):
    stream = io.StringIO()
    logger = configure_logging(style, stream=stream)
    log_event(logger, logging.INFO, "batch_applied", edit=3, corrections=[1, 2], reason="a b", seconds={"edit": 1.5})
    line = stream.getvalue()
    assert line.count("\n") == 1
    if style == "json":
        record = json.loads(line)
        assert record["event"] == "batch_applied" and record["corrections"] == [1, 2]
        assert record["seconds"] == {"edit": 1.5} and record["level"] == "info"
    else:
        assert 'level=info event=batch_applied edit=3 corrections=1,2 reason="a b" seconds.edit=1.5' in line


# ----- checkpoint files ------------------------------------------------------------------------


def _contents() -> CheckpointContents:
    torch.manual_seed(0)
    weights = {"model.layers.1.mlp.down_proj.weight": torch.randn(8, 16)}
    state = EditorState.fresh(MODEL, (1,), 16, prefixes=("The cat. ",)).after_batch({1: torch.randn(16, 16)}, 1)
    return CheckpointContents(weights, state, {"kind": "edit", "corrections": [1]})


def test_checkpoint_file_round_trip_is_bitwise_and_tampering_is_detected(tmp_path):
    contents = _contents()
    written = write_checkpoint(tmp_path, "m/one.safetensors", contents)
    path = tmp_path / written.relative_path
    assert written.size_bytes == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["one.safetensors"]  # no temporary file left
    back = read_checkpoint(path, written.sha256, "checkpoint 1", "cpu")
    assert tensors_sha256(back.weights) == tensors_sha256(contents.weights)
    assert back.state.equals(contents.state) and back.manifest == contents.manifest
    with pytest.raises(CheckpointFileError, match="checkpoint 1: file .* has sha256 .* altered or damaged"):
        read_checkpoint(path, "0" * 64, "checkpoint 1", "cpu")
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointFileError, match="altered or damaged"):
        read_checkpoint(path, written.sha256, "checkpoint 1", "cpu")
    path.unlink()
    with pytest.raises(CheckpointFileError, match="is missing"):
        read_checkpoint(path, written.sha256, "checkpoint 1", "cpu")


def test_files_no_row_keeps_are_removed(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("kept.safetensors", "orphan.safetensors", ".orphan.safetensors.x.tmp", "notes.txt"):
        (folder / name).write_text("x")
    removed = remove_unlisted(folder, {"m/kept.safetensors"}, tmp_path)
    assert sorted(p.name for p in removed) == [".orphan.safetensors.x.tmp", "orphan.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["kept.safetensors", "notes.txt"]


# ----- leases ----------------------------------------------------------------------------------


def test_one_writer_per_model_and_takeover_after_expiry(sessions):
    alive_elsewhere = "daemon@another-host:1:aaaaaa"
    with sessions.begin() as session:
        first = acquire(session, MODEL, alive_elsewhere, 30)
    assert first.generation == 1
    with sessions.begin() as session, pytest.raises(LeaseHeld, match="is being edited by daemon@another-host:1"):
        acquire(session, MODEL, "daemon@another-host:2:bbbbbb", 30)
    with sessions.begin() as session:
        acquire(session, "sha256:other-model", "daemon@another-host:2:bbbbbb", 30)  # other models are free
        assert live_holder(session, MODEL, "me") is not None
    with sessions.begin() as session:  # the first holder stops renewing: its lease runs out
        session.execute(
            update(DaemonLease)
            .where(DaemonLease.model == MODEL)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with sessions.begin() as session:
        assert live_holder(session, MODEL, "me") is None
        second = acquire(session, MODEL, "daemon@another-host:2:bbbbbb", 30)
    assert second.generation == 2
    with sessions.begin() as session, pytest.raises(LeaseLost, match="now belongs to daemon@another-host:2"):
        confirm(session, first)  # the stalled first holder can no longer record anything
    with sessions.begin() as session:
        confirm(session, second)
        release(session, second)
    with sessions.begin() as session:
        assert live_holder(session, MODEL, "me") is None
        events = session.scalars(select(AuditEvent).where(AuditEvent.kind == "lease_acquired")).all()
        assert [e.payload["reason"] for e in events] == ["first", "first", "expired"]
        assert verify_chain(session) is None


def test_a_lease_whose_process_is_gone_on_this_host_is_free_at_once(sessions):
    import socket

    dead = f"daemon@{socket.gethostname()[:60]}:999999999:cccccc"  # no such pid
    with sessions.begin() as session:
        acquire(session, MODEL, dead, 300)
    with sessions.begin() as session:
        lease = acquire(session, MODEL, "daemon@x:1:dddddd", 30)
    assert lease.generation == 2


def test_recovery_releases_only_claims_of_workers_without_a_live_lease(sessions):
    with sessions.begin() as session:
        for subject in ("France", "Italy", "Spain"):
            submit(session, make_correction("The capital of {} is", subject, "Rome"), "alice")
    with sessions.begin() as session:
        acquire(session, "sha256:other-model", "daemon@h:2:live01", 30)
        claim_batch(session, 1, "daemon@h:1:dead01")
        claim_batch(session, 1, "daemon@h:2:live01")
    with sessions.begin() as session:
        released = release_stale_claims(session, "daemon@h:3:me0001", "recovery")
    assert released == [1]
    with sessions.begin() as session:
        statuses = {c.id: c.status for c in session.scalars(select(Correction))}
    assert statuses == {1: CorrectionStatus.PENDING, 2: CorrectionStatus.APPLYING, 3: CorrectionStatus.PENDING}


# ----- revert requests -------------------------------------------------------------------------


def _chain(session, pruned: tuple[int, ...] = ()) -> None:
    """Checkpoints 1 <- 2 <- 3 and a branch 2 <- 4 (so 3 is off the current line)."""
    for checkpoint_id, parent in ((1, None), (2, 1), (3, 2), (4, 2)):
        session.add(
            Checkpoint(
                id=checkpoint_id,
                parent_id=parent,
                path=f"m/{checkpoint_id}.safetensors",
                sha256="a" * 64,
                size_bytes=1,
                base_model=MODEL,
                pruned=checkpoint_id in pruned,
                manifest={},
            )
        )
    session.flush()


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (9, NotFound, "no checkpoint with id 9"),
        (1, RevertRefused, "checkpoint 1 was pruned by the retention setting"),
        (3, RevertRefused, "checkpoint 3 is not an ancestor of the current checkpoint 4"),
        (4, RevertRefused, "checkpoint 4 is already the model's current state"),
    ],
)
def test_revert_requests_are_refused_with_the_reason(sessions, target, error, message):
    with sessions.begin() as session:
        _chain(session, pruned=(1,))
    with sessions.begin() as session, pytest.raises(error, match=message):
        request_revert(session, target, "alice")
    with sessions.begin() as session:
        assert session.scalars(select(RevertRequest)).all() == []


def test_a_revert_request_is_queued_and_audited(sessions):
    with sessions.begin() as session:
        _chain(session)
        request = request_revert(session, 2, "alice")
    with sessions.begin() as session:
        event = session.scalars(select(AuditEvent)).one()
        assert (event.kind, event.checkpoint_id, event.payload) == (
            "revert_requested",
            2,
            {"request": request.id, "current_checkpoint": 4},
        )


def test_settings_repeat_the_engine_constants_faithfully():
    from daemon import settings
    from engine.hparams import METHODS
    from engine.models import DEFAULT_MODEL

    assert (settings.METHODS, settings.DEFAULT_MODEL) == (METHODS, DEFAULT_MODEL)
