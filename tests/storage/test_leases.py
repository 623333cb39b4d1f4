"""Lease rows: one writer per model, takeover after expiry or when the holder's process is gone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from storage.audit import verify_chain
from storage.leases import LeaseHeld, LeaseLost, acquire, confirm, live_holder, release
from storage.models import AuditEvent, DaemonLease

MODEL = "sha256:" + "ab" * 32


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
