"""How much the daemon adds to the edits it makes, and how fast it reverts and starts up.

Runs the real daemon code in this process on a throwaway home (or --home), on the default model
unless told otherwise: submits the embedded CounterFact corrections, applies them one batch each,
reverts to the checkpoint after the first, and starts a second daemon from the last checkpoint.
Prints, per batch, the daemon's own time (claim, checkpoint, commit) as a share of the engine's
edit time, the checkpoint size, the time to revert and the time to start up. The pre/post metrics
(prompt, paraphrases, neighbours) are scored in the engine's own before/after passes, so they
are part of the edit time; their seconds are printed beside the overhead (``metrics_in_edit``).

    python benchmarks/daemon_overhead.py [--home DIR] [--hparams FILE] [--device cpu] [--batch-size 1]

The first run on a fresh home also converts the model and computes its statistics (minutes on a
CPU); those one-time costs are reported separately and are not counted as overhead.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.demo_facts import DEMO_RECORDS
from daemon.logs import configure_logging
from daemon.runner import BatchReport, Daemon
from daemon.service import run_pass
from daemon.settings import DaemonSettings, HealthSettings
from storage.context import StoreContext
from storage.home import DataHome
from storage.intake import correction_from_record
from storage.models import Checkpoint
from storage.queue import submit_many
from storage.reverts import request_revert

OVERHEAD_PHASES = ("claim", "checkpoint", "commit")
SHOWN_PHASES = (*OVERHEAD_PHASES, "metrics_in_edit")
TARGET_SHARE = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="data home to use (its model and statistics caches are reused)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--hparams", type=Path, help="hyperparameter TOML [default: the engine's defaults]")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=1, help="corrections per edit (3 are submitted)")
    return parser.parse_args()


def fresh_store(home: DataHome) -> StoreContext:
    """A new SQLite database (and no checkpoints) in ``home``, keeping its model caches."""
    for name in ("metake.sqlite3", "metake.sqlite3-wal", "metake.sqlite3-shm"):
        (home.root / name).unlink(missing_ok=True)
    for path in sorted(home.checkpoints_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    store = StoreContext(home=home, db_url=home.sqlite_url())
    store.initialise()
    return store


def overhead(batch: BatchReport) -> float:
    return sum(batch.seconds.get(phase, 0.0) for phase in OVERHEAD_PHASES)


def main() -> None:
    args = parse_args()
    root = args.home or Path(tempfile.mkdtemp(prefix="metake-bench-"))
    home = DataHome(root)
    home.create()
    store = fresh_store(home)
    settings = DaemonSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        hparams_file=args.hparams,
        batch_size=args.batch_size,
        health=HealthSettings(every=0),
    )
    log = io.StringIO()
    logger = configure_logging("text", stream=log)
    records = [correction_from_record(dict(r)) for r in DEMO_RECORDS]
    with store.sessions().begin() as session:
        submit_many(session, records, "benchmark")

    daemon = Daemon(store, settings, logger, progress=False)
    started = time.perf_counter()
    daemon.load()
    daemon.open()
    first_open = time.perf_counter() - started
    with daemon.holding_lease():
        report = run_pass(daemon)
        with store.sessions()() as session:
            rows = list(session.query(Checkpoint).order_by(Checkpoint.id))
        with store.sessions().begin() as session:
            request_revert(session, rows[-2].id, "benchmark")
        started = time.perf_counter()
        reverts = run_pass(daemon).reverts
        revert_pass = time.perf_counter() - started
    loaded = daemon.model.loaded
    print(f"model: {loaded.source} ({loaded.identity[:19]}…) on {loaded.device}, {loaded.dtype}")
    print(f"method: {daemon.model.hparams.method}, layers {list(daemon.model.hparams.layers)}")
    print(f"load + editor (first time on this home includes conversion and statistics): {first_open:.1f} s\n")

    print(f"{'batch':>5}  {'edit s':>8}  {'overhead s':>10}  {'share':>6}  " + "  ".join(SHOWN_PHASES))
    shares = []
    for number, batch in enumerate(report.batches, start=1):
        spent = overhead(batch)
        share = spent / batch.seconds["edit"]
        shares.append(share)
        phases = "  ".join(f"{batch.seconds.get(p, 0.0):.3f}" for p in SHOWN_PHASES)
        print(f"{number:>5}  {batch.seconds['edit']:>8.2f}  {spent:>10.3f}  {share:>6.1%}  {phases}")
    mean_share = statistics.mean(shares)
    verdict = "meets" if mean_share < TARGET_SHARE else "misses"
    print(f"mean overhead: {mean_share:.1%} of the edit time ({verdict} the {TARGET_SHARE:.0%} target)")

    sizes = {row.size_bytes for row in rows}
    print(f"checkpoint size: {', '.join(f'{s / 1e6:.1f} MB' for s in sorted(sizes))} ({len(rows)} checkpoints)")
    print(f"revert to checkpoint {rows[-2].id}: {reverts[0].seconds:.2f} s (the whole pass: {revert_pass:.2f} s)")

    again = Daemon(store, settings, logger, progress=False)
    started = time.perf_counter()
    again.load()
    again.open()
    opened = time.perf_counter() - started
    with again.holding_lease():
        ready = time.perf_counter() - started
    print(
        f"start-up from the last checkpoint, in process: {ready:.2f} s (model and editor {opened:.2f} s, "
        f"lease, recovery and checkpoint restore {ready - opened:.2f} s)"
    )

    command = [sys.executable, "-m", "cli", "--home", str(root), "apply", "--model", args.model, "--dtype", args.dtype]
    command += ["--health-every", "0", "--no-progress"]
    command += [] if args.hparams is None else ["--hparams", str(args.hparams)]
    command += [] if args.device is None else ["--device", args.device]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    print(f"start-up from the last checkpoint, `metake apply` on an empty queue: {time.perf_counter() - started:.2f} s")
    store.close()


if __name__ == "__main__":
    main()
