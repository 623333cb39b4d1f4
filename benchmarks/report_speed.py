"""Seconds for `metake report` on a home with thousands of applied corrections (SQLite).

The home is built in bulk, not by editing a model: N CounterFact corrections submitted through
the queue, then one edit per correction (with its P(target)/P(original) before and after, its
realised gain and five layers' weight change), one checkpoint per edit, and a health check every
10 edits, all as the daemon would record them. Then the report is timed end to end through the
CLI (`metake report`), reading the database and drawing every figure.

    .venv/bin/python benchmarks/report_speed.py --data ../shared/data/counterfact/easyedit_counterfact-train.json \\
        --n 10000
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner

from cli import main
from storage.audit import NewEvent, append_events
from storage.db import make_engine, session_factory, upgrade
from storage.intake import read_corrections_file
from storage.models import Checkpoint, Correction, CorrectionStatus, Edit, Metric, Phase
from storage.queue import submit_many


def build_home(home: Path, data: Path, n: int) -> None:
    corrections = [c for _, c in read_corrections_file(data).corrections[:n]]
    url = f"sqlite:///{home / 'metake.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        ids = submit_many(session, corrections, "bench")
    rng = random.Random(0)
    start = datetime.now(UTC) - timedelta(hours=len(ids))
    with sessions.begin() as session:
        parent = Checkpoint(path="m/0.safetensors", sha256="0" * 64, size_bytes=65_000_000, base_model="m")
        parent.manifest = {"kind": "base"}
        session.add(parent)
        session.flush()
        health: list[NewEvent] = []
        for i, correction_id in enumerate(ids):
            at = start + timedelta(hours=i)
            checkpoint = Checkpoint(
                path=f"m/{i + 1}.safetensors",
                sha256=f"{i + 1:064x}",
                size_bytes=65_000_000,
                base_model="m",
                parent_id=parent.id,
                created_at=at,
                manifest={"kind": "edit"},
            )
            session.add(checkpoint)
            session.flush()
            edit = Edit(
                method="metake",
                model="m",
                started_at=at,
                finished_at=at,
                checkpoint_before_id=parent.id,
                checkpoint_after_id=checkpoint.id,
            )
            session.add(edit)
            session.flush()
            values = [
                ("target_prob", Phase.PRE, rng.random() * 0.1),
                ("target_prob", Phase.POST, 0.5 + rng.random() / 2),
                ("original_prob", Phase.PRE, rng.random()),
                ("original_prob", Phase.POST, rng.random() * 0.1),
                ("realised_gain", Phase.POST, rng.random()),
            ]
            rows = [
                Metric(edit_id=edit.id, correction_id=correction_id, name=name, phase=phase, value=value)
                for name, phase, value in values
            ]
            rows += [
                Metric(
                    edit_id=edit.id,
                    name=f"relative_weight_change.layer{layer}",
                    phase=Phase.POST,
                    value=rng.random() * 0.05,
                )
                for layer in range(4, 9)
            ]
            session.add_all(rows)
            row = session.get(Correction, correction_id)
            assert row is not None
            row.status, row.edit_id = CorrectionStatus.APPLIED, edit.id
            if i % 10 == 9:
                payload = {
                    "retention": 0.9 + rng.random() / 10,
                    "perplexity_ratio": 1 + i / len(ids) / 10,
                    "tested": 20,
                }
                health.append(NewEvent("health_checked", "bench", edit_id=edit.id, payload=payload))
            parent = checkpoint
        session.flush()
        append_events(session, health)
    engine.dispose()


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        home.mkdir()
        began = time.perf_counter()
        build_home(home, args.data, args.n)
        print(f"built a home with {args.n} applied corrections in {time.perf_counter() - began:.1f} s")
        out = Path(folder) / "report.html"
        for attempt in (1, 2):
            began = time.perf_counter()
            result = CliRunner().invoke(main, ["--home", str(home), "report", "--out", str(out)])
            assert result.exit_code == 0, result.output
            print(f"report {attempt}: {time.perf_counter() - began:.2f} s; {result.stdout.strip()}")


if __name__ == "__main__":
    main_()
