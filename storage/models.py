"""The ORM schema of the correction store.

Every change to these classes needs an Alembic revision in ``migrations/versions``; a test fails
when the models and the migrations drift apart.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
)
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship

from storage.types import UTCDateTime, utcnow

MAX_ROW_ID = 2**63 - 1
"""The largest id a row can have (BIGINT on PostgreSQL, INTEGER on SQLite); command lines refuse more."""

# Alembic needs named constraints to alter them later, SQLite batch mode most of all.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEFAULT_MODEL_NAME = "default"
"""The model a correction is for when nobody names one (a home that serves one model never does)."""
MODEL_NAME_MAX_CHARS = 100
MODEL_NAME_ENV = "METAKE_MODEL_NAME"
"""The model name ``submit --model`` and the daemon's ``--name`` default to when set."""

PROMPT_MAX_CHARS = 1000
SUBJECT_MAX_CHARS = 200
TARGET_MAX_CHARS = 200


class CorrectionStatus(enum.StrEnum):
    """Where a correction is in its life; see storage.queue for the transitions."""

    PENDING = "pending"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    REVERTED = "reverted"
    STAGED = "staged"
    """Written by a bulk import that has not completed yet: nobody claims, lists or supersedes it."""
    ABANDONED = "abandoned"
    """Staged by an import whose process died before completing it (never queued)."""


class ImportStatus(enum.StrEnum):
    """A bulk import's life (storage.imports): running until completed or found abandoned."""

    RUNNING = "running"
    COMPLETE = "complete"
    ABANDONED = "abandoned"


class RevertStatus(enum.StrEnum):
    """Where a revert request is: waiting for the daemon, performed, or refused with a reason."""

    PENDING = "pending"
    DONE = "done"
    REFUSED = "refused"


class Phase(enum.StrEnum):
    """Whether a metric was measured before or after its edit."""

    PRE = "pre"
    POST = "post"


def _str_enum(enum_class: type[enum.StrEnum], name: str) -> Enum:
    """A portable enum column: VARCHAR plus a CHECK constraint, storing the lowercase values."""
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention and the shared column types."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        list[str]: JSON(),
        list[int]: JSON(),
        list[dict[str, str]]: JSON(),
    }


class Correction(Base):
    """One requested fact correction, and the queue entry that carries it to an edit."""

    __tablename__ = "corrections"
    __table_args__ = (
        Index("ix_corrections_claim_order", "status", "model", "priority", "submitted_at"),
        Index("ix_corrections_subject", "subject"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(MODEL_NAME_MAX_CHARS), default=DEFAULT_MODEL_NAME)
    """The name of the model this correction is for; a daemon serves one name (``--name``)."""
    prompt: Mapped[str] = mapped_column(String(PROMPT_MAX_CHARS))
    subject: Mapped[str] = mapped_column(String(SUBJECT_MAX_CHARS))
    target: Mapped[str] = mapped_column(String(TARGET_MAX_CHARS))
    original_answer: Mapped[str | None] = mapped_column(String(TARGET_MAX_CHARS))
    paraphrases: Mapped[list[str]] = mapped_column(default=list)
    neighbors: Mapped[list[dict[str, str]]] = mapped_column(default=list)
    priority: Mapped[int] = mapped_column(default=0)
    submitter: Mapped[str] = mapped_column(String(100))
    source: Mapped[str | None] = mapped_column(String(200))
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[CorrectionStatus] = mapped_column(
        _str_enum(CorrectionStatus, "correction_status"), default=CorrectionStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None]
    edit_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"), index=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("corrections.id"))
    import_id: Mapped[int | None] = mapped_column(ForeignKey("imports.id"), index=True)
    """The bulk import that wrote it in chunks (storage.imports); None for one-transaction submits."""

    edit: Mapped[Edit | None] = relationship(back_populates="corrections")

    def filled_prompt(self) -> str:
        """The prompt with the subject written in, as the model reads it."""
        return self.prompt.replace("{}", self.subject, 1)


class Import(Base):
    """A bulk import written in chunks: its corrections stay staged until it completes (storage.imports)."""

    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(MODEL_NAME_MAX_CHARS))
    submitter: Mapped[str] = mapped_column(String(100))
    source: Mapped[str | None] = mapped_column(String(200))
    records: Mapped[int]
    """How many corrections the import will write."""
    status: Mapped[ImportStatus] = mapped_column(_str_enum(ImportStatus, "import_status"))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int]
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    """Renewed with every chunk: an import on another host is abandoned once this is old."""
    finished_at: Mapped[datetime | None]


class Edit(Base):
    """One application of a batch of corrections to the model."""

    __tablename__ = "edits"

    id: Mapped[int] = mapped_column(primary_key=True)
    method: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(200))
    hparams: Mapped[dict[str, Any]] = mapped_column(default=dict)
    layers: Mapped[list[int]] = mapped_column(default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_before_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    checkpoint_after_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))

    corrections: Mapped[list[Correction]] = relationship(back_populates="edit")
    metrics: Mapped[list[Metric]] = relationship(back_populates="edit")
    checkpoint_before: Mapped[Checkpoint | None] = relationship(foreign_keys=[checkpoint_before_id])
    checkpoint_after: Mapped[Checkpoint | None] = relationship(foreign_keys=[checkpoint_after_id])


class Metric(Base):
    """One measured figure of an edit, for one correction or for the whole batch."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id"), index=True)
    correction_id: Mapped[int | None] = mapped_column(ForeignKey("corrections.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    phase: Mapped[Phase] = mapped_column(_str_enum(Phase, "metric_phase"))
    value: Mapped[float] = mapped_column(Float)

    edit: Mapped[Edit] = relationship(back_populates="metrics")


class Checkpoint(Base):
    """A saved model state; retention may delete its file (pruned) but never its row.

    ``model`` names the chain the checkpoint belongs to (the served model's name); ``base_model``
    is the identity of the weights it was made from, which every later checkpoint of the chain shares.
    """

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(MODEL_NAME_MAX_CHARS), default=DEFAULT_MODEL_NAME, index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    pruned: Mapped[bool] = mapped_column(default=False)
    pruned_at: Mapped[datetime | None]
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)

    parent: Mapped[Checkpoint | None] = relationship(remote_side=[id])


class AuditEvent(Base):
    """One append-only, hash-chained record of a state change; see storage.audit.

    The id is assigned by the appender as the previous id plus one, so two appenders that read
    the same chain head collide on the primary key instead of forking the chain.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(50))
    correction_id: Mapped[int | None] = mapped_column(ForeignKey("corrections.id"), index=True)
    edit_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"), index=True)
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    actor: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    mac: Mapped[str | None] = mapped_column(String(64))
    """HMAC-SHA256 of ``hash`` under the audit key (``--audit-key``), kept outside the database;
    None for events written without one. Not part of the hash: it seals the hash."""


class DaemonLease(Base):
    """Who may edit one named model now: one writer at a time, taken over once the lease expires.

    ``generation`` goes up with every new holder, so a writer that lost its lease while busy can
    tell at commit time that its batch is no longer its to record.
    """

    __tablename__ = "daemon_leases"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    generation: Mapped[int] = mapped_column(default=1)
    acquired_at: Mapped[datetime]
    renewed_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class RevertRequest(Base):
    """A request to bring the model back to a checkpoint, performed by the daemon between batches."""

    __tablename__ = "revert_requests"
    __table_args__ = (Index("ix_revert_requests_status", "status", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    requested_by: Mapped[str] = mapped_column(String(100))
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[RevertStatus] = mapped_column(_str_enum(RevertStatus, "revert_status"), default=RevertStatus.PENDING)
    settled_at: Mapped[datetime | None]
    result_checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"))
    reason: Mapped[str | None] = mapped_column(Text)


@sa_event.listens_for(AuditEvent, "before_update")
@sa_event.listens_for(AuditEvent, "before_delete")
def _refuse_audit_rewrite(_mapper: Mapper[AuditEvent], _connection: Connection, target: AuditEvent) -> None:
    """The audit log is append-only: refuse to change or delete an event through the ORM."""
    raise PermissionError(f"audit event {target.id} is append-only; it cannot be changed or deleted")
