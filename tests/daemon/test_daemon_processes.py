"""Long-running daemons in subprocesses: one writer per model, takeover, schedules, SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from daemon_helpers import Metake, log_has, wait_for
from sqlalchemy import select

from daemon.lease import live_holder
from storage.audit import verify_chain
from storage.audit_rows import verify_rows
from storage.models import AuditEvent, Checkpoint, Correction, Edit

FACTS = [
    ("The capital of {} is", "France", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} plays the", "Toko Yasuda", "piano"),
    ("The official language of {} is", "Brazil", "German"),
]
START_S = 180  # a cold start (imports, model, statistics) on a busy 2-core machine


def submit(metake: Metake, facts) -> None:
    for prompt, subject, target in facts:
        metake.ok("submit", "--prompt", prompt, "--subject", subject, "--target", target)


def statuses(sessions) -> dict[int, str]:
    with sessions() as session:
        return {c.id: c.status.value for c in session.scalars(select(Correction).order_by(Correction.id))}


def all_applied(sessions, n: int) -> bool:
    found = statuses(sessions)
    return len(found) == n and set(found.values()) == {"applied"}


def worker_of(log: Path) -> str:
    match = re.search(r"event=lease_acquired worker=(\S+)", log.read_text())
    assert match, log.read_text()[-2000:]
    return match.group(1)


def stop(process: subprocess.Popen[str], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert log_has(log, "event=daemon_stopped")


def test_two_daemons_one_applies_and_the_other_takes_over_when_it_dies(metake, tiny_args, sessions, tmp_path):
    submit(metake, FACTS[:2])
    daemon_args = ("daemon", "--interval", "0.5", "--lease-seconds", "6", *tiny_args)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    first = metake.start(*daemon_args, log=log_a)
    second = None
    try:
        wait_for(lambda: log_has(log_a, "event=lease_acquired"), START_S, "the first daemon to take the lease")
        second = metake.start(*daemon_args, log=log_b)
        wait_for(lambda: log_has(log_b, "event=standing_by"), START_S, "the second daemon to stand by")
        wait_for(lambda: all_applied(sessions, 2), 120, "the first daemon to apply the queue")
        refused = metake.run("apply", *tiny_args)
        assert refused.returncode == 1
        assert re.fullmatch(
            r"Error: model 'default' is being edited by daemon@\S+ \(renewed .*\); stop that "
            r"daemon or wait\n",
            refused.stderr.splitlines()[-1] + "\n",
        ), refused.stderr
        a_worker = worker_of(log_a)
        with sessions() as session:
            assert {c.claimed_by for c in session.scalars(select(Correction))} == {a_worker}
        assert not log_has(log_b, "event=batch_claimed")

        first.kill()  # kill -9: no chance to release the lease
        first.wait(timeout=30)
        submit(metake, FACTS[2:])
        wait_for(lambda: log_has(log_b, "event=lease_acquired"), 60, "the second daemon to take over")
        wait_for(lambda: all_applied(sessions, 4), 120, "the second daemon to apply the rest")
        b_worker = worker_of(log_b)
        with sessions() as session:
            claimed = [c.claimed_by for c in session.scalars(select(Correction).order_by(Correction.id))]
            assert claimed == [a_worker, a_worker, b_worker, b_worker]
            leases = session.scalars(select(AuditEvent).where(AuditEvent.kind == "lease_acquired")).all()
            assert [(e.actor, e.payload["reason"]) for e in leases] == [
                (a_worker, "first"),
                (b_worker, "holder process gone"),
            ]
            edits = session.scalars(select(Edit).order_by(Edit.id)).all()
            assert [e.checkpoint_before_id for e in edits] == [1, 2, 3, 4]  # b continued from a's last checkpoint
        stop(second, log_b)
        with sessions() as session:
            assert live_holder(session, leases[0].payload["model"], "someone else") is None  # released on exit
            assert verify_chain(session) is None
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_scheduled_daemon_applies_what_is_pending_at_the_fire_time(metake, tiny_args, sessions, tmp_path):
    submit(metake, FACTS[:2])
    log = tmp_path / "scheduled.log"
    process = metake.start("daemon", "--schedule", "*/10 * * * * *", "--timezone", "UTC", *tiny_args, log=log)
    try:
        wait_for(lambda: log_has(log, "event=sleeping"), START_S, "the daemon to start and sleep")
        fire = datetime.fromisoformat(re.search(r"event=sleeping until=(\S+)", log.read_text()).group(1))
        if (fire - datetime.now(UTC)).total_seconds() > 1:
            assert set(statuses(sessions).values()) == {"pending"}, "nothing is applied before the fire time"
        wait_for(lambda: all_applied(sessions, 2), 120, "the scheduled run")
        with sessions() as session:
            started = session.scalars(select(Edit.started_at)).all()
        assert len(started) == 2 and min(started) >= fire
        stop(process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigterm_finishes_the_batch_in_flight_and_exits_zero(metake, tiny_args, sessions, tmp_path):
    submit(metake, FACTS)
    log = tmp_path / "daemon.log"
    process = metake.start("daemon", "--interval", "0.5", *tiny_args, log=log)
    try:
        wait_for(lambda: log_has(log, "event=batch_claimed"), START_S, "the first batch")
        stop(process, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    found = statuses(sessions)
    assert "applying" not in found.values()
    assert found[1] == "applied"
    with sessions() as session:
        assert verify_chain(session) is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_models_on_one_database_each_daemon_applies_only_its_own(metake, tiny, tiny_gpt2, sessions, tmp_path):
    model_args = {"llama-bot": tiny[0], "gpt-bot": tiny_gpt2}
    for name, facts in (("llama-bot", FACTS[:2]), ("gpt-bot", FACTS[2:])):
        for prompt, subject, target in facts:
            metake.ok("submit", "--model", name, "--prompt", prompt, "--subject", subject, "--target", target)
    common = ("--hparams", str(tiny[1]), "--device", "cpu", "--no-progress", "--interval", "0.5")
    logs = {name: tmp_path / f"{name}.log" for name in model_args}
    processes = {
        name: metake.start("daemon", "--name", name, "--model", str(path), *common, log=logs[name])
        for name, path in model_args.items()
    }
    try:
        for name in model_args:  # both hold a lease at once: leases are per model
            wait_for(lambda n=name: log_has(logs[n], "event=lease_acquired"), START_S, f"{name}'s lease")
        wait_for(lambda: all_applied(sessions, 4), 180, "both daemons to apply their own corrections")
        workers = {name: worker_of(logs[name]) for name in model_args}
        with sessions() as session:
            rows = session.scalars(select(Correction).order_by(Correction.id)).all()
            assert [(c.model, c.claimed_by) for c in rows] == [
                ("llama-bot", workers["llama-bot"]),
                ("llama-bot", workers["llama-bot"]),
                ("gpt-bot", workers["gpt-bot"]),
                ("gpt-bot", workers["gpt-bot"]),
            ]
            chains = {}
            for checkpoint in session.scalars(select(Checkpoint).order_by(Checkpoint.id)):
                chains.setdefault(checkpoint.model, []).append(checkpoint)
            assert sorted(chains) == ["gpt-bot", "llama-bot"]
            for name, chain in chains.items():  # a base checkpoint and one per applied correction
                assert [c.manifest["kind"] for c in chain].count("base") == 1 and len(chain) == 3
                assert len({c.base_model for c in chain}) == 1 and chain[0].path.startswith(f"{name}/")
                assert all(c.parent_id in (None, *(p.id for p in chain)) for c in chain)
            assert chains["gpt-bot"][0].base_model != chains["llama-bot"][0].base_model
            assert verify_chain(session) is None and verify_rows(session).mismatch is None
        status = json.loads(metake.ok("status", "--json"))
        assert sorted((m["name"], m["edits"], bool(m["lease"])) for m in status["models"]) == [
            ("gpt-bot", 2, True),
            ("llama-bot", 2, True),
        ]
        only = json.loads(metake.ok("history", "--model", "gpt-bot", "--json"))
        assert [(c["id"], c["model"]) for c in only] == [(3, "gpt-bot"), (4, "gpt-bot")]
        stop(processes["llama-bot"], logs["llama-bot"])
        wrong = metake.run("apply", "--name", "llama-bot", "--model", str(tiny_gpt2), *common[:-2])
        assert wrong.returncode == 1
        assert wrong.stderr.splitlines()[-1].startswith("Error: model 'llama-bot' was made from base model sha256:")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
