"""The model the daemon edits (EditableModel): loaded once per process, with its editor and the unedited weights.

Loading is the slow part of start-up (statistics are computed the first time, minutes on a CPU),
so it happens once; restoring a checkpoint afterwards only copies the edited layers in. A copy of
the unedited layers stays in memory: it is the baseline of the drift check and costs a few MB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.drift_sample import load_text_sample, stored_sample
from daemon.settings import DaemonSettings
from engine.editor import Editor
from engine.files import model_key
from engine.hparams import EditHyperParams
from engine.models import LoadedModel, ModelLoadError, load_model
from engine.requests import EditRequest
from engine.stats import StatisticsDamaged
from storage.errors import InvalidInput
from storage.home import DataHome
from storage.models import Correction


@dataclass
class EditableModel:
    """The loaded model, its editor, a copy of its unedited layers and the drift check's text."""

    loaded: LoadedModel
    editor: Editor
    base_weights: dict[str, torch.Tensor]
    drift_texts: list[str]
    """Empty when health checks are off."""

    @property
    def identity(self) -> str:
        return self.loaded.identity

    @property
    def hparams(self) -> EditHyperParams:
        return self.editor.hparams


def check_device(name: str | None) -> None:
    """Refuse a device string torch does not know, or an accelerator this machine lacks."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InvalidInput(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"--device {name}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidInput(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_base_model(settings: DaemonSettings, home: DataHome) -> LoadedModel:
    """The base model from the settings (cached in the home); bad settings become InvalidInput.

    A hyperparameter file's ``[architecture]`` templates reach the loader, so that a model type
    outside the built-in table loads once its module names are given there."""
    check_device(settings.device)
    torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    architecture = read_hparams(settings.hparams_file).architecture if settings.hparams_file else None
    try:
        return load_model(
            settings.model,
            cache_dir=home.models_dir,
            device=settings.device,
            dtype=settings.dtype,
            architecture=architecture,
        )
    except (ModelLoadError, ValueError) as error:
        raise InvalidInput(str(error)) from error
    except RuntimeError as error:  # e.g. an unknown or unavailable device
        raise InvalidInput(f"cannot load the model on device {settings.device!r}: {error}") from error


def read_hparams(path: Path) -> EditHyperParams:
    """A hyperparameter TOML file; a bad one becomes InvalidInput naming the file."""
    try:
        return EditHyperParams.from_file(path)
    except (ValueError, TypeError, OSError) as error:
        raise InvalidInput(f"{path}: {error}") from error


def resolve_hparams(settings: DaemonSettings, loaded: LoadedModel) -> EditHyperParams:
    """The daemon's hyperparameters: ``--hparams`` if given, else the defaults; ``--method`` overrides."""
    try:
        return EditHyperParams.resolve(loaded.model_type, loaded.n_layers, settings.hparams_file, settings.method)
    except ValueError as error:
        raise InvalidInput(str(error)) from error


def open_model(settings: DaemonSettings, home: DataHome, loaded: LoadedModel) -> EditableModel:
    """Build the editor (statistics from the home's cache) and keep what is needed of the base model."""
    hparams = resolve_hparams(settings, loaded)
    try:
        editor = Editor(loaded, hparams, cache_dir=home.stats_dir)
    except (FileNotFoundError, StatisticsDamaged) as error:  # a statistics source not there, a damaged cache
        raise InvalidInput(str(error)) from error
    base_weights = {name: weight.cpu() for name, weight in editor.edited_weights().items()}
    drift_texts: list[str] = []
    if settings.health.every:
        if settings.health.drift_text is not None:
            try:
                drift_texts = load_text_sample(settings.health.drift_text)
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise InvalidInput(f"--drift-text: {error}") from error
        else:
            folder = home.stats_dir / model_key(loaded.identity)
            drift_texts = stored_sample(folder, loaded.model, loaded.tokenizer, loaded.identity)
    return EditableModel(loaded, editor, base_weights, drift_texts)


def edit_request(correction: Correction) -> EditRequest:
    """The engine's request for a correction, keyed by the correction id."""
    return EditRequest(
        prompt=correction.prompt,
        subject=correction.subject,
        target=correction.target,
        original=correction.original_answer,
        paraphrases=tuple(correction.paraphrases),
        neighbors=tuple((n["prompt"], n["answer"]) for n in correction.neighbors),
        key=str(correction.id),
    )
