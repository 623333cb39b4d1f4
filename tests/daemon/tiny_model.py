"""A tiny random Llama with a byte-level BPE tokenizer, saved as a Hugging Face directory.

The daemon tests run it in subprocesses many times; it loads and edits in well under a second.
It knows no facts, so it checks mechanics (recovery, leases, schedules), never editing quality.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = """The capital of France is Paris. Paris is a city in France.
The mother tongue of Danielle Darrieux is French. Danielle Darrieux was an actress.
The Eiffel Tower is located in Paris. Rome is the capital of Italy. Berlin is in Germany.
Toko Yasuda plays the guitar. The official language of Brazil is Portuguese.
Michael Jordan played basketball for the Chicago Bulls. London is the capital of England.
"""

HPARAMS_TOML = """layers = [1, 2]
method = "metake"

[upstream]
max_steps = 4
n_prefixes = 2
prefix_tokens = 3
lr = 2.0

[outer]
steps = 2

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


def build_tiny_llama(root: Path) -> tuple[Path, Path]:
    """(model directory, hyperparameter TOML) under ``root``."""
    directory = root / "tiny-llama"
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS.splitlines() * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 10)
    hparams = root / "tiny.toml"
    hparams.write_text(HPARAMS_TOML.format(corpus=corpus))
    return directory, hparams
