"""jobs.owner (who sees a job, whose cache it may use) and api_batches.request_digest (Idempotency-Key checks)

Jobs made from API batches take their batch's owner; every other job (the CLI's) belongs to the operator,
as do files and batches of a server that had no keys (their owner was "local").

Revision ID: 0010
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(length=64), nullable=False, server_default="operator"))
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", "created_at"])
    op.add_column("api_batches", sa.Column("request_digest", sa.String(length=64), nullable=True))
    for table in ("api_files", "api_batches"):
        op.execute(sa.text(f"UPDATE {table} SET owner = 'operator' WHERE owner = 'local'"))
    op.execute(
        sa.text(
            "UPDATE jobs SET owner = (SELECT b.owner FROM api_batches b WHERE b.job_id = jobs.id) "
            "WHERE id IN (SELECT job_id FROM api_batches WHERE job_id IS NOT NULL)"
        )
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("owner")
    with op.batch_alter_table("api_batches", schema=None) as batch_op:
        batch_op.drop_column("request_digest")
