"""The fixed text sample of the drift check: a user's file, or text the unedited model wrote once.

Edits are meant to change a few facts and nothing else. Over months of batches, small side
effects add up, so every N batches the daemon compares the perplexity of a fixed sample under
the current weights with the unedited model's (evaluation.metrics.perplexity measures it). The
sample is a user-given text file, or text the unedited model generated once and the data home
keeps, so it never depends on outside data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.files import atomic_write_text

SAMPLE_FILE = "drift-sample.json"
SAMPLE_STARTS = ("The", "In", "A", "It", "He", "She", "This", "There")
SAMPLE_TOKENS = 48
MAX_TEXTS = 32
MAX_TEXT_CHARS = 2000


def load_text_sample(path: Path) -> list[str]:
    """Paragraphs of a user-given UTF-8 text file (blank-line separated), at most 32 of them."""
    paragraphs = [" ".join(block.split()) for block in path.read_text(encoding="utf-8").split("\n\n")]
    texts = [p[:MAX_TEXT_CHARS] for p in paragraphs if p][:MAX_TEXTS]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


@torch.no_grad()
def generate_sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> list[str]:
    """Short texts sampled (seeded) from the model: one per opening word in SAMPLE_STARTS."""
    device = next(model.parameters()).device
    encoded = tokenizer(list(SAMPLE_STARTS), return_tensors="pt", padding=True, padding_side="left").to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            **encoded,
            do_sample=True,
            top_k=40,
            max_new_tokens=SAMPLE_TOKENS,
            min_new_tokens=SAMPLE_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
    return [" ".join(text.split()) for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def stored_sample(
    folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_identity: str
) -> list[str]:
    """The generated sample kept in ``folder``; generated (by the model as it is now) on first use.

    Call it while the model is still unedited: the sample must come from the base model.
    """
    path = folder / SAMPLE_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("model") == model_identity and stored.get("texts"):
            return list(stored["texts"])
    texts = generate_sample(model, tokenizer)
    atomic_write_text(path, json.dumps({"model": model_identity, "texts": texts}, ensure_ascii=False, indent=1))
    return texts


def sample_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
