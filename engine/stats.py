"""Key statistics ``C0 = E[k k^T]`` per edited layer, cached with their provenance.

``C0`` describes the keys of knowledge that must be preserved. It is kept as a float64 sum and a
token count (so that more text can be added later) in a safetensors file whose metadata says
exactly what produced it: model identity, layer, module, text source with its hash, tokens.
The default source is text sampled from the model itself, so that nothing external is needed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from engine.architecture import get_module
from engine.files import atomic_path, model_key
from engine.hooks import capture_inputs, forward_hooks, run_until_stopped
from engine.hparams import StatsParams
from engine.models import LoadedModel, seeded
from engine.requests import Row, make_batch

MODEL_SOURCE = "model"
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".md", "")
_SAMPLE_STARTS = ("The", "In", "A", "It", "He", "She", "This", "There")


@dataclass(frozen=True)
class KeyStatistics:
    """The uncentred second moment of one layer's keys, with what produced it."""

    layer: int
    total: torch.Tensor
    """Sum of ``k k^T`` over tokens (float64, d_k x d_k)."""
    count: int
    provenance: dict[str, object]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256(self.total.cpu().contiguous().numpy().tobytes())
        digest.update(str(self.count).encode())
        return digest.hexdigest()


def _source_label(source: str) -> tuple[str, list[Path]]:
    """A stable description of the text source and the files it reads (content-hashed)."""
    if source == MODEL_SOURCE:
        return MODEL_SOURCE, []
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"statistics source not found: {root}")
    files = (
        sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES) if root.is_dir() else [root]
    )
    if not files:
        raise FileNotFoundError(f"no text files (.txt, .raw, .tokens, .md) under {root}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return f"text-sha256:{digest.hexdigest()[:16]}", files


def cache_path(cache_dir: Path, loaded: LoadedModel, layer: int, label: str, params: StatsParams) -> Path:
    """The file of one layer's statistics, named by everything that changes them.

    Sampling from the model draws other text at another batch size (each round is seeded), so
    for that source the batch size is part of the name; read text is the same at any batch size.
    """
    model = model_key(loaded.identity)
    what = f"{label}|{params.n_tokens}|{params.seq_len}|{params.seed}"
    if label == MODEL_SOURCE:
        what += f"|batch{params.batch_size}"
        if params.starts_per_sequence:
            what += "|starts-per-sequence"
    tag = hashlib.sha256(what.encode()).hexdigest()[:12]
    return cache_dir / model / f"c0-{loaded.spec.mlp_out_of(layer)}-{tag}.safetensors"


def load_statistics(path: Path) -> KeyStatistics:
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    meta = header.get("__metadata__", {})
    tensors = load_file(path)
    return KeyStatistics(int(meta["layer"]), tensors["total"], int(meta["count"]), json.loads(meta["provenance"]))


class StatisticsDamaged(ValueError):
    """A cached statistics file that does not hash to what its provenance file recorded."""


def load_checked(path: Path) -> KeyStatistics:
    """A cached file, checked against the sha256 its provenance file recorded when it was written.

    Statistics take minutes to recompute and a damaged file would edit wrongly and silently, so a
    mismatch is an error that names the file (delete it to recompute). A file without a provenance
    file (written before they existed) is used as it is.
    """
    stats = load_statistics(path)
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        recorded = json.loads(sidecar.read_text()).get("sha256")
        if recorded is not None and recorded != stats.sha256:
            raise StatisticsDamaged(
                f"statistics cache {path} does not match the sha256 recorded beside it; delete it to recompute"
            )
    return stats


def save_statistics(path: Path, stats: KeyStatistics) -> None:
    """Write atomically (temporary name, then rename) so a crash never leaves half a file."""
    meta = {"layer": str(stats.layer), "count": str(stats.count), "provenance": json.dumps(stats.provenance)}
    with atomic_path(path) as tmp:
        save_file({"total": stats.total.cpu().contiguous()}, tmp, metadata=meta)
    path.with_suffix(".json").write_text(json.dumps({**stats.provenance, "sha256": stats.sha256}, indent=2))


def key_statistics(
    loaded: LoadedModel, layers: tuple[int, ...], params: StatsParams, cache_dir: Path | None
) -> dict[int, KeyStatistics]:
    """``C0`` for each layer, from the cache when it holds the same provenance, else computed."""
    label, files = _source_label(params.source)
    paths = {layer: cache_path(cache_dir, loaded, layer, label, params) for layer in layers} if cache_dir else {}
    found = {layer: load_checked(p) for layer, p in paths.items() if p.exists()}
    missing = tuple(layer for layer in layers if layer not in found)
    if missing:
        fresh = _compute(loaded, missing, params, label, files)
        for layer, stats in fresh.items():
            if cache_dir:
                save_statistics(paths[layer], stats)
            found[layer] = stats
    return {layer: found[layer] for layer in layers}


class _SecondMoment:
    """A forward hook that adds ``k k^T`` of its module's inputs, over unpadded tokens, to a sum."""

    def __init__(self, d_k: int, device: torch.device) -> None:
        self.total = torch.zeros(d_k, d_k, dtype=torch.float64, device=device)
        self.count = 0
        self.mask: torch.Tensor | None = None
        self.on_count: Callable[[int], object] | None = None
        """Told each pass's token count (a progress bar that moves every decode step)."""

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        keys = args[0].reshape(-1, self.total.shape[0])
        if self.mask is not None:
            keys = keys[self.mask.reshape(-1).bool()]
        keys = keys.double()
        self.total += keys.T @ keys
        self.count += keys.shape[0]
        if self.on_count is not None:
            self.on_count(keys.shape[0])


def _compute(
    loaded: LoadedModel, layers: tuple[int, ...], params: StatsParams, label: str, files: list[Path]
) -> dict[int, KeyStatistics]:
    names = [loaded.spec.mlp_out_of(layer) for layer in layers]
    d_k = _key_width(loaded, names[0])
    moments = {name: _SecondMoment(d_k, loaded.device) for name in names}
    started = time.time()
    with forward_hooks(loaded.model, moments), torch.no_grad():
        if label == MODEL_SOURCE:
            _sample_from_model(loaded, params, moments[names[0]])
        else:
            _read_text(loaded, params, files, moments, stop_after=names[-1])
    provenance_base = {
        "model": loaded.identity,
        "model_source": loaded.source,
        "source": label if label == MODEL_SOURCE else params.source,
        "source_id": label,
        "files": [str(f) for f in files],
        "requested_tokens": params.n_tokens,
        "seq_len": params.seq_len,
        "batch_size": params.batch_size,
        "starts_per_sequence": params.starts_per_sequence,
        "seed": params.seed,
        "dtype": str(loaded.dtype),
        "seconds": round(time.time() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {
        layer: KeyStatistics(
            layer,
            moments[name].total.cpu(),
            moments[name].count,
            {**provenance_base, "layer": layer, "module": name, "tokens": moments[name].count},
        )
        for layer, name in zip(layers, names, strict=True)
    }


def _key_width(loaded: LoadedModel, name: str) -> int:
    weight = get_module(loaded.model, name).weight
    return int(weight.shape[0] if loaded.spec.weight_transposed else weight.shape[1])


def _sample_from_model(loaded: LoadedModel, params: StatsParams, counter: _SecondMoment) -> None:
    """Sample text from the model and collect keys from the very forward passes that produce it.

    Each round starts every sequence of the batch from the same short word, or with
    ``starts_per_sequence`` each sequence from the next word in turn (and the last round only as
    many sequences as the tokens still missing need), and samples at temperature 1
    with a per-round seed. A round's words encode to the same number of tokens, so there is no
    padding and no pad token ever becomes a key.
    """
    tok = loaded.tokenizer
    words = _start_words(tok) if params.starts_per_sequence else list(_SAMPLE_STARTS)
    bar = tqdm(total=params.n_tokens, desc="C0 from model samples", unit="tok", leave=False)
    counter.on_count = bar.update
    round_ = 0
    while counter.count < params.n_tokens:
        if params.starts_per_sequence:
            first = round_ * params.batch_size
            # the last round samples only the sequences still needed (a round costs its batch)
            size = min(params.batch_size, -(-(params.n_tokens - counter.count) // params.seq_len))
            starts = [words[(first + i) % len(words)] for i in range(size)]
        else:
            starts = [words[round_ % len(words)]] * params.batch_size
        enc = tok(starts, return_tensors="pt").to(loaded.device)
        with seeded(loaded.device, params.seed * 100_003 + round_):
            loaded.model.generate(
                **enc,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=params.seq_len,
                min_new_tokens=params.seq_len,
                pad_token_id=tok.pad_token_id,
            )
        round_ += 1
    counter.on_count = None
    bar.close()


def _start_words(tok: PreTrainedTokenizerBase) -> list[str]:
    """The start words that encode to as many tokens as the first one (all of them, for the
    tokenizers tried), so a batch of different starts needs no padding."""
    lengths = [len(tok(word).input_ids) for word in _SAMPLE_STARTS]
    return [word for word, n in zip(_SAMPLE_STARTS, lengths, strict=True) if n == lengths[0]]


def _read_text(
    loaded: LoadedModel, params: StatsParams, files: list[Path], moments: dict[str, _SecondMoment], stop_after: str
) -> None:
    """Run the model over windows of the given text, stopping each pass at the last edited layer."""
    tok = loaded.tokenizer
    ids: list[int] = []
    for file in files:
        for paragraph in file.read_text(errors="replace").split("\n"):
            if paragraph.strip():
                ids.extend(tok(paragraph.strip() + "\n", add_special_tokens=False).input_ids)
            if len(ids) >= params.n_tokens:
                break
        if len(ids) >= params.n_tokens:
            break
    ids = ids[: params.n_tokens]
    windows = [ids[i : i + params.seq_len] for i in range(0, len(ids), params.seq_len)]
    bar = tqdm(total=sum(len(w) for w in windows), desc="C0 from text", unit="tok", leave=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(windows), params.batch_size):
        batch = make_batch([Row(w) for w in windows[start : start + params.batch_size]], pad, loaded.device)
        for moment in moments.values():
            moment.mask = batch.attention_mask
        with capture_inputs(loaded.model, [], stop_after=stop_after):
            run_until_stopped(loaded.model, **batch.inputs())
        bar.update(int(batch.attention_mask.sum()))
    bar.close()
    for moment in moments.values():
        moment.mask = None
