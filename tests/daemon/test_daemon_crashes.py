"""Killing the daemon (SIGKILL) at each named point loses nothing and applies nothing twice.

One home lives through every crash point in turn, each restart recovering from the crash before
it, and ends with the very weights of a run that never crashed.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from daemon_helpers import Metake, base_env
from sqlalchemy import func, select

from daemon.checkpoint_files import read_checkpoint
from storage.audit import verify_chain
from storage.db import make_engine, session_factory, upgrade
from storage.models import AuditEvent, Checkpoint, Correction, Edit, RevertRequest, RevertStatus

FACTS = [
    ("The capital of {} is", "France", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the", "Toko Yasuda", "piano"),
    ("The official language of {} is", "Brazil", "German"),
    ("{} is located in", "The Eiffel Tower", "Rome"),
]
BATCH_POINTS = ["before_apply", "after_apply", "during_checkpoint_write", "after_checkpoint"]


def submit_facts(metake: Metake) -> None:
    for prompt, subject, target in FACTS:
        metake.ok("submit", "--prompt", prompt, "--subject", subject, "--target", target)


def head_weights(sessions, home: Path) -> tuple[int, dict[str, torch.Tensor]]:
    with sessions() as session:
        head = session.scalars(select(Checkpoint).order_by(Checkpoint.id.desc()).limit(1)).one()
    contents = read_checkpoint(home / "checkpoints" / head.path, head.sha256, "head", "cpu")
    return head.id, contents.weights


def checkpoint_weights(sessions, home: Path, checkpoint_id: int) -> dict[str, torch.Tensor]:
    with sessions() as session:
        row = session.get(Checkpoint, checkpoint_id)
    return read_checkpoint(home / "checkpoints" / row.path, row.sha256, "checkpoint", "cpu").weights


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny, tiny_stats) -> dict[str, torch.Tensor]:
    """The weights after applying FACTS one batch each, without any crash."""
    root = tmp_path_factory.mktemp("reference")
    home = root / "home"
    home.mkdir()
    (home / "stats").symlink_to(tiny_stats, target_is_directory=True)
    url = f"sqlite:///{root / 'reference.sqlite3'}"
    upgrade(url)
    metake = Metake(home, url, base_env())
    submit_facts(metake)
    model, hparams = tiny
    metake.ok("apply", "--model", str(model), "--hparams", str(hparams), "--device", "cpu", "--no-progress")
    engine = make_engine(url)
    try:
        return head_weights(session_factory(engine), home)[1]
    finally:
        engine.dispose()


def statuses(sessions) -> dict[int, str]:
    with sessions() as session:
        return {c.id: c.status.value for c in session.scalars(select(Correction).order_by(Correction.id))}


def files_on_disk(home: Path) -> set[str]:
    return {p.relative_to(home / "checkpoints").as_posix() for p in (home / "checkpoints").rglob("*") if p.is_file()}


def test_kill_at_every_point_then_recover(metake, tiny_args, sessions, reference):
    tiny_args = [*tiny_args, "--max-attempts", "10"]  # one correction lives through every crash
    submit_facts(metake)
    metake.ok("apply", "--max", "1", *tiny_args)
    assert statuses(sessions) == {1: "applied", 2: "pending", 3: "pending", 4: "pending", 5: "pending"}
    committed_head = head_weights(sessions, metake.home)

    for attempt, point in enumerate(BATCH_POINTS, start=1):
        crashed = metake.run("apply", *tiny_args, fault=point)
        assert crashed.returncode == -signal.SIGKILL, f"{point}: {crashed.stderr[-2000:]}"
        if attempt > 1:  # this run first recovered from the previous crash
            assert "event=claims_released corrections=2" in crashed.stderr, point
            assert f"event=checkpoint_restored checkpoint={committed_head[0]}" in crashed.stderr, point
        assert statuses(sessions)[2] == "applying", point
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(Checkpoint)) == 2, point
            assert session.scalar(select(func.count()).select_from(Edit)) == 1, point
        leftovers = files_on_disk(metake.home)
        if point == "during_checkpoint_write":
            assert any(name.endswith(".tmp") for name in leftovers), "the half-written file should be left"
        if point == "after_checkpoint":
            assert len([n for n in leftovers if n.endswith(".safetensors")]) == 3, "the uncommitted file is left"
        assert head_weights(sessions, metake.home)[0] == committed_head[0]

    recovered = metake.run("apply", *tiny_args)
    assert recovered.returncode == 0, recovered.stderr
    assert "event=orphan_files_removed" in recovered.stderr
    assert recovered.stdout == "applied 4 correction(s) in 4 batch(es); 0 rejected, 0 failed, 0 to retry\n"
    assert statuses(sessions) == {i: "applied" for i in range(1, 6)}
    with sessions() as session:
        corrections = session.scalars(select(Correction).order_by(Correction.id)).all()
        assert [c.attempts for c in corrections] == [1, 1 + len(BATCH_POINTS), 1, 1, 1]
        assert len({c.edit_id for c in corrections}) == 5  # one edit each, none applied twice
        applied_events = session.scalars(select(AuditEvent.correction_id).where(AuditEvent.kind == "applied")).all()
        assert sorted(applied_events) == [1, 2, 3, 4, 5]
        rows = session.scalars(select(Checkpoint).order_by(Checkpoint.id)).all()
        assert [r.parent_id for r in rows] == [None, 1, 2, 3, 4, 5]
        assert rows[-1].manifest["applied_corrections"] == [1, 2, 3, 4, 5]
        assert files_on_disk(metake.home) == {r.path for r in rows if not r.pruned}
        assert verify_chain(session) is None
    head_id, weights = head_weights(sessions, metake.home)
    assert same_weights(weights, reference), "recovered run differs from the run that never crashed"

    # A revert killed half-way is performed by the next start, exactly once.
    metake.ok("revert", "3")
    crashed = metake.run("apply", *tiny_args, fault="during_revert")
    assert crashed.returncode == -signal.SIGKILL
    with sessions() as session:
        assert session.scalars(select(RevertRequest.status)).one() == RevertStatus.PENDING
    assert statuses(sessions) == {i: "applied" for i in range(1, 6)}
    assert head_weights(sessions, metake.home)[0] == head_id
    recovered = metake.run("apply", *tiny_args)
    assert recovered.returncode == 0, recovered.stderr
    assert "revert(s) performed" in recovered.stdout
    assert statuses(sessions) == {1: "applied", 2: "applied", 3: "reverted", 4: "reverted", 5: "reverted"}
    new_head, weights = head_weights(sessions, metake.home)
    assert same_weights(weights, checkpoint_weights(sessions, metake.home, 3))
    with sessions() as session:
        assert session.get(Checkpoint, new_head).parent_id == 3
        assert verify_chain(session) is None
