"""A tiny Llama and its hyperparameters for the evaluation harness's tests (mechanics, not quality)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import save_tiny_model, write_corpus, write_hparams


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, hyperparameter TOML with statistics from a small corpus)."""
    root = tmp_path_factory.mktemp("eval-tiny")
    corpus = write_corpus(root / "corpus.txt")
    return save_tiny_model("llama", root / "llama"), write_hparams(root / "tiny.toml", corpus)
