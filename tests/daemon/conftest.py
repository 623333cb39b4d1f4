"""Fixtures for the daemon tests: databases on each backend, a tiny model, and running ``metake``.

Subprocess runs get ``OMP_NUM_THREADS=1``: the tiny model's matrices are far too small to gain
from threads, and on a busy 2-core machine OpenMP's thread hand-offs cost more than the maths.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from tiny_model import build_tiny_llama

from storage.db import make_engine, session_factory, upgrade
from storage.home import DB_URL_ENV, HOME_ENV

PG_URL = os.environ.get("METAKE_TEST_PG_URL") or None
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=[pytest.mark.postgres, pytest.mark.skipif(PG_URL is None, reason="METAKE_TEST_PG_URL is not set")],
    ),
]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own METAKE_* settings and data home out of the tests."""
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    monkeypatch.delenv("METAKE_FAULT_AT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the newest schema, on SQLite and (when configured) PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'metake.sqlite3'}"
        upgrade(url)
        yield url
        return
    assert PG_URL is not None
    name = f"metake_daemon_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny Llama directory, its hyperparameter TOML with statistics from a small corpus)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_stats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A statistics cache shared by the tests' homes, so C0 of the tiny model is computed once."""
    return tmp_path_factory.mktemp("tiny-stats")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process tiny-model tests: one torch thread (see the module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Metake:
    """Runs ``python -m cli`` against one home and database, in subprocesses."""

    home: Path
    db_url: str
    env: dict[str, str]

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cli", "--home", str(self.home), "--db", self.db_url, *args]

    def run(self, *args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if fault is not None:
            env["METAKE_FAULT_AT"] = fault
        return subprocess.run(self.args(*args), env=env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 300) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"metake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start(self, *args: str, log: Path) -> subprocess.Popen[str]:
        """Start a long-running command with stderr (the event log) going to ``log``."""
        handle = open(log, "w")  # noqa: SIM115 - closed by the child's exit; the test reads the file
        return subprocess.Popen(self.args(*args), env=self.env, stdout=subprocess.DEVNULL, stderr=handle, text=True)


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAKE_") or k == "METAKE_TEST_CACHE"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | (extra or {})


@pytest.fixture
def metake(tmp_path: Path, db_url: str, tiny_stats: Path) -> Metake:
    """``metake`` on a fresh home whose statistics cache is shared across tests."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "stats").symlink_to(tiny_stats, target_is_directory=True)
    return Metake(home, db_url, base_env())


@pytest.fixture
def tiny_args(tiny: tuple[Path, Path]) -> list[str]:
    """Model options that make the daemon edit the tiny model on the CPU."""
    model, hparams = tiny
    return ["--model", str(model), "--hparams", str(hparams), "--device", "cpu", "--no-progress"]


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def log_has(log: Path, *needles: str) -> bool:
    text = log.read_text() if log.exists() else ""
    return any(all(n in line for n in needles) for line in text.splitlines())
