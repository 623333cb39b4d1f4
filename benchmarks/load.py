"""The store under load, through the CLI as people use it: a bulk import, concurrent submitters, a reader.

One `metake submit --file` of N_IMPORT records runs while P processes each submit K corrections
one `metake submit` at a time and a reader runs `metake queue` every second. It prints the
import's records per second, the submitters' throughput, every reader call's latency (the worst
must stay under 1 s: readers never wait for writers), and checks that nothing was lost or doubled
and that the audit chain and rows verify. SQLite in a fresh home by default; `--db URL` for
PostgreSQL (an empty database), `--postgres` for a throwaway PostgreSQL server.

    .venv/bin/python benchmarks/load.py --import-records 20000 --processes 8 --per-process 25
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METAKE = [sys.executable, "-m", "cli"]


def run(home: Path, db: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*METAKE, "--home", str(home), *(["--db", db] if db else []), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import-records", type=int, default=20000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--db", default=None)
    parser.add_argument(
        "--postgres", action="store_true", help="A throwaway PostgreSQL (as benchmarks/import_speed.py)."
    )
    args = parser.parse_args(argv)
    if args.postgres:
        from import_speed import postgres_database  # benchmarks/ is this script's folder

        with postgres_database() as url:
            args.db = url
            return measure(args)
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        assert run(home, args.db, "init").returncode == 0
        big = Path(folder) / "import.jsonl"
        with big.open("w") as out:
            for i in range(args.import_records):
                out.write(json.dumps({"prompt": "The capital of {} is", "subject": f"Imported {i}", "target": "Rome"}))
                out.write("\n")
        latencies: list[float] = []
        submit_latencies: list[float] = []
        failures: list[str] = []
        done = threading.Event()

        def reader() -> None:
            while not done.is_set():
                began = time.perf_counter()
                result = run(home, args.db, "queue", "--status", "failed")
                latencies.append(time.perf_counter() - began)
                if result.returncode != 0:
                    failures.append(f"queue: {result.stderr.strip()}")
                done.wait(1.0)

        def submitter(worker: int) -> None:
            for i in range(args.per_process):
                subject = f"Worker {worker} fact {i}"
                began = time.perf_counter()
                result = run(
                    home, args.db, "submit", "--prompt", "{} is located in", "--subject", subject, "--target", "Oslo"
                )
                submit_latencies.append(time.perf_counter() - began)
                if result.returncode != 0:
                    failures.append(f"submit: {result.stderr.strip()}")

        baseline = time.perf_counter()
        run(home, args.db, "queue", "--status", "failed")
        startup = time.perf_counter() - baseline
        polling = threading.Thread(target=reader)
        polling.start()
        began = time.perf_counter()
        importer = subprocess.Popen(
            [*METAKE, "--home", str(home), *(["--db", args.db] if args.db else []), "submit", "--file", str(big)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        workers = [threading.Thread(target=submitter, args=(w,)) for w in range(args.processes)]
        for worker in workers:
            worker.start()
        _, import_err = importer.communicate()
        import_seconds = time.perf_counter() - began
        for worker in workers:
            worker.join()
        submit_seconds = time.perf_counter() - began
        done.set()
        polling.join()
        if importer.returncode != 0:
            failures.append(f"import: {import_err.strip()}")
        listed = run(home, args.db, "queue", "--json")
        rows = json.loads(listed.stdout) if listed.returncode == 0 else []
        subjects = [r["subject"] for r in rows]
        verified = run(home, args.db, "audit", "verify")
    expected = args.import_records + args.processes * args.per_process
    print(f"backend: {'sqlite' if not args.db else args.db.split(':', 1)[0]}, {os.cpu_count()} CPUs")
    print(
        f"import of {args.import_records} records: {import_seconds:.1f} s "
        f"({args.import_records / import_seconds:,.0f}/s)"
    )
    print(
        f"{args.processes} submitters x {args.per_process}: {submit_seconds:.1f} s "
        f"({args.processes * args.per_process / submit_seconds:.1f} corrections/s; "
        f"one CLI start {startup:.2f} s idle); "
        f"a submit took median {statistics.median(submit_latencies):.2f} s, worst {max(submit_latencies):.2f} s"
    )
    print(
        f"reader: {len(latencies)} calls, median {statistics.median(latencies):.2f} s, worst {max(latencies):.2f} s"
        if latencies
        else "reader: no call finished"
    )
    print(f"queued: {len(rows)} of {expected} expected, {len(subjects) - len(set(subjects))} doubled")
    print(f"audit verify: {verified.stdout.strip() or verified.stderr.strip()}")
    for failure in failures[:5]:
        print(f"failure: {failure}")
    return 0 if not failures and len(rows) == expected and verified.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
