"""daemon leases and revert requests

The daemon's one-writer-per-model lease, and revert requests queued for the daemon to perform.

Revision ID: d3d96c49f802
Revises: 6a1f00c99e55
Create Date: 2026-11-26 04:40:39.377263
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d3d96c49f802"
down_revision: str | Sequence[str] | None = "6a1f00c99e55"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daemon_leases",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_daemon_leases")),
    )
    op.create_table(
        "revert_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=100), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending", "done", "refused", name="revert_status", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result_checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"], ["checkpoints.id"], name=op.f("fk_revert_requests_checkpoint_id_checkpoints")
        ),
        sa.ForeignKeyConstraint(
            ["result_checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_revert_requests_result_checkpoint_id_checkpoints"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revert_requests")),
    )
    with op.batch_alter_table("revert_requests", schema=None) as batch_op:
        batch_op.create_index("ix_revert_requests_status", ["status", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("revert_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_revert_requests_status")

    op.drop_table("revert_requests")
    op.drop_table("daemon_leases")
