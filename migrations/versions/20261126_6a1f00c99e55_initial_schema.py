"""initial schema

Revision ID: 6a1f00c99e55
Revises: nothing (first revision)
Create Date: 2026-11-26 04:13:54.536878
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6a1f00c99e55"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pruned", sa.Boolean(), nullable=False),
        sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["parent_id"], ["checkpoints.id"], name=op.f("fk_checkpoints_parent_id_checkpoints")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
    )
    op.create_table(
        "edits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("hparams", sa.JSON(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("checkpoint_before_id", sa.Integer(), nullable=True),
        sa.Column("checkpoint_after_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["checkpoint_after_id"], ["checkpoints.id"], name=op.f("fk_edits_checkpoint_after_id_checkpoints")
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_before_id"],
            ["checkpoints.id"],
            name=op.f("fk_edits_checkpoint_before_id_checkpoints"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_edits")),
    )
    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.String(length=1000), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("original_answer", sa.String(length=200), nullable=True),
        sa.Column("paraphrases", sa.JSON(), nullable=False),
        sa.Column("neighbors", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("submitter", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "applying",
                "applied",
                "failed",
                "rejected",
                "superseded",
                "reverted",
                name="correction_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("edit_id", sa.Integer(), nullable=True),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name=op.f("fk_corrections_edit_id_edits")),
        sa.ForeignKeyConstraint(
            ["superseded_by"], ["corrections.id"], name=op.f("fk_corrections_superseded_by_corrections")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
    )
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        batch_op.create_index("ix_corrections_claim_order", ["status", "priority", "submitted_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_corrections_edit_id"), ["edit_id"], unique=False)
        batch_op.create_index("ix_corrections_subject", ["subject"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("correction_id", sa.Integer(), nullable=True),
        sa.Column("edit_id", sa.Integer(), nullable=True),
        sa.Column("checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"], ["checkpoints.id"], name=op.f("fk_audit_events_checkpoint_id_checkpoints")
        ),
        sa.ForeignKeyConstraint(
            ["correction_id"], ["corrections.id"], name=op.f("fk_audit_events_correction_id_corrections")
        ),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name=op.f("fk_audit_events_edit_id_edits")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_checkpoint_id"), ["checkpoint_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_correction_id"), ["correction_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_edit_id"), ["edit_id"], unique=False)

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("edit_id", sa.Integer(), nullable=False),
        sa.Column("correction_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "phase",
            sa.Enum("pre", "post", name="metric_phase", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["correction_id"], ["corrections.id"], name=op.f("fk_metrics_correction_id_corrections")
        ),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name=op.f("fk_metrics_edit_id_edits")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
    )
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_metrics_correction_id"), ["correction_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_metrics_edit_id"), ["edit_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_metrics_edit_id"))
        batch_op.drop_index(batch_op.f("ix_metrics_correction_id"))

    op.drop_table("metrics")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_edit_id"))
        batch_op.drop_index(batch_op.f("ix_audit_events_correction_id"))
        batch_op.drop_index(batch_op.f("ix_audit_events_checkpoint_id"))

    op.drop_table("audit_events")
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        batch_op.drop_index("ix_corrections_subject")
        batch_op.drop_index(batch_op.f("ix_corrections_edit_id"))
        batch_op.drop_index("ix_corrections_claim_order")

    op.drop_table("corrections")
    op.drop_table("edits")
    op.drop_table("checkpoints")
