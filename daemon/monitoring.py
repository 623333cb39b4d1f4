"""Metrics for the monitoring people already run: Prometheus text on /metrics, liveness on /healthz.

Off unless ``metake daemon --metrics-port PORT`` asks for it. The figures live in a registry of
this daemon's own (not the process-global one), are updated by the daemon as it works, and are
served from a background thread on 127.0.0.1 by default: the queue and the model's health are
not for the whole network to read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class DaemonMonitor:
    """The daemon's figures, and whether its loop and lease are alive (for /healthz)."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.registry = CollectorRegistry()
        r = self.registry
        self.corrections = Counter(
            "metake_corrections", "Corrections settled by this daemon, by outcome.", ["outcome"], registry=r
        )
        self.queue_depth = Gauge("metake_queue_pending", "Corrections waiting in the queue.", registry=r)
        self.stage_seconds = Histogram(
            "metake_edit_stage_seconds",
            "Seconds per batch spent in each stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.retention = Gauge("metake_health_retention", "Share of re-tested corrections that still hold.", registry=r)
        self.perplexity_ratio = Gauge(
            "metake_health_perplexity_ratio", "Perplexity on the drift text over the unedited model's.", registry=r
        )
        self.room_used = Gauge(
            "metake_constraint_room_used",
            "Largest share of an edited layer's room for edits the accumulated constraint has used.",
            registry=r,
        )
        self.rehearsed = Gauge(
            "metake_health_rehearsed", "Corrections the last health check queued again (--rehearse).", registry=r
        )
        self.checkpoint_bytes = Gauge("metake_checkpoint_bytes", "Size of the current checkpoint file.", registry=r)
        self.lease_held = Gauge("metake_lease_held", "1 while this daemon holds the model's lease.", registry=r)
        self.last_beat = Gauge("metake_loop_last_beat_seconds", "Unix time the serving loop last ran.", registry=r)
        for outcome in ("applied", "failed", "rejected"):
            self.corrections.labels(outcome)
        self._beat = time.monotonic()
        self._holding = False
        self._server: WSGIServer | None = None

    # ----- updates from the daemon ---------------------------------------------------------

    def lease(self, held: bool) -> None:
        self._holding = held
        self.lease_held.set(1 if held else 0)

    def beat(self) -> None:
        self._beat = time.monotonic()
        self.last_beat.set_to_current_time()

    def batch_done(self, applied: int, failed: int, rejected: int, seconds: dict[str, float]) -> None:
        for outcome, count in (("applied", applied), ("failed", failed), ("rejected", rejected)):
            if count:
                self.corrections.labels(outcome).inc(count)
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)

    def health_checked(
        self,
        retention: float | None,
        perplexity_ratio: float | None,
        room_used: float | None = None,
        rehearsed: int | None = None,
    ) -> None:
        if rehearsed is not None:
            self.rehearsed.set(rehearsed)
        if room_used is not None:
            self.room_used.set(room_used)
        if retention is not None:
            self.retention.set(retention)
        if perplexity_ratio is not None:
            self.perplexity_ratio.set(perplexity_ratio)

    # ----- serving ---------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why /healthz fails: the loop has not run lately, or the lease is not held."""
        found = []
        quiet = time.monotonic() - self._beat
        if quiet > self.stale_after_s:
            found.append(f"the serving loop last ran {quiet:.0f} s ago (limit {self.stale_after_s:.0f} s)")
        if not self._holding:
            found.append("this daemon does not hold the model's lease")
        return found

    def wsgi_app(self) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                problems = self.problems()
                body = ("ok\n" if not problems else "".join(f"{p}\n" for p in problems)).encode()
                start_response(
                    "200 OK" if not problems else "503 Service Unavailable", [("Content-Type", "text/plain")]
                )
                return [body]
            return metrics(environ, start_response)

        return app

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics and /healthz from a daemon thread; returns the port (0 picks a free one)."""
        self._server = make_server(host, port, self.wsgi_app(), _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="metake-metrics", daemon=True).start()
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes every few seconds would flood the daemon's log."""
