"""Connecting to the store, and keeping its schema at the revision the code expects.

SQLite is opened so that every transaction takes the write lock up front (``BEGIN IMMEDIATE``):
that is what serialises queue claims and audit appends there. PostgreSQL uses row locks and an
advisory lock instead (see storage.queue and storage.audit).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from storage.audit_key import SESSION_INFO_KEY
from storage.errors import DatabaseUnreachable, SchemaNotCurrent

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

Sessions = sessionmaker[Session]
"""The session factory the store hands out (``StoreContext.sessions()``)."""

SQLITE_BUSY_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 30.0
"""PostgreSQL's lock_timeout for every session of the store."""
PG_CONNECT_TIMEOUT_S = 10
UPGRADE_HINT = "run `metake db upgrade`"
READ_ONLY_OPTION = "metake_read_only"
SCHEMA_HEAD = "b7d2c5a9e1f4"
"""The newest migration in migrations/versions (a test checks it), so that a command can check the
database's revision without importing alembic and reading every migration (a fifth of its start-up)."""


def display_url(url: str | URL) -> str:
    """The URL as it may be shown to people and written to logs: password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        return "<unparseable database URL>"


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL, or None for other backends and in-memory databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):  # the URI form an archived (read-only) file is opened with
        return Path(parsed.database.removeprefix("file:").split("?", 1)[0])
    return Path(parsed.database)


def make_engine(url: str | URL, *, foreign_keys: bool = True) -> Engine:
    """An engine for the store; ``foreign_keys=False`` only for SQLite migrations (batch mode)."""
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError) as error:
        raise DatabaseUnreachable(f"not a database URL: {display_url(url)}") from error
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    archived = False
    if backend == "sqlite":
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_S
        archived = _is_archived(parsed)
        if archived:
            resolved = Path(parsed.database or "").resolve()
            parsed = parsed.set(database=f"file:{resolved}", query={"mode": "ro", "immutable": "1", "uri": "true"})
    elif backend == "postgresql":
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        # A wait for a lock (the audit chain behind an import, a row a daemon holds) ends like
        # SQLite's busy timeout: an error after this long, reported in one line, not a hang.
        connect_args["options"] = f"-c lock_timeout={int(LOCK_TIMEOUT_S * 1000)}"
    try:
        engine = create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as error:
        raise DatabaseUnreachable(f"cannot use database {display_url(parsed)}: {error}") from error
    if backend == "sqlite":
        _serialise_sqlite(engine, foreign_keys=foreign_keys, archived=archived)
    return engine


def _is_archived(url: URL) -> bool:
    """A SQLite file in a folder this process cannot write (a read-only file system, an archived
    home): SQLite cannot create its lock files there, so the file is opened read-only and
    immutable, and every command that only reads works. A write-ahead log left beside it would be
    ignored by such a reader, so that is refused rather than shown without its newest writes."""
    database = url.database
    if database in (None, "", ":memory:") or str(database).startswith("file:"):
        return False
    path = Path(str(database))
    if not path.is_file() or os.access(path.parent, os.W_OK):
        return False
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise DatabaseUnreachable(
            f"{path} is in a folder that cannot be written and its write-ahead log {wal.name} holds writes "
            "not yet merged into it; open a writable copy of the home instead"
        )
    return True


def _serialise_sqlite(engine: Engine, *, foreign_keys: bool, archived: bool = False) -> None:
    """Take the write lock at BEGIN, per the SQLAlchemy pysqlite transaction recipe."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        if not archived:  # an immutable file keeps the journal mode it was written with
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front (no lock upgrade deadlocks); readers begin deferred
        # and, under WAL, read a snapshot without waiting for a writer or making one wait.
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Engine:
    """The same engine for transactions that only read: SQLite begins them without the write lock,
    PostgreSQL runs them READ ONLY (a write in one is an error, not a silent change)."""
    options: dict[str, Any] = {READ_ONLY_OPTION: True}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    return engine.execution_options(**options)


def session_factory(engine: Engine, audit_key: bytes | None = None) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (the CLI prints them afterwards) and
    carry the audit key, if any, for the events they append (storage.audit_key)."""
    info = {SESSION_INFO_KEY: audit_key} if audit_key is not None else {}
    return sessionmaker(engine, expire_on_commit=False, info=info)


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection, with connection failures reported as DatabaseUnreachable (password hidden)."""
    try:
        connection = engine.connect()
    except exc.DBAPIError as error:
        raise DatabaseUnreachable(_unreachable_message(engine.url, error)) from error
    with connection:
        yield connection


def _first_line(error: exc.DBAPIError) -> str:
    """The driver's message, first line (PostgreSQL adds detail and hint lines after it)."""
    lines = str(error.orig).strip().splitlines()
    return lines[0] if lines else type(error.orig).__name__


def is_busy(error: exc.DBAPIError) -> bool:
    """A lock wait that timed out (SQLite's busy timeout, PostgreSQL's lock_timeout)."""
    reason = _first_line(error)
    return "database is locked" in reason or "lock timeout" in reason


def database_error_message(error: exc.DBAPIError, holder: str | None = None) -> str:
    """One line for a database error a command did not expect (a busy or damaged database);
    ``holder`` says what a busy database is doing (storage.busy)."""
    reason = _first_line(error)
    if is_busy(error):
        return f"the database is busy: {holder or 'another metake process holds its write lock'}; retry"
    if "malformed" in reason or "not a database" in reason:
        return f"the database file is damaged ({reason}); restore it from a backup"
    if "readonly database" in reason:
        return "the database is read-only here (its folder cannot be written): only commands that read work"
    return f"database error: {reason}"


def damage_report(session: Session) -> str | None:
    """SQLite's ``PRAGMA quick_check`` (every page and index readable and consistent); None when fine."""
    if session.get_bind().dialect.name != "sqlite":
        return None
    rows = [str(row[0]) for row in session.execute(text("PRAGMA quick_check"))]
    if rows == ["ok"]:
        return None
    lines = [line for row in rows for line in row.splitlines() if line.strip() and not line.startswith("***")]
    return "; ".join(lines[:2]) or "quick_check failed"


def _unreachable_message(url: URL, error: exc.DBAPIError) -> str:
    reason = _first_line(error)
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return f"cannot reach database {display_url(url)}: {reason}"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration for the packaged migrations, optionally bound to a connection."""
    from alembic.config import Config  # alembic only where migrations are read (see SCHEMA_HEAD)

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revisions() -> tuple[str, ...]:
    return tuple(_scripts().get_heads())


def current_revisions(engine: Engine) -> tuple[str, ...]:
    """The revisions stamped in the database; empty for a database without the schema."""
    with connect(read_only(engine)) as connection:
        if not inspect(connection).has_table("alembic_version"):
            return ()
        return tuple(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``, creating the SQLite file if needed."""
    database_file = sqlite_file(url)
    if database_file is not None:
        database_file.parent.mkdir(parents=True, exist_ok=True)
    from alembic import command

    engine = make_engine(url, foreign_keys=False)
    try:
        with connect(engine) as connection, connection.begin():
            command.upgrade(alembic_config(connection), revision)
    finally:
        engine.dispose()


def require_current_revision(engine: Engine) -> None:
    """Refuse to work on a database whose schema is older or newer than this code's."""
    database_file = sqlite_file(engine.url)
    if database_file is not None and not database_file.exists():
        raise SchemaNotCurrent(f"no database at {database_file}; run `metake init` (or `metake db upgrade`)")
    current = current_revisions(engine)
    if current == (SCHEMA_HEAD,):
        return  # every command checks this: it must not cost alembic's import and a read of the migrations
    from alembic.util import CommandError

    script = _scripts()
    heads = tuple(script.get_heads())
    if set(current) == set(heads):
        return
    where = display_url(engine.url)
    if not current:
        raise SchemaNotCurrent(f"database {where} has no metake schema; {UPGRADE_HINT}")
    for revision in current:
        try:
            script.get_revision(revision)
        except CommandError as error:
            raise SchemaNotCurrent(
                f"database {where} is at revision {revision}, which this version of metake does not "
                f"know (it needs {', '.join(heads)}); install a newer metake"
            ) from error
    raise SchemaNotCurrent(
        f"database {where} is at revision {', '.join(current)} but this metake needs {', '.join(heads)}; {UPGRADE_HINT}"
    )
