"""file expiry (api_files.expires_at, api_batches.output_expires_after) and the webhook delivery queue

Files stored before this revision keep no expiry (expires_at NULL): only uploads from now on get the
30-day default of batch input files.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_files", sa.Column("expires_at", sa.Float(), nullable=True))
    op.create_index("ix_api_files_expires_at", "api_files", ["expires_at"])
    op.add_column("api_batches", sa.Column("output_expires_after", sa.Integer(), nullable=True))
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("batch_id", "type", name="uq_webhook_deliveries_batch_type"),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_api_files_expires_at", table_name="api_files")
    with op.batch_alter_table("api_files", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
    with op.batch_alter_table("api_batches", schema=None) as batch_op:
        batch_op.drop_column("output_expires_after")
