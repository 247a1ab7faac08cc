"""job_chunks: parts of a job that `softcam worker` processes claim under a lease

Revision ID: 0008_job_chunks
Revises: 0007_reader_studies
Create Date: 2026-12-07 14:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_job_chunks'
down_revision = '0007_reader_studies'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_chunks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('index', sa.Integer(), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('units', sa.Integer(), nullable=False),
        sa.Column('done', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
        sa.Column('result_path', sa.String(length=1000), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_chunks_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_chunks')),
        sa.UniqueConstraint('job_id', 'index', name=op.f('uq_job_chunks_job_id_index')),
    )
    op.create_index('ix_job_chunks_status', 'job_chunks', ['status', 'job_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_job_chunks_status', table_name='job_chunks')
    op.drop_table('job_chunks')
