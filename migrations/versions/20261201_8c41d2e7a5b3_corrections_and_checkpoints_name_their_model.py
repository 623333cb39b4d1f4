"""corrections and checkpoints name their model

Several models on one database: every correction names the model it is for, and every checkpoint
the chain (the served model's name) it belongs to. Existing rows belong to ``default``. Where one
database already held checkpoint chains of several base models, the chain of the newest checkpoint
becomes ``default`` and each other chain is named by its base model's identity. Lease rows, which
were keyed by the base model's identity, are dropped: upgrade with no daemon running; daemons take
new leases by name when they start.

Revision ID: 8c41d2e7a5b3
Revises: d3d96c49f802
Create Date: 2026-12-01 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8c41d2e7a5b3"
down_revision: str | Sequence[str] | None = "d3d96c49f802"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=100), nullable=False, server_default="default"))
        batch_op.drop_index("ix_corrections_claim_order")
        batch_op.create_index("ix_corrections_claim_order", ["status", "model", "priority", "submitted_at"])
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=100), nullable=False, server_default="default"))
        batch_op.create_index(batch_op.f("ix_checkpoints_model"), ["model"], unique=False)
    connection = op.get_bind()
    newest = connection.execute(sa.text("SELECT base_model FROM checkpoints ORDER BY id DESC LIMIT 1")).scalar()
    if newest is not None:
        connection.execute(
            sa.text("UPDATE checkpoints SET model = substr(base_model, 1, 100) WHERE base_model != :newest"),
            {"newest": newest},
        )
    op.execute("DELETE FROM daemon_leases")
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        batch_op.alter_column("model", server_default=None)
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.alter_column("model", server_default=None)


def downgrade() -> None:
    op.execute("DELETE FROM daemon_leases")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_model"))
        batch_op.drop_column("model")
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        batch_op.drop_index("ix_corrections_claim_order")
        batch_op.create_index("ix_corrections_claim_order", ["status", "priority", "submitted_at"])
        batch_op.drop_column("model")
