"""Fixtures that give each test a fresh database on every available backend (storage and CLI tests).

SQLite always, and PostgreSQL: the session's server from ``pg_url`` (tests/conftest.py). A migrated
template is made once per session (a file copied per test on SQLite, a
``CREATE DATABASE ... TEMPLATE`` on PostgreSQL), so a fresh database costs milliseconds.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from cli import main
from storage.db import make_engine, session_factory, upgrade
from storage.home import DB_URL_ENV, HOME_ENV
from storage.intake import CorrectionInput, make_correction
from storage.models import AuditEvent, Checkpoint, Correction, Edit, Metric

MOTHER_TONGUE = "The mother tongue of {} is"


def fact(subject: str, target: str = "English", priority: int = 0, prompt: str = MOTHER_TONGUE) -> CorrectionInput:
    return make_correction(prompt, subject, target, priority=priority)


EARLIER_FACT = fact("Danielle Darrieux", "German")
SUPERSEDING_BATCH = [
    fact("Danielle Darrieux", "English"),
    fact("Toko Yasuda", "piano", prompt="{} plays the"),
    fact("Danielle Darrieux", "Spanish"),
    fact("Toko Yasuda", "drums", prompt="{} plays the"),
    fact("Danielle Darrieux", "Italian"),
]
"""Submitted after ``EARLIER_FACT``: each supersedes the one before it for its fact."""


def superseding_rows(earlier: int, ids: list[int]) -> dict[int, tuple[str, str, int | None]]:
    """(target, status, superseded_by) of every row after ``SUPERSEDING_BATCH``, however it was submitted."""
    return {
        earlier: ("German", "superseded", ids[0]),
        ids[0]: ("English", "superseded", ids[2]),
        ids[1]: ("piano", "superseded", ids[3]),
        ids[2]: ("Spanish", "superseded", ids[4]),
        ids[3]: ("drums", "pending", None),
        ids[4]: ("Italian", "pending", None),
    }


BACKENDS = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


class Databases:
    """Creates and drops throwaway databases on one backend."""

    def __init__(self, backend: str, workdir: Path, pg_url: str | None = None) -> None:
        self.backend = backend
        self.workdir = workdir
        self.pg_url = pg_url
        self._admin: Engine | None = None
        if backend == "postgresql":
            assert pg_url is not None
            self._admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        self.template = self.empty()
        upgrade(self.template)

    def _new_name(self) -> str:
        return f"metake_test_{uuid.uuid4().hex[:12]}"

    def empty(self) -> str:
        """The URL of a database that exists (PostgreSQL) or may be created (SQLite), without schema."""
        name = self._new_name()
        if self._admin is None:
            return f"sqlite:///{self.workdir / name}.sqlite3"
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        return make_url(self.pg_url).set(database=name).render_as_string(hide_password=False)

    def migrated(self) -> str:
        """A new database already at the newest schema revision."""
        name = self._new_name()
        if self._admin is None:
            target = self.workdir / f"{name}.sqlite3"
            shutil.copyfile(make_url(self.template).database, target)
            return f"sqlite:///{target}"
        template = make_url(self.template).database
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        return make_url(self.pg_url).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        if self._admin is None:
            return  # files live under pytest's tmp directory
        with self._admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))

    def close(self) -> None:
        self.drop(self.template)
        if self._admin is not None:
            self._admin.dispose()


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own METAKE_* settings and data home out of the tests."""
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    for name in [n for n in os.environ if n.startswith("METAKE_") and not n.startswith("METAKE_TEST_")]:
        monkeypatch.delenv(name)  # the model name, the audit key file, ...
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(scope="session", params=BACKENDS)
def databases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    pg_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    factory = Databases(request.param, tmp_path_factory.mktemp(f"db-{request.param}"), pg_url)
    yield factory
    factory.close()


@pytest.fixture
def backend(databases: Databases) -> str:
    return databases.backend


@pytest.fixture
def db_url(databases: Databases) -> Iterator[str]:
    url = databases.migrated()
    yield url
    databases.drop(url)


@pytest.fixture
def empty_db_url(databases: Databases) -> Iterator[str]:
    url = databases.empty()
    yield url
    databases.drop(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    store_engine = make_engine(db_url)
    yield store_engine
    store_engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def row_counts(engine: Engine) -> Callable[[], dict[str, int]]:
    """Row counts of every table, to assert that a rejected command wrote nothing."""

    def count() -> dict[str, int]:
        with Session(engine) as session:
            return {
                model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
                for model in (Correction, Edit, Metric, Checkpoint, AuditEvent)
            }

    return count


@pytest.fixture
def metake(db_url: str, tmp_path: Path) -> Callable[..., Result]:
    """Run the CLI in-process against this test's database and a throwaway home."""
    runner = CliRunner()
    home = tmp_path / "home"

    def run(*args: str, input: str | None = None) -> Result:
        return runner.invoke(main, ["--home", str(home), "--db", db_url, *args], input=input)

    return run
