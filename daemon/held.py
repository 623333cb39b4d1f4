"""The model this process holds: its lease, the live weights and editor state, the current checkpoint.

The model in memory only ever moves forward to a state whose checkpoint is committed. Every
change is made inside :meth:`HeldModel.tentative`, which puts the weights, the editor state and
the current checkpoint back, and deletes the new checkpoint file, when anything fails before the
commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from daemon.checkpoint_files import (
    CheckpointContents,
    CheckpointFileError,
    ModelInfo,
    NewCheckpoint,
    Origin,
    delete_files,
    read_checkpoint,
    write_new,
)
from daemon.lease import LeaseGuard
from daemon.logs import log_event
from daemon.settings import DaemonSettings
from daemon.workspace import EditableModel, load_base_model, open_model
from engine.models import LoadedModel
from engine.state import EditorState, StateMismatch
from storage.checkpoints import add_checkpoint, audit_checkpoint, head_checkpoint, prune
from storage.context import StoreContext
from storage.db import Session
from storage.errors import UserError
from storage.leases import worker_name
from storage.models import Checkpoint


class DaemonError(UserError):
    """The daemon cannot go on safely (e.g. a checkpoint does not match its record)."""


@dataclass
class Tentative:
    """What a tentative change started from, and the checkpoint file it has written so far."""

    weights: dict[str, torch.Tensor]
    state: EditorState | None
    current: Checkpoint | None
    new: NewCheckpoint | None = None


class HeldModel:
    """One process's hold on one model: lease, live weights and state, and the current checkpoint."""

    def __init__(self, store: StoreContext, settings: DaemonSettings, logger: logging.Logger) -> None:
        self.store = store
        self.settings = settings
        self.log = logger
        self.sessions = store.sessions()
        self.worker = worker_name()
        self.actor = self.worker[:100]
        self.loaded: LoadedModel | None = None
        self._model: EditableModel | None = None
        self._lease: LeaseGuard | None = None
        self.state: EditorState | None = None
        self.current: Checkpoint | None = None
        """The committed checkpoint whose weights and state are live in memory (None: not restored)."""

    def event(self, level: int, event: str, **fields: Any) -> None:
        log_event(self.log, level, event, **fields)

    @property
    def name(self) -> str:
        """The served model's name: it names the lease, the checkpoint chain and the corrections claimed."""
        return self.settings.name

    @property
    def identity(self) -> str:
        """The base model's identity: every checkpoint of the chain is made from it."""
        assert self.loaded is not None, "load() first"
        return self.loaded.identity

    @property
    def model(self) -> EditableModel:
        assert self._model is not None, "open() first"
        return self._model

    @property
    def lease(self) -> LeaseGuard:
        assert self._lease is not None, "load() first"
        return self._lease

    # ----- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the base model (fast once converted) and prepare the name's lease."""
        started = time.perf_counter()
        self.loaded = load_base_model(self.settings, self.store.home)
        self._lease = LeaseGuard(self.sessions, self.name, self.worker, self.settings.lease_seconds, self.log)
        self.event(
            logging.INFO,
            "model_loaded",
            name=self.name,
            model=self.loaded.source,
            identity=self.loaded.identity,
            device=self.loaded.device,
            dtype=self.loaded.dtype,
            seconds=time.perf_counter() - started,
        )

    def open(self) -> None:
        """Build the editor (statistics, projectors) and keep the unedited layers; slow the first time."""
        assert self.loaded is not None, "load() first"
        started = time.perf_counter()
        self._model = open_model(self.settings, self.store.home, self.loaded)
        hp = self._model.hparams
        self.event(
            logging.INFO,
            "editor_ready",
            method=hp.method,
            layers=list(hp.layers),
            health_every=self.settings.health.every,
            seconds=time.perf_counter() - started,
        )

    def forget(self) -> None:
        """After the lease is let go: what is in memory may no longer be the model's current state."""
        self.current = None
        self.state = None

    # ----- checkpoints ------------------------------------------------------------------------

    def read(self, checkpoint: Checkpoint) -> CheckpointContents:
        """A checkpoint's contents, checked against its record and against these settings."""
        label = f"checkpoint {checkpoint.id}"
        try:
            contents = read_checkpoint(
                self.store.home.checkpoints_dir / checkpoint.path, checkpoint.sha256, label, self.model.loaded.device
            )
        except CheckpointFileError as error:
            raise DaemonError(f"{error}; the daemon will not start from it") from error
        try:
            self.model.editor.check_state(contents.state)
        except StateMismatch as error:
            raise DaemonError(
                f"{label} does not fit these settings: {error}; use the hyperparameters it was made "
                "with (see `metake checkpoints --json`) or another data home"
            ) from error
        return contents

    def install(self, contents: CheckpointContents, checkpoint: Checkpoint) -> None:
        self.model.editor.load_weights(contents.weights)
        self.state = contents.state
        self.current = checkpoint

    def restore_head(self) -> None:
        """Make the model's newest checkpoint live (writing the first one if there is none)."""
        with self.sessions() as session:
            head = head_checkpoint(session, self.name)
        if head is None:
            self._write_base_checkpoint()
            return
        if head.base_model != self.identity:
            raise DaemonError(
                f"model {self.name!r} was made from base model {head.base_model[:40]}, not "
                f"{self.identity[:40]}; start it with the --model it was made with, or serve these weights "
                "under another --name"
            )
        started = time.perf_counter()
        contents = self.read(head)
        self.install(contents, head)
        self.event(
            logging.INFO,
            "checkpoint_restored",
            checkpoint=head.id,
            steps=contents.state.steps,
            edits=contents.state.edits,
            seconds=time.perf_counter() - started,
        )

    def _write_base_checkpoint(self) -> None:
        """The first checkpoint: the unedited layers and a fresh editor state (prefixes chosen once)."""
        state = self.model.editor.new_state()
        with self.tentative() as tentative:
            new = self.write(tentative, tentative.weights, state, Origin("base", parent=None, batch=[], applied=[]))
            with self.lease.transaction() as session:
                row = self.add(session, new, parent_id=None)
                audit_checkpoint(session, row, self.actor)
        self.state = state
        self.current = row
        self.event(logging.INFO, "checkpoint_written", checkpoint=row.id, kind="base", size_bytes=new.file.size_bytes)

    @contextmanager
    def tentative(self) -> Iterator[Tentative]:
        """Weights, state and current checkpoint as they are now, put back if the block raises
        (and the checkpoint file it wrote deleted): the commit is the only way forward."""
        before = Tentative(self.model.editor.edited_weights(), self.state, self.current)
        try:
            yield before
        except BaseException:
            self.model.editor.load_weights(before.weights)
            self.state, self.current = before.state, before.current
            if before.new is not None:
                delete_files(self.store.home.checkpoints_dir, [before.new.file.relative_path])
            raise

    def write(
        self, tentative: Tentative, weights: dict[str, torch.Tensor], state: EditorState, origin: Origin
    ) -> NewCheckpoint:
        """Write a checkpoint file of this model, deleted again if ``tentative`` fails."""
        info = ModelInfo(self.name, self.identity, self.model.loaded.source, self.model.hparams)
        tentative.new = write_new(self.store.home.checkpoints_dir, weights, state, origin, info)
        return tentative.new

    def add(self, session: Session, new: NewCheckpoint, parent_id: int | None) -> Checkpoint:
        """The row of a checkpoint file this model wrote."""
        return add_checkpoint(
            session,
            path=new.file.relative_path,
            sha256=new.file.sha256,
            size_bytes=new.file.size_bytes,
            model=self.name,
            base_model=self.identity,
            parent_id=parent_id,
            manifest=new.manifest,
            created_at=new.created_at,
        )

    def prune(self, session: Session) -> list[str]:
        """Mark what retention lets go as pruned; returns the files to delete after the commit."""
        return prune(session, self.name, self.settings.retention, self.actor)

    def delete_pruned(self, paths: list[str]) -> None:
        refused = delete_files(self.store.home.checkpoints_dir, paths)
        for path in refused:
            self.event(logging.WARNING, "prune_refused", path=path, reason="outside the checkpoints folder")
        if len(paths) > len(refused):
            self.event(logging.INFO, "checkpoints_pruned", files=len(paths) - len(refused))
