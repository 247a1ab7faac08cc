"""jobs.worker: the process running a background job (interrupted jobs are detected on start)

Revision ID: 0003_job_worker
Revises: 0002_jobs_metrics
Create Date: 2026-11-26 15:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_job_worker'
down_revision = '0002_jobs_metrics'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('worker')
