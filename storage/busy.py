"""Who holds the database's write lock: the one line a command that waited too long prints.

A bulk import is the longest writer (one transaction per chunk of it, storage.imports). While
it holds the lock it announces itself where the others can see it without a lock: on SQLite in a small JSON note
beside the database file, on PostgreSQL as its session's ``application_name`` (visible in
``pg_stat_activity``). A command whose lock wait timed out then says what it waited for:
"the database is busy: an import of 20000 records by alice (started 31 s ago) is running; retry".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from storage.db import sqlite_file
from storage.leases import process_is_gone
from storage.types import utcnow

APPLICATION_PREFIX = "metake import:"
"""``application_name`` of an importing PostgreSQL session: the prefix, then ``records:epoch:submitter``
(PostgreSQL keeps 63 bytes of it)."""
NOTE_SUFFIX = ".import-"


def _description(records: int, submitter: str, started: datetime) -> str:
    seconds = max(0, round((utcnow() - started).total_seconds()))
    return f"an import of {records} records by {submitter} (started {seconds} s ago) is running"


@contextmanager
def announce_import(session: Session, records: int, submitter: str, started: datetime | None = None) -> Iterator[None]:
    """Make this import (or one chunk of it, ``started`` at the import's start) visible to commands
    that time out waiting for it; call inside its transaction."""
    engine = session.get_bind()
    started = started or utcnow()
    database = sqlite_file(engine.url)
    if engine.dialect.name == "postgresql":
        name = f"{APPLICATION_PREFIX}{records}:{int(started.timestamp())}:{submitter}"
        name = name.encode()[:63].decode(errors="ignore")
        session.execute(text("SELECT set_config('application_name', :name, true)"), {"name": name})
        yield
        return
    if database is None:
        yield
        return
    path = database.with_name(f"{database.name}{NOTE_SUFFIX}{os.getpid()}.json")
    try:
        path.write_text(json.dumps({"records": records, "submitter": submitter, "started": started.isoformat()}))
    except OSError:
        path = None  # a folder that cannot be written cannot hold an import either
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def running_import(engine: Engine) -> str | None:
    """What a long writer that announced itself is doing now, or None; never raises."""
    try:
        if engine.dialect.name == "postgresql":
            return _postgres_import(engine)
        database = sqlite_file(engine.url)
        return _sqlite_import(database) if database is not None else None
    except Exception:  # noqa: BLE001 - a description is a courtesy; the error it decorates comes first
        return None


def _sqlite_import(database: Path) -> str | None:
    for note in sorted(database.parent.glob(f"{database.name}{NOTE_SUFFIX}*.json")):
        pid = int(note.name.removeprefix(f"{database.name}{NOTE_SUFFIX}").removesuffix(".json"))
        if process_is_gone(pid):
            continue  # a killed import's note; its transaction was rolled back
        found = json.loads(note.read_text())
        return _description(int(found["records"]), str(found["submitter"]), datetime.fromisoformat(found["started"]))
    return None


def _postgres_import(engine: Engine) -> str | None:
    query = text(
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE :prefix "
        "AND state <> 'idle' AND pid <> pg_backend_pid() ORDER BY xact_start LIMIT 1"
    )
    with engine.connect() as connection:
        name = connection.execute(query, {"prefix": APPLICATION_PREFIX + "%"}).scalar()
    if name is None:
        return None
    records, epoch, submitter = name.removeprefix(APPLICATION_PREFIX).split(":", 2)
    return _description(int(records), submitter, datetime.fromtimestamp(int(epoch), UTC))
