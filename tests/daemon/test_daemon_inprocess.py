"""The daemon in this process on the tiny model: reverts, retention, health checks, refusals, stopping."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from daemon.checkpoint_files import read_checkpoint
from daemon.drift_sample import sample_sha256
from daemon.logs import configure_logging
from daemon.runner import Daemon, DaemonError
from daemon.service import apply_pending, run_pass
from daemon.settings import DaemonSettings, HealthSettings, Retention
from daemon.stopping import Abandon, StopControl
from engine.files import model_key
from storage.audit import verify_chain
from storage.context import StoreContext
from storage.home import DataHome
from storage.imports import stage_chunk, start_import
from storage.intake import make_correction
from storage.models import AuditEvent, Checkpoint, Correction, CorrectionStatus, Import, Metric, Phase
from storage.queue import submit
from storage.reverts import RevertRefused, request_revert

FACTS = [
    ("The capital of {} is", "France", "Rome", "Paris"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
    ("{} plays the", "Toko Yasuda", "piano", "guitar"),
    ("The official language of {} is", "Brazil", "German", "Portuguese"),
]


@pytest.fixture
def store(tmp_path: Path, db_url: str, tiny_stats: Path) -> StoreContext:
    home = DataHome(tmp_path / "home")
    home.create()
    home.stats_dir.rmdir()
    home.stats_dir.symlink_to(tiny_stats, target_is_directory=True)
    context = StoreContext(home=home, db_url=db_url)
    yield context
    context.close()


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


def make_daemon(store: StoreContext, tiny, log: io.StringIO, stop: StopControl | None = None, **changes) -> Daemon:
    model, hparams = tiny
    options = {"model": str(model), "hparams_file": hparams, "device": "cpu", "health": HealthSettings(every=0)}
    settings = DaemonSettings(**(options | changes))
    return Daemon(store, settings, configure_logging("text", stream=log), stop, progress=False)


def submit_facts(store: StoreContext, facts=FACTS) -> None:
    with store.sessions().begin() as session:
        for prompt, subject, target, original in facts:
            submit(session, make_correction(prompt, subject, target, original_answer=original), "alice")


def statuses(store: StoreContext) -> dict[int, str]:
    with store.sessions()() as session:
        return {c.id: c.status.value for c in session.scalars(select(Correction).order_by(Correction.id))}


def contents(store: StoreContext, checkpoint_id: int):
    with store.sessions()() as session:
        row = session.get(Checkpoint, checkpoint_id)
    return read_checkpoint(store.home.checkpoints_dir / row.path, row.sha256, "test", "cpu")


def test_revert_restores_weights_and_state_exactly_and_marks_later_corrections(store, tiny, log, one_thread):
    submit_facts(store)
    daemon = make_daemon(store, tiny, log, retention=Retention(keep_last=3, keep_every=0))
    report = apply_pending(daemon)
    assert [b.checkpoint_id for b in report.batches] == [2, 3, 4, 5]
    with store.sessions().begin() as session:
        pruned = {c.id for c in session.scalars(select(Checkpoint).where(Checkpoint.pruned))}
        assert pruned == {2}  # kept: the first (1) and the newest three (3, 4, 5)
        with pytest.raises(RevertRefused, match="checkpoint 2 was pruned by the retention setting"):
            request_revert(session, 2, "alice")
    assert not any(p.name.endswith(".tmp") for p in store.home.checkpoints_dir.rglob("*"))
    with store.sessions().begin() as session:
        request_revert(session, 4, "alice")
    report = apply_pending(daemon)
    assert [(r.restored_checkpoint, r.new_checkpoint, r.reverted) for r in report.reverts] == [(4, 6, [4])]
    assert statuses(store) == {1: "applied", 2: "applied", 3: "applied", 4: "reverted"}
    restored, now = contents(store, 4), contents(store, 6)
    assert all(torch.equal(restored.weights[k], now.weights[k]) for k in restored.weights)
    assert now.state.equals(restored.state) and now.state.steps == 3
    live = daemon.model.editor.edited_weights()
    assert all(torch.equal(live[k], now.weights[k]) for k in live)
    with store.sessions().begin() as session:
        head = session.get(Checkpoint, 6)
        assert head.parent_id == 4 and head.manifest["reverted_from"] == 5
        assert head.manifest["applied_corrections"] == [1, 2, 3]
        kinds = [e.kind for e in session.scalars(select(AuditEvent).where(AuditEvent.checkpoint_id == 6))]
        assert kinds == ["checkpoint_written", "reverted", "reverted"]
        assert verify_chain(session) is None
    # the reverted correction can be submitted again and is applied on top of the restored state
    submit_facts(store, FACTS[3:])
    report = apply_pending(daemon)
    assert [len(b.applied) for b in report.batches] == [1]
    assert statuses(store)[5] == "applied"


def test_rehearsal_queues_again_what_a_health_check_finds_unsaid_and_stops_at_its_bound(
    store, tiny, log, one_thread, monkeypatch
):
    """``--rehearse``: each check queues the re-tested corrections the model no longer says as
    new corrections (``rehearsal 1 of #id``), which the daemon then applies like any other; a fact
    with a copy pending or applied since is not queued twice, nor a copy past ``max_rehearsals``.
    The tiny model says nothing, so a scripted check finds every correction unsaid."""
    import daemon.health

    monkeypatch.setattr(daemon.health, "says_answer", lambda text, answer: False)
    submit_facts(store)
    health = HealthSettings(every=2, sample_size=5, rehearse=True, max_rehearsals=1)
    daemon = make_daemon(store, tiny, log, health=health)
    gauge = []  # what /metrics serves after each batch: the newest check's rehearsals
    daemon.load()
    daemon.open()
    with daemon.holding_lease():
        while daemon.apply_batch(1) is not None:
            gauge.append(daemon.monitor.registry.get_sample_value("metake_health_rehearsed"))
    assert gauge == [0, 1, 1, 2, 2, 1, 1, 0]  # 8 batches: the 4 corrections, then a copy of each
    with store.sessions().begin() as session:
        rows = session.scalars(select(Correction).order_by(Correction.id)).all()
        assert [(c.source, c.subject, c.status) for c in rows[4:]] == [
            (f"rehearsal 1 of #{i}", rows[i - 1].subject, CorrectionStatus.APPLIED) for i in (1, 2, 3, 4)
        ]
        checks = session.scalars(select(AuditEvent).where(AuditEvent.kind == "health_checked")).all()
        assert [e.payload["rehearsed"] for e in checks] == [[[1, 5]], [[2, 6], [3, 7]], [[4, 8]], []]
        assert verify_chain(session) is None
    assert "event=rehearsal_queued corrections=2,3 queued=6,7" in log.getvalue()


def test_health_checks_store_retention_and_drift_and_warn(store, tiny, log, one_thread):
    submit_facts(store)
    daemon = make_daemon(
        store, tiny, log, health=HealthSettings(every=2, sample_size=5, retention_warning=0.99, room_warning=0.1)
    )
    report = apply_pending(daemon)
    checked = [b.edit_id for b in report.batches if "health" in b.seconds]
    assert checked == [2, 4]
    with store.sessions().begin() as session:
        rows = session.scalars(select(Metric).where(Metric.name.like("health.%"), Metric.edit_id == 4)).all()
        names = {(m.name, m.phase, m.correction_id is None) for m in rows}
        assert ("health.retention", Phase.POST, True) in names
        assert ("health.gen_retention", Phase.POST, True) in names  # says it, not only prefers it
        assert ("health.perplexity", Phase.PRE, True) in names and ("health.perplexity", Phase.POST, True) in names
        assert {m.correction_id for m in rows if m.name == "health.holds"} == {1, 2, 3}
        event = session.scalars(select(AuditEvent).where(AuditEvent.kind == "health_checked")).all()[-1]
        assert event.edit_id == 4 and event.payload["tested"] == 3
        says = {m.correction_id: m.value for m in rows if m.name == "health.says_target"}
        assert set(says) == {1, 2, 3} and event.payload["gen_retention"] == sum(says.values()) / 3
        room = {m.name: m.value for m in rows if m.name.startswith("health.room_used.")}
        layers = daemon.model.editor.hparams.layers
        assert set(room) == {f"health.room_used.layer{layer}" for layer in layers}
        kept = {f"health.room_used.layer{n}": p.kept for n, p in daemon.model.editor.projectors.items()}
        assert {name: round(v * kept[name]) for name, v in room.items()} == dict.fromkeys(kept, 4)  # one each
        assert event.payload["room_used"] == max(room.values())
    assert (store.home.stats_dir / model_key(daemon.identity) / "drift-sample.json").is_file()
    text = log.getvalue()
    assert "level=info event=health_checked edit=2" in text or "level=warning event=health_checked edit=2" in text
    # the tiny random model cannot hold facts: retention is low, and the daemon says so
    assert "level=warning event=retention_low" in text
    # four corrections fill more than a tenth of the tiny model's room, two do not
    assert text.count("level=warning event=room_low") == 1 and "event=room_low room_used=0.148" in text
    # what --metrics-port serves: the same figures, and a liveness that knows the lease is gone
    port = daemon.monitor.serve("127.0.0.1", 0)
    try:
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        daemon.monitor.close()
    applied = len([c for b in report.batches for c in b.applied])
    assert f'metake_corrections_total{{outcome="applied"}} {float(applied)}' in scraped
    assert "metake_queue_pending 0.0" in scraped and "metake_lease_held 0.0" in scraped
    retention = event.payload["retention"]
    assert f"metake_health_retention {retention}" in scraped
    assert 'metake_edit_stage_seconds_count{stage="health"} 2.0' in scraped
    assert failed.value.code == 503 and b"does not hold the model's lease" in failed.value.read()


def test_a_changed_checkpoint_file_stops_the_start_with_a_clear_error(store, tiny, log, one_thread):
    submit_facts(store, FACTS[:1])
    apply_pending(make_daemon(store, tiny, log))
    with store.sessions()() as session:
        head = session.scalars(select(Checkpoint).order_by(Checkpoint.id.desc())).first()
    path = store.home.checkpoints_dir / head.path
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DaemonError, match=rf"checkpoint {head.id}: file .* altered or damaged; the daemon will not"):
        apply_pending(make_daemon(store, tiny, log))
    path.unlink()
    with pytest.raises(DaemonError, match=rf"checkpoint {head.id}: file .* is missing"):
        apply_pending(make_daemon(store, tiny, log))


def test_settings_that_do_not_fit_the_checkpoints_are_refused(store, tiny, log, tmp_path, one_thread):
    submit_facts(store, FACTS[:1])
    apply_pending(make_daemon(store, tiny, log))
    other = tmp_path / "other.toml"
    other.write_text(tiny[1].read_text().replace("layers = [1, 2]", "layers = [2, 3]"))
    with pytest.raises(DaemonError, match="does not fit these settings: state edits layers \\[1, 2\\]"):
        apply_pending(make_daemon(store, tiny, log, hparams_file=other))


def test_a_second_stop_signal_abandons_the_batch_and_requeues_it(store, tiny, log, one_thread, monkeypatch):
    submit_facts(store, FACTS[:2])
    stop = StopControl()
    daemon = make_daemon(store, tiny, log, stop=stop)
    daemon.load()
    daemon.open()
    untouched = daemon.model.editor.edited_weights()
    real_apply = daemon.model.editor.apply

    def interrupted(requests, state):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_apply(requests, state)

    monkeypatch.setattr(daemon.model.editor, "apply", interrupted)
    with stop.handling_signals(), daemon.holding_lease(), pytest.raises(Abandon):
        run_pass(daemon)
    assert statuses(store) == {1: "pending", 2: "pending"}
    live = daemon.model.editor.edited_weights()
    assert all(torch.equal(live[k], untouched[k]) for k in live)
    assert 'event=claims_released corrections=1 reason="abandoned on a second stop signal"' in log.getvalue()
    with store.sessions()() as session:
        assert session.scalar(select(Correction.attempts).where(Correction.id == 1)) == 1
        assert [c.status for c in session.scalars(select(Correction))] == [CorrectionStatus.PENDING] * 2


def test_a_correction_that_keeps_killing_the_daemon_is_set_aside(store, tiny, log, one_thread):
    submit_facts(store, FACTS[:2])
    with store.sessions().begin() as session:  # as if three earlier claims had each ended in a crash
        session.get(Correction, 1).attempts = 3
    report = apply_pending(make_daemon(store, tiny, log, max_attempts=3))
    assert [(b.claimed, b.failed, b.applied) for b in report.batches] == [([1], [1], []), ([2], [], [2])]
    with store.sessions()() as session:
        first = session.get(Correction, 1)
        assert (first.status, first.attempts) == (CorrectionStatus.FAILED, 4)
        assert first.last_error == "tried 3 times; each attempt ended without a result"
    assert 'level=error event=corrections_failed corrections=1 reason="attempts exhausted"' in log.getvalue()


def test_a_user_given_drift_text_is_the_sample(store, tiny, log, tmp_path, one_thread):
    text = tmp_path / "drift.txt"
    text.write_text("The capital of France is Paris.\n\nRome is the capital of Italy. Berlin is in Germany.\n")
    submit_facts(store, FACTS[:1])
    daemon = make_daemon(store, tiny, log, health=HealthSettings(every=1, drift_text=text))
    apply_pending(daemon)
    assert daemon.model.drift_texts == [
        "The capital of France is Paris.",
        "Rome is the capital of Italy. Berlin is in Germany.",
    ]
    with store.sessions()() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.kind == "health_checked")).one()
        assert event.payload["sample"] == sample_sha256(daemon.model.drift_texts)
        assert event.payload["perplexity"] > 1 and event.payload["base_perplexity"] > 1


def test_the_threads_setting_is_honoured(store, tiny, log):
    before = torch.get_num_threads()
    try:
        make_daemon(store, tiny, log, threads=1).load()
        assert torch.get_num_threads() == 1
        make_daemon(store, tiny, log).load()  # default: every core this process may use
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_daemon_records_whether_the_model_says_each_fact_before_and_after(store, tiny, log, one_thread):
    submit_facts(store)
    report = apply_pending(make_daemon(store, tiny, log))
    assert all("generate" in batch.seconds for batch in report.batches)
    with store.sessions()() as session:
        rows = session.scalars(select(Metric).where(Metric.name.like("gen_%"))).all()
    recorded = {(m.correction_id, m.name, m.phase) for m in rows}
    expected = {(i, "gen_efficacy", phase) for i in (1, 2, 3, 4) for phase in (Phase.PRE, Phase.POST)}
    assert recorded == expected  # FACTS have no paraphrases or neighbours: only the prompt is asked
    assert all(m.value in (0.0, 1.0) for m in rows)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_generation_metrics_can_be_turned_off(store, tiny, log, one_thread):
    submit_facts(store, FACTS[:1])
    report = apply_pending(make_daemon(store, tiny, log, gen_metrics=False))
    assert [b.applied for b in report.batches] == [[1]] and "generate" not in report.batches[0].seconds
    with store.sessions()() as session:
        assert session.scalars(select(Metric).where(Metric.name.like("gen_%"))).all() == []


def test_the_daemon_start_abandons_an_import_whose_process_died(store, tiny, log, one_thread):
    """An import killed before completing leaves staged corrections; the daemon's recovery marks
    them abandoned (never applied) and says so."""
    with store.sessions().begin() as session:
        import_id = start_import(session, 2, "bob", model="default", source="big.jsonl").id
    with store.sessions().begin() as session:
        stage_chunk(session, import_id, [make_correction(*FACTS[0][:3])], "bob", "default")
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()
        session.get(Import, import_id).pid = finished.pid
    submit_facts(store, FACTS[1:2])
    report = apply_pending(make_daemon(store, tiny, log))
    assert [b.applied for b in report.batches] == [[2]]
    assert statuses(store) == {1: "abandoned", 2: "applied"}
    assert f"event=imports_abandoned imports={import_id}" in log.getvalue()
