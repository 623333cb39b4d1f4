"""audit events carry a keyed MAC

An optional HMAC-SHA256 of each event's hash under a key kept outside the database (`--audit-key`),
so that rewriting the chain and recomputing its hashes without the key is detected. Existing
events have none.

Revision ID: 4f7a9e31c2d8
Revises: 8c41d2e7a5b3
Create Date: 2026-12-01 04:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4f7a9e31c2d8"
down_revision: str | Sequence[str] | None = "8c41d2e7a5b3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mac", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_column("mac")
