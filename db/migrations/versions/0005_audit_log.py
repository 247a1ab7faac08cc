"""audit_log: sign-ins (failed ones rate-limit the account), quarantine releases, account changes;
users.oidc_subject: the OIDC subject an account signs in as

Revision ID: 0005_audit_log
Revises: 0004_phi_quarantine
Create Date: 2026-12-07 06:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_audit_log'
down_revision = '0004_phi_quarantine'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_log',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('event', sa.String(length=40), nullable=False),
        sa.Column('subject', sa.String(length=200), nullable=False),
        sa.Column('actor_id', sa.Integer(), nullable=True),
        sa.Column('detail', sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_audit_log_at'), 'audit_log', ['at'], unique=False)
    op.create_index('ix_audit_log_subject_at', 'audit_log', ['subject', 'at'], unique=False)
    # plain ALTER, not batch mode: copying and dropping users would break the annotations' foreign keys
    op.add_column('users', sa.Column('oidc_subject', sa.String(length=255), nullable=True))
    op.create_index('uq_users_oidc_subject', 'users', ['oidc_subject'], unique=True)


def downgrade() -> None:
    op.drop_index('uq_users_oidc_subject', table_name='users')
    op.drop_column('users', 'oidc_subject')
    op.drop_index('ix_audit_log_subject_at', table_name='audit_log')
    op.drop_index(op.f('ix_audit_log_at'), table_name='audit_log')
    op.drop_table('audit_log')
