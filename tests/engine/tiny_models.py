"""Shared settings and requests for the tiny-model engine tests."""

from __future__ import annotations

import os
from pathlib import Path

from engine.hparams import EditHyperParams
from engine.requests import EditRequest

DEVICE = os.environ.get("METAKE_TEST_DEVICE", "cpu")
"""Where the engine tests run: ``cpu`` here and in CI, ``cuda`` for the GPU check."""


def tiny_hparams(tiny_dirs: dict[str, Path], method: str = "metake", **changes: object) -> EditHyperParams:
    """Small, fast settings: 2 edited layers, C0 from the fixture corpus, few steps."""
    base = EditHyperParams(
        layers=(1, 2),
        method=method,  # type: ignore[arg-type]
    ).with_changes(
        stats={"source": str(tiny_dirs["corpus"]), "n_tokens": 1500, "seq_len": 64, "batch_size": 8},
        upstream={"max_steps": 8, "n_prefixes": 2, "prefix_tokens": 3, "lr": 2.0},
        outer={"steps": 4},
        solver={"nullspace_threshold": 0.1, "nullspace_relative": True, "alpha": 1e-2},
    )
    return base.with_changes(**changes) if changes else base


REQUESTS = [
    EditRequest("The capital of {} is", "France", "Rome", original="Paris", key="1"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", original="French", key="2"),
    EditRequest("{} plays the", "Toko Yasuda", "piano", original="guitar", key="3"),
]
