"""Everything a daemon run is configured with, checked once before anything is loaded or written.

One frozen value carries the settings from the command line to every part of the daemon, so a
bad value fails at start-up with one clear line instead of halfway through a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.methods import METHODS
from storage.checkpoints import Retention
from storage.errors import InvalidInput
from storage.intake import check_model_name
from storage.models import DEFAULT_MODEL_NAME

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL = "default"
"""engine.models.DEFAULT_MODEL, repeated so that reading settings does not import torch (a test checks)."""

__all__ = ["DEFAULT_MODEL", "DTYPES", "METHODS", "DaemonSettings", "HealthSettings", "Retention"]


@dataclass(frozen=True)
class HealthSettings:
    """Lifelong checks: every ``every`` batches, re-test earlier corrections and measure drift.

    ``every = 0`` turns them off; ``rehearse`` acts on what they find. ``drift_text`` is a UTF-8
    text file; without one a sample is generated once by the unedited model and kept in the data home.
    """

    every: int = 10
    sample_size: int = 20
    retention_warning: float = 0.8
    room_warning: float = 0.9
    """Warn when a layer has used more than this share of its room for edits (``Editor.room_used``)."""
    drift_text: Path | None = None
    rehearse: bool = False
    """Queue again the re-tested corrections the model no longer says (rehearsal): greedy decoding
    of a correction erodes faster than its teacher-forced hold (docs/lifelong.md, "Rehearsal")."""
    max_rehearsals: int = 3
    """Times one original correction may be queued again by rehearsal."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise InvalidInput(f"--health-every must be 0 (off) or more, got {self.every}")
        if self.sample_size < 1:
            raise InvalidInput(f"--health-sample must be at least 1, got {self.sample_size}")
        if not 0.0 <= self.retention_warning <= 1.0:
            raise InvalidInput(f"--retention-warning must be between 0 and 1, got {self.retention_warning}")
        if not 0.0 <= self.room_warning <= 1.0:
            raise InvalidInput(f"--room-warning must be between 0 and 1, got {self.room_warning}")
        if self.max_rehearsals < 0:
            raise InvalidInput(f"--max-rehearsals must be 0 or more, got {self.max_rehearsals}")
        if self.drift_text is not None and not self.drift_text.is_file():
            raise InvalidInput(f"--drift-text {self.drift_text} is not a file")


@dataclass(frozen=True)
class DaemonSettings:
    """The model to edit, how to edit it, and how the daemon looks after its checkpoints and lease.

    ``name`` is the served model's name: the daemon claims only corrections submitted for it, and
    its lease and checkpoint chain are that name's. ``model`` is where its weights come from."""

    name: str = DEFAULT_MODEL_NAME
    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str = "float32"
    method: str | None = None
    """None: the method of the hyperparameter file or the engine's defaults."""
    hparams_file: Path | None = None
    batch_size: int = 1
    threads: int | None = None
    """Torch CPU threads; None: the cores this process may use (see README, "Speed")."""
    max_attempts: int = 3
    """Tries per correction before a batch that keeps failing marks it failed for good."""
    gen_metrics: bool = True
    """Greedy-decode each correction's prompts before and after its edit (daemon/generation.py):
    about 1.4 s per CounterFact correction on a 2-core CPU, a quarter of an edit."""
    lease_seconds: float = 60.0
    retention: Retention = Retention()
    health: HealthSettings = HealthSettings()

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if self.batch_size < 1:
            raise InvalidInput(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise InvalidInput(f"--threads must be at least 1, got {self.threads}")
        if self.max_attempts < 1:
            raise InvalidInput(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.lease_seconds < 3:
            raise InvalidInput(f"--lease-seconds must be at least 3, got {self.lease_seconds:g}")
        if self.method is not None and self.method not in METHODS:
            raise InvalidInput(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise InvalidInput(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.hparams_file is not None and not self.hparams_file.is_file():
            raise InvalidInput(f"--hparams {self.hparams_file} is not a file")
        if self.model != DEFAULT_MODEL and not Path(self.model).expanduser().exists():
            raise InvalidInput(f"--model {self.model} does not exist")


def check_destination(out: Path) -> None:
    """Refuse a destination that exists and is not an empty directory (nothing is overwritten).

    Here, with the settings, so that ``metake export`` refuses before it imports torch."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"--out {out} already exists and is not an empty directory")
