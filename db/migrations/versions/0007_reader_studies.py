"""reader_studies, reader_answers: blinded reader studies of the maps (ratings 1-5, optional point)

Revision ID: 0007_reader_studies
Revises: 0006_label_history
Create Date: 2026-12-07 12:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_reader_studies'
down_revision = '0006_label_history'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'reader_studies',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('cohort_id', sa.Integer(), nullable=False),
        sa.Column('model_path', sa.String(length=1000), nullable=False),
        sa.Column('methods', sa.JSON(), nullable=False),
        sa.Column('image_ids', sa.JSON(), nullable=False),
        sa.Column('seed', sa.Integer(), nullable=False),
        sa.Column('created_by_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], name=op.f('fk_reader_studies_cohort_id_cohorts'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_reader_studies_created_by_id_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_reader_studies')),
        sa.UniqueConstraint('name', name=op.f('uq_reader_studies_name')),
    )
    op.create_table(
        'reader_answers',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('reader_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('method', sa.String(length=64), nullable=False),
        sa.Column('rating', sa.Integer(), nullable=False),
        sa.Column('point_x', sa.Float(), nullable=True),
        sa.Column('point_y', sa.Float(), nullable=True),
        sa.Column('seconds', sa.Float(), nullable=True),
        sa.Column('answered_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['reader_studies.id'], name=op.f('fk_reader_answers_study_id_reader_studies'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['reader_id'], ['users.id'], name=op.f('fk_reader_answers_reader_id_users')),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_reader_answers_image_id_images'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_reader_answers')),
        sa.UniqueConstraint('study_id', 'reader_id', 'image_id', 'method',
                            name=op.f('uq_reader_answers_study_id_reader_id_image_id_method')),
    )
    op.create_index(op.f('ix_reader_answers_study_id'), 'reader_answers', ['study_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_reader_answers_study_id'), table_name='reader_answers')
    op.drop_table('reader_answers')
    op.drop_table('reader_studies')
