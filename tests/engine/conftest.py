"""Tiny random Llama and GPT-2 models built from configs, with a byte-level BPE tokenizer.

They exercise every shape and code path of the engine in seconds. They know no facts, so they
pin down mechanics (null space, rollback, round trips), never editing quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import DEVICE
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine.models import LoadedModel, load_model

CORPUS = """The capital of France is Paris. Paris is a city in France.
The mother tongue of Danielle Darrieux is French. Danielle Darrieux was an actress.
The Eiffel Tower is located in Paris. Rome is the capital of Italy. Berlin is in Germany.
Toko Yasuda plays the guitar. The official language of Brazil is Portuguese.
Michael Jordan played basketball for the Chicago Bulls. London is the capital of England.
The Space Needle is in Seattle. English is spoken in London. Tokyo is the capital of Japan.
Apple was founded by Steve Jobs. Microsoft is located in Redmond. The river Nile is in Egypt.
"""


def _tokenizer(directory: Path) -> PreTrainedTokenizerFast:
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


def _save_tiny(kind: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(directory)
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


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 10)
    return {"llama": _save_tiny("llama", root / "llama"), "gpt2": _save_tiny("gpt2", root / "gpt2"), "corpus": corpus}


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> LoadedModel:
    """A freshly loaded tiny model (each test may edit it freely)."""
    return load_model(tiny_dirs[request.param], device=DEVICE)
