"""Fixtures for the daemon tests: databases on each backend, a tiny model, and running ``metake``.

Subprocess runs get ``OMP_NUM_THREADS=1``: the tiny model's matrices are far too small to gain
from threads, and on a busy 2-core machine OpenMP's thread hand-offs cost more than the maths.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from daemon_helpers import Metake, base_env
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from tiny_models import save_tiny_model, write_corpus, write_hparams

from storage.db import make_engine, session_factory, upgrade
from storage.home import DB_URL_ENV, HOME_ENV

BACKENDS = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's own METAKE_* settings and data home out of the tests."""
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    for name in [n for n in os.environ if n.startswith("METAKE_") and not n.startswith("METAKE_TEST_")]:
        monkeypatch.delenv(name)  # the model name, the audit key file, ...
    monkeypatch.delenv("METAKE_FAULT_AT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the newest schema, on SQLite and on the session's PostgreSQL (``pg_url``)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'metake.sqlite3'}"
        upgrade(url)
        yield url
        return
    pg_url = request.getfixturevalue("pg_url")
    name = f"metake_daemon_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
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
    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus.txt")
    return save_tiny_model("llama", root / "tiny-llama"), write_hparams(root / "tiny.toml", corpus)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 directory: a second, different model for the several-models tests."""
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2") / "tiny-gpt2")


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
