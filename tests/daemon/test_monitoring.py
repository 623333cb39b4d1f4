"""/healthz: 200 while the daemon holds its lease and its loop comes round, 503 with the reason otherwise."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from daemon.monitoring import DaemonMonitor


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def served():
    monitor = DaemonMonitor(stale_after_s=0.5)
    port = monitor.serve("127.0.0.1", 0)
    yield monitor, port
    monitor.close()


def test_healthz_follows_the_lease_and_the_loop(served):
    monitor, port = served
    assert _get(port, "/healthz") == (503, "this daemon does not hold the model's lease\n")
    monitor.lease(True)
    monitor.beat()
    assert _get(port, "/healthz") == (200, "ok\n")
    time.sleep(0.7)
    code, body = _get(port, "/healthz")
    assert code == 503 and body.startswith("the serving loop last ran ") and body.endswith("(limit 0 s)\n")


def test_metrics_count_outcomes_and_time_stages(served):
    monitor, port = served
    monitor.batch_done(applied=3, failed=1, rejected=0, seconds={"edit": 2.5, "checkpoint": 0.2})
    monitor.batch_done(applied=1, failed=0, rejected=2, seconds={"edit": 1.0})
    monitor.health_checked(retention=0.9, perplexity_ratio=1.05, room_used=0.25, rehearsed=3)
    code, text = _get(port, "/metrics")
    assert code == 200
    for line in (
        'metake_corrections_total{outcome="applied"} 4.0',
        'metake_corrections_total{outcome="failed"} 1.0',
        'metake_corrections_total{outcome="rejected"} 2.0',
        'metake_edit_stage_seconds_count{stage="edit"} 2.0',
        'metake_edit_stage_seconds_sum{stage="edit"} 3.5',
        "metake_health_retention 0.9",
        "metake_health_perplexity_ratio 1.05",
        "metake_health_rehearsed 3.0",
        "metake_constraint_room_used 0.25",
    ):
        assert line in text.splitlines()
