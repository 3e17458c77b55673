"""requests.attempts: generation attempts per row, counted across deliveries of its chunk

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # add_column, not batch: SQLite adds a column with a constant default in place (no table copy),
    # which matters on a store that already holds millions of rows.
    op.add_column("requests", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("attempts")
