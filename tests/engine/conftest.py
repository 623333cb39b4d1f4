"""Tiny random Llama and GPT-2 models built from configs, with a byte-level BPE tokenizer.

They exercise every shape and code path of the engine in seconds. They know no facts, so they
pin down mechanics (null space, rollback, round trips), never editing quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import DEVICE, save_tiny_model, write_corpus

from engine.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "llama": save_tiny_model("llama", root / "llama"),
        "gpt2": save_tiny_model("gpt2", root / "gpt2"),
        "corpus": write_corpus(root / "corpus.txt"),
    }


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> LoadedModel:
    """A freshly loaded tiny model (each test may edit it freely)."""
    return load_model(tiny_dirs[request.param], device=DEVICE)
