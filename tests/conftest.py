"""Fixtures shared by every test folder.

Loading the real default model (SmolLM2-135M) converts its GGUF once (~20 s) and computes its
key statistics once (minutes on a CPU); ``model_cache`` keeps both for the whole session, in
``$METAKE_TEST_CACHE`` when set (so repeated local runs reuse them) or a session temp folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``models/`` and ``stats/`` caches shared by all tests of the session."""
    root = (
        Path(os.environ["METAKE_TEST_CACHE"])
        if os.environ.get("METAKE_TEST_CACHE")
        else tmp_path_factory.mktemp("cache")
    )
    for sub in ("models", "stats"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (CounterFact, corpora); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA
