"""The daemon's settings: bad values are refused with one line; constants repeat the engine's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.settings import DaemonSettings, HealthSettings, Retention
from storage.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Retention(keep_last=0), "--keep-last must be at least 1"),
        (lambda: Retention(keep_every=-1), "--keep-every must be 0"),
        (lambda: HealthSettings(retention_warning=1.5), "--retention-warning must be between 0 and 1"),
        (lambda: HealthSettings(max_rehearsals=-1), "--max-rehearsals must be 0 or more"),
        (lambda: DaemonSettings(batch_size=0), "--batch-size must be at least 1"),
        (lambda: DaemonSettings(threads=0), "--threads must be at least 1"),
        (lambda: DaemonSettings(method="rome"), "unknown method 'rome'"),
        (lambda: DaemonSettings(model="/no/such/model"), "--model /no/such/model does not exist"),
        (lambda: DaemonSettings(lease_seconds=1), "--lease-seconds must be at least 3"),
    ],
)
def test_bad_settings_are_refused_with_one_line(make, message):
    with pytest.raises(InvalidInput, match=message):
        make()


def test_settings_repeat_the_engine_constants_faithfully():
    from daemon import settings
    from engine.hparams import METHODS
    from engine.models import DEFAULT_MODEL

    assert (settings.METHODS, settings.DEFAULT_MODEL) == (METHODS, DEFAULT_MODEL)


def test_export_refuses_a_used_destination_before_importing_torch(tmp_path):
    """Importing torch takes seconds (10-18 s under load); a bad --out must not wait for it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cli import main\n"
        f"result = CliRunner().invoke(main, ['--home', {str(tmp_path / 'home')!r}, 'export', '--out', {str(out)!r}])\n"
        "print(result.exit_code, 'torch' in sys.modules)\n"
        "print(result.stderr, end='')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.splitlines() == [
        "1 False",
        f"Error: --out {out} already exists and is not an empty directory",
    ]
