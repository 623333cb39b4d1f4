"""bulk imports commit in chunks

A bulk import gets a row in ``imports`` and writes its corrections in short transactions as
``staged`` (invisible to the queue), then completes them all at once; one killed before that is
found ``abandoned`` (storage.imports). Corrections name the import that wrote them.

Revision ID: b7d2c5a9e1f4
Revises: 4f7a9e31c2d8
Create Date: 2026-12-01 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7d2c5a9e1f4"
down_revision: str | Sequence[str] | None = "4f7a9e31c2d8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ("pending", "applying", "applied", "failed", "rejected", "superseded", "reverted")
_AFTER = (*_BEFORE, "staged", "abandoned")


def _status_check(batch_op: object, values: tuple[str, ...]) -> None:
    batch_op.drop_constraint(op.f("ck_corrections_correction_status"), type_="check")  # type: ignore[attr-defined]
    batch_op.create_check_constraint("correction_status", sa.column("status").in_(values))  # type: ignore[attr-defined]


def upgrade() -> None:
    op.create_table(
        "imports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("submitter", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=True),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "running",
                "complete",
                "abandoned",
                name="import_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imports")),
    )
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("import_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_corrections_import_id"), ["import_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_corrections_import_id_imports"), "imports", ["import_id"], ["id"])
        _status_check(batch_op, _AFTER)


def downgrade() -> None:
    op.execute("DELETE FROM corrections WHERE status IN ('staged', 'abandoned')")
    with op.batch_alter_table("corrections", schema=None) as batch_op:
        _status_check(batch_op, _BEFORE)
        batch_op.drop_constraint(batch_op.f("fk_corrections_import_id_imports"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_corrections_import_id"))
        batch_op.drop_column("import_id")
    op.drop_table("imports")
