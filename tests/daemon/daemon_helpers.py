"""Running ``metake`` in subprocesses and waiting on what it logs, for the daemon tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Metake:
    """Runs ``python -m cli`` against one home and database, in subprocesses."""

    home: Path
    db_url: str
    env: dict[str, str]

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cli", "--home", str(self.home), "--db", self.db_url, *args]

    def run(self, *args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if fault is not None:
            env["METAKE_FAULT_AT"] = fault
        return subprocess.run(self.args(*args), env=env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 300) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"metake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start(self, *args: str, log: Path) -> subprocess.Popen[str]:
        """Start a long-running command with stderr (the event log) going to ``log``."""
        handle = open(log, "w")  # noqa: SIM115 - closed by the child's exit; the test reads the file
        return subprocess.Popen(self.args(*args), env=self.env, stdout=subprocess.DEVNULL, stderr=handle, text=True)


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAKE_") or k == "METAKE_TEST_CACHE"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | (extra or {})


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def log_has(log: Path, *needles: str) -> bool:
    text = log.read_text() if log.exists() else ""
    return any(all(n in line for n in needles) for line in text.splitlines())
