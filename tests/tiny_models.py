"""Tiny random Llama and GPT-2 models with a byte-level BPE tokenizer, saved as HF directories.

They load and edit in well under a second, so they exercise every shape and code path of the
engine and the daemon (also in subprocesses, many times). They know no facts: they pin down
mechanics (null space, rollback, recovery, leases), never editing quality.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

from engine.hparams import EditHyperParams
from engine.requests import EditRequest

DEVICE = os.environ.get("METAKE_TEST_DEVICE", "cpu")
"""Where the engine tests run: ``cpu`` here and in CI, ``cuda`` for the GPU check."""

CORPUS = """The capital of France is Paris. Paris is a city in France.
The mother tongue of Danielle Darrieux is French. Danielle Darrieux was an actress.
The Eiffel Tower is located in Paris. Rome is the capital of Italy. Berlin is in Germany.
Toko Yasuda plays the guitar. The official language of Brazil is Portuguese.
Michael Jordan played basketball for the Chicago Bulls. London is the capital of England.
The Space Needle is in Seattle. English is spoken in London. Tokyo is the capital of Japan.
Apple was founded by Steve Jobs. Microsoft is located in Redmond. The river Nile is in Egypt.
"""

HPARAMS_TOML = """layers = [1, 2]
method = "metake"

[upstream]
max_steps = 8
n_prefixes = 2
prefix_tokens = 3
lr = 2.0

[outer]
steps = 4

[solver]
nullspace_threshold = 0.1
nullspace_relative = true
alpha = 0.01

[stats]
source = "{corpus}"
n_tokens = 1500
seq_len = 64
batch_size = 8
"""
"""Small, fast settings: 2 edited layers, C0 from the corpus file, few steps, a relative
null-space threshold (the tiny models' key spectra have no meaningful absolute scale)."""

REQUESTS = [
    EditRequest("The capital of {} is", "France", "Rome", original="Paris", key="1"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", original="French", key="2"),
    EditRequest("{} plays the", "Toko Yasuda", "piano", original="guitar", key="3"),
]


def save_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS.splitlines() * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def save_tiny_model(kind: str, directory: Path) -> Path:
    """A 4-layer ``llama``, ``gpt2`` or ``phi`` of width 32 (weights scaled up so it has confident outputs).

    ``phi`` is outside the engine's built-in architecture table: it loads only with ``[architecture]``."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(directory)
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            initializer_range=0.3,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    elif kind == "phi":
        config = PhiConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=128,
            initializer_range=0.3,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = PhiForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=128,
            eos_token_id=tok.eos_token_id,
            initializer_range=0.3,
        )
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    return directory


def write_corpus(path: Path) -> Path:
    path.write_text(CORPUS * 10)
    return path


def write_hparams(path: Path, corpus: Path) -> Path:
    path.write_text(HPARAMS_TOML.format(corpus=corpus))
    return path


def tiny_hparams(corpus: Path, method: str = "metake", **changes: object) -> EditHyperParams:
    base = EditHyperParams.from_dict(tomllib.loads(HPARAMS_TOML.format(corpus=corpus))).with_changes(method=method)
    return base.with_changes(**changes) if changes else base


BITING_SOLVER = {
    "llama": {"nullspace_threshold": 2.0, "nullspace_relative": False, "alpha": 10.0, "mom2_weight": 10.0},
    "gpt2": {"nullspace_threshold": 0.12, "nullspace_relative": False, "alpha": 3.0, "mom2_weight": 10.0},
}
"""Solver settings under which the tiny models' constraints bite: the projector keeps about half
of the key directions (llama 32 and 26 of 64, gpt2 54 and 63 of 128), the realised gain of a
single edit is 0.35-0.7, and MEMIT, AlphaEdit and MetaKE give clearly different updates. (With
``HPARAMS_TOML``'s relative threshold the gain is 0.999 and the methods cannot be told apart.)"""


def biting_hparams(corpus: Path, model_type: str, method: str = "metake", **changes: object) -> EditHyperParams:
    """``tiny_hparams`` with :data:`BITING_SOLVER` for ``model_type`` (``llama`` or ``gpt2``)."""
    solver = {**BITING_SOLVER[model_type], **changes.pop("solver", {})}  # type: ignore[dict-item]
    return tiny_hparams(corpus, method, solver=solver, **changes)
