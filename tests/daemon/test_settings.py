"""The daemon's settings: bad values are refused with one line; constants repeat the engine's."""

from __future__ import annotations

import pytest

from daemon.settings import DaemonSettings, HealthSettings, Retention
from storage.errors import InvalidInput


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Retention(keep_last=0), "--keep-last must be at least 1"),
        (lambda: Retention(keep_every=-1), "--keep-every must be 0"),
        (lambda: HealthSettings(retention_warning=1.5), "--retention-warning must be between 0 and 1"),
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
