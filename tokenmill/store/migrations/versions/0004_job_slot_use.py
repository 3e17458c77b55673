"""jobs.decode_steps / slot_steps / filled_slot_steps: how full the engines kept their batches for a job

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("decode_steps", "slot_steps", "filled_slot_steps")


def upgrade() -> None:
    for name in COLUMNS:  # constant defaults: SQLite adds them in place, no table copy
        op.add_column("jobs", sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.drop_column(name)
