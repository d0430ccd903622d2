"""jobs.dispatched_at: when a queued job was last handed to the queue

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs queued before this revision get NULL ("not dispatched"): the reaper's sweep sends them
    # again, and a duplicate message is harmless (JobStore.claim runs a job once).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dispatched_at")
