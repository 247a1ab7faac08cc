"""image_label_history: every change of an image's class label or split (who, when, before, after)

Revision ID: 0006_label_history
Revises: 0005_audit_log
Create Date: 2026-12-07 09:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_label_history'
down_revision = '0005_audit_log'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'image_label_history',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('field', sa.String(length=16), nullable=False),
        sa.Column('before', sa.String(length=200), nullable=True),
        sa.Column('after', sa.String(length=200), nullable=True),
        sa.Column('user_id', sa.Integer(), nullable=True),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('source', sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_image_label_history_image_id_images'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_image_label_history_user_id_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_image_label_history')),
    )
    op.create_index('ix_image_label_history_image_at', 'image_label_history', ['image_id', 'at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_image_label_history_image_at', table_name='image_label_history')
    op.drop_table('image_label_history')
