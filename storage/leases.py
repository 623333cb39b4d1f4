"""Lease rows: one writer per model, renewed by the daemon's heartbeat, taken over on expiry.

A daemon edits a model only while it holds that model's lease. The lease expires unless renewed,
so a daemon that died (kill -9, power loss) is replaced once its lease runs out; one that died on
this same host is replaced at once, since its process id is visibly gone. Every new holder bumps
the lease's generation, and each batch is committed only if the generation is still the one the
daemon acquired, so a daemon that stalled past its lease can never record a batch.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exc
from sqlalchemy.orm import Session, sessionmaker

from storage.audit import AuditKind, append_event
from storage.errors import StoreError, UserError
from storage.models import DaemonLease
from storage.types import utcnow

HOST_CHARS = 60


class LeaseHeld(UserError):
    """Another live daemon holds the model's lease; the message says who and until when."""


class LeaseLost(RuntimeError):
    """This daemon's lease was taken over (it stalled past its expiry); it must stop writing."""


class LeaseRenewalFailed(StoreError):
    """The database could not be asked whether the lease still holds (it may well hold)."""


def worker_name() -> str:
    """``daemon@<host>:<pid>:<random>``: who holds leases and claims, as recorded in the store."""
    host = socket.gethostname()[:HOST_CHARS]
    return f"daemon@{host}:{os.getpid()}:{secrets.token_hex(3)}"


def holder_is_gone(holder: str) -> bool:
    """True when ``holder`` names a process on this host that no longer exists."""
    try:
        host_pid = holder.split("@", 1)[1]
        host, pid_text, _nonce = host_pid.rsplit(":", 2)
        pid = int(pid_text)
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname()[:HOST_CHARS] or pid == os.getpid():
        return False
    return process_is_gone(pid)


def process_is_gone(pid: int) -> bool:
    """True when no process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


@dataclass(frozen=True)
class Lease:
    """A lease this process holds: the model, our name, and the generation we acquired."""

    model: str
    holder: str
    generation: int
    seconds: float


def _describe(row: DaemonLease, now: datetime) -> str:
    left = (row.expires_at - now).total_seconds()
    renewed = (now - row.renewed_at).total_seconds()
    return f"{row.holder} (renewed {renewed:.0f} s ago, expires in {left:.0f} s)"


def live_holder(session: Session, model: str, me: str) -> str | None:
    """Who else holds ``model``'s lease right now, described for people; None if it is free to take."""
    row = session.get(DaemonLease, model, populate_existing=True)
    now = utcnow()
    if row is None or row.holder == me or row.expires_at <= now or holder_is_gone(row.holder):
        return None
    return _describe(row, now)


def acquire(session: Session, model: str, holder: str, seconds: float) -> Lease:
    """Take the lease in the caller's transaction, or raise LeaseHeld naming the live holder."""
    now = utcnow()
    expires = now + timedelta(seconds=seconds)
    row = session.get(DaemonLease, model, with_for_update=True, populate_existing=True)
    previous: str | None = None
    reason = "first"
    if row is None:
        row = DaemonLease(model=model, holder=holder, generation=1, acquired_at=now, renewed_at=now, expires_at=expires)
        session.add(row)
    else:
        alive = row.expires_at > now and not holder_is_gone(row.holder)
        if alive and row.holder != holder:
            raise LeaseHeld(f"model {model!r} is being edited by {_describe(row, now)}")
        previous = row.holder
        reason = "expired" if row.expires_at <= now else "holder process gone" if row.holder != holder else "renewed"
        row.holder = holder
        row.generation += 1
        row.acquired_at = now
        row.renewed_at = now
        row.expires_at = expires
    session.flush()
    append_event(
        session,
        AuditKind.LEASE_ACQUIRED,
        actor=holder[:100],
        payload={"model": model, "generation": row.generation, "previous_holder": previous, "reason": reason},
    )
    return Lease(model, holder, row.generation, seconds)


def confirm(session: Session, lease: Lease) -> None:
    """Lock the lease row and check it is still ours, extending it; raise LeaseLost if not.

    Called inside every transaction that records the daemon's work, so the check and the writes
    commit together.
    """
    row = session.get(DaemonLease, lease.model, with_for_update=True, populate_existing=True)
    if row is None or row.holder != lease.holder or row.generation != lease.generation:
        who = "nobody" if row is None else f"{row.holder} (generation {row.generation})"
        raise LeaseLost(f"the lease on model {lease.model[:23]}… now belongs to {who}")
    now = utcnow()
    row.renewed_at = now
    row.expires_at = now + timedelta(seconds=lease.seconds)
    session.flush()


def release(session: Session, lease: Lease) -> None:
    """Let the lease expire now, so a successor need not wait; does nothing if it is not ours."""
    row = session.get(DaemonLease, lease.model, with_for_update=True, populate_existing=True)
    if row is not None and row.holder == lease.holder and row.generation == lease.generation:
        row.expires_at = utcnow()
        session.flush()


def try_acquire(sessions: sessionmaker[Session], model: str, holder: str, seconds: float) -> Lease:
    """acquire() in its own transaction, retrying once if another daemon inserted the row first."""
    for attempt in range(2):
        try:
            with sessions.begin() as session:
                return acquire(session, model, holder, seconds)
        except exc.IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def renew(sessions: sessionmaker[Session], lease: Lease) -> None:
    """confirm() in its own transaction; a database failure becomes LeaseRenewalFailed."""
    try:
        with sessions.begin() as session:
            confirm(session, lease)
    except exc.SQLAlchemyError as error:
        raise LeaseRenewalFailed(str(error)) from error
