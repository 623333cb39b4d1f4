"""The README's first command: real corrections applied to the real model by the real daemon.

The demo works in a home of its own, marked as such, so running it again starts from a clean
database without ever touching a home that holds someone's real corrections. Cached models and
statistics in it are kept, so a second run skips the slow first-time work.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from pathlib import Path

import click

from daemon.demo_facts import DEMO_RECORDS
from daemon.runner import Daemon
from daemon.service import apply_pending
from daemon.settings import DaemonSettings
from daemon.stopping import StopControl
from storage.audit import event_count, verify_chain
from storage.checkpoints import all_checkpoints
from storage.context import StoreContext
from storage.errors import InvalidInput
from storage.home import DB_FILENAME, DataHome
from storage.intake import correction_from_record
from storage.models import Phase
from storage.queries import all_corrections, all_metrics
from storage.queue import submit_many

MARKER = ".metake-demo"
SUBMITTER = "demo"


def prepare_home(root: Path) -> DataHome:
    """A demo home with an empty database; refuses a folder that is someone's real home."""
    home = DataHome(root)
    marker = root / MARKER
    if home.db_path.exists() and not marker.exists():
        raise InvalidInput(f"{root} holds a metake database the demo did not create; give the demo another --home")
    for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(home.checkpoints_dir, ignore_errors=True)
    home.create()
    marker.write_text("This folder is metake's demo home; `metake demo` empties its database on every run.\n")
    return home


def run_demo(root: Path, settings: DaemonSettings, logger: logging.Logger, stop: StopControl) -> None:
    home = prepare_home(root)
    store = StoreContext(home=home, db_url=home.sqlite_url())
    try:
        store.initialise()
        corrections = [correction_from_record(dict(record)) for record in DEMO_RECORDS]
        with store.sessions().begin() as session:
            ids = submit_many(session, corrections, SUBMITTER)
        click.echo(f"demo home: {root}")
        click.echo(f"submitted {len(ids)} CounterFact corrections; the daemon applies them one batch each")
        click.echo("(the first run converts the model and computes its statistics: minutes on a CPU)\n")
        runner = Daemon(store, settings, logger, stop)
        apply_pending(runner)
        print_results(store)
        click.echo("\nexplore it further:")
        where = f"metake --home {root}"
        click.echo(f"  {where} history --json          # every correction with its metrics")
        click.echo(f"  {where} checkpoints             # the checkpoint chain")
        click.echo(f"  {where} revert 2 && {where} apply   # back to the state after the first correction")
        click.echo(f"  {where} export --out edited-model   # a Hugging Face directory with the edits")
    finally:
        store.close()


def print_results(store: StoreContext) -> None:
    """A table of each correction before and after its edit, the health check, and the audit check."""
    with store.sessions().begin() as session:
        corrections = all_corrections(session)
        metrics = all_metrics(session)
        checkpoints = all_checkpoints(session)
        broken = verify_chain(session)
        events = event_count(session)
    values: dict[int | None, dict[tuple[str, Phase], float]] = defaultdict(dict)
    batch: dict[tuple[str, Phase], float] = {}
    for metric in metrics:
        if metric.name.startswith("health.") and metric.correction_id is None:
            batch[(metric.name, metric.phase)] = metric.value
        elif not metric.name.startswith("health."):
            values[metric.correction_id][(metric.name, metric.phase)] = metric.value
    click.echo("")
    click.echo(
        f"{'id':>2}  {'status':8}  {'prompt':44}  {'new':10}  {'old':10}  {'P(new) before → after':>21}  "
        f"{'P(old) after':>12}  {'paraphrase new>old':>18}  {'neighbour kept':>14}"
    )
    for c in corrections:
        own = values.get(c.id, {})
        change = f"{_prob(own.get(('target_prob', Phase.PRE)))} → {_prob(own.get(('target_prob', Phase.POST)))}"
        click.echo(
            f"{c.id:>2}  {c.status.value:8}  {_cut(c.filled_prompt(), 44):44}  {_cut(c.target, 10):10}  "
            f"{_cut(c.original_answer or '-', 10):10}  {change:>21}  "
            f"{_prob(own.get(('original_prob', Phase.POST))):>12}  "
            f"{_prob(own.get(('paraphrase_efficacy', Phase.POST))):>18}  "
            f"{_prob(own.get(('neighbor_kept', Phase.POST))):>14}"
        )
    retention = batch.get(("health.retention", Phase.POST))
    base = batch.get(("health.perplexity", Phase.PRE))
    now = batch.get(("health.perplexity", Phase.POST))
    if retention is not None or now is not None:
        parts = []
        if retention is not None:
            parts.append(f"earlier corrections still hold: {retention:.0%}")
        if base is not None and now is not None:
            parts.append(f"perplexity on the drift sample {base:.2f} → {now:.2f}")
        click.echo("health check: " + "; ".join(parts))
    click.echo(f"checkpoints: {len(checkpoints)} ({', '.join(_size(c.size_bytes) for c in checkpoints)})")
    click.echo(
        f"audit chain: {'verified' if broken is None else 'BROKEN at event ' + str(broken.event_id)}, {events} events"
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _prob(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.0f} MB"
