"""images: no original file name and no hash of the identified file; burned-in quarantine

The original name of a PNG/JPEG/TIFF file and the SHA-256 of the file as given (before
de-identification) could identify a patient or confirm that a known file was imported: both go
(annotation files still match images through the keyed name hashes in image_keys, and imports
deduplicate on the de-identified content). Images that may carry burned-in text are held in
quarantine until an admin releases them.

Revision ID: 0004_phi_quarantine
Revises: 0003_job_worker
Create Date: 2026-12-07 06:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_phi_quarantine'
down_revision = '0003_job_worker'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ALTER TABLE, not batch mode: batch mode copies and drops the images table, and on SQLite
    # with foreign keys on, dropping it would cascade-delete every annotation (SQLite >= 3.35 drops
    # columns in place)
    op.drop_index(op.f('ix_images_source_sha256'), table_name='images')
    op.drop_column('images', 'source_sha256')
    op.drop_column('images', 'original_name')
    op.add_column('images', sa.Column('quarantine_reason', sa.String(length=200), nullable=True))
    op.add_column('images', sa.Column('released_by', sa.Integer(), nullable=True))
    op.add_column('images', sa.Column('released_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column('images', 'released_at')
    op.drop_column('images', 'released_by')
    op.drop_column('images', 'quarantine_reason')
    op.add_column('images', sa.Column('original_name', sa.String(length=500), nullable=True))
    op.add_column('images', sa.Column('source_sha256', sa.String(length=64), nullable=False, server_default=''))
    op.create_index(op.f('ix_images_source_sha256'), 'images', ['source_sha256'], unique=False)
