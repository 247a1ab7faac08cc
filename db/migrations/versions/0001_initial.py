"""initial schema: cohorts, labels, users, images (+ name keys), annotations + audit, models, cached maps

Revision ID: 0001_initial
Revises: 
Create Date: 2026-11-26 09:59:48.905603
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op



revision = '0001_initial'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('cohorts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('modality', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cohorts')),
    sa.UniqueConstraint('name', name=op.f('uq_cohorts_name'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('checkpoint_path', sa.String(length=1000), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=32), nullable=True),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', name=op.f('uq_models_name'))
    )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_models_sha256'), ['sha256'], unique=False)

    op.create_table('settings',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_settings'))
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=120), nullable=False),
    sa.Column('display_name', sa.String(length=200), nullable=True),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('password_hash', sa.String(length=400), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('class_labels',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cohort_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('colour', sa.String(length=16), nullable=True),
    sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], name=op.f('fk_class_labels_cohort_id_cohorts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_class_labels')),
    sa.UniqueConstraint('cohort_id', 'name', name=op.f('uq_class_labels_cohort_id_name'))
    )
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cohort_id', sa.Integer(), nullable=False),
    sa.Column('pseudonym', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('source_sha256', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=32), nullable=False),
    sa.Column('original_name', sa.String(length=500), nullable=True),
    sa.Column('extension', sa.String(length=16), nullable=False),
    sa.Column('stored_path', sa.String(length=500), nullable=False),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('split', sa.String(length=16), nullable=True),
    sa.Column('burned_in', sa.Boolean(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], name=op.f('fk_images_cohort_id_cohorts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('cohort_id', 'pseudonym', name=op.f('uq_images_cohort_id_pseudonym')),
    sa.UniqueConstraint('cohort_id', 'sha256', name=op.f('uq_images_cohort_id_sha256'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_cohort_id'), ['cohort_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_pseudonym'), ['pseudonym'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_source_sha256'), ['source_sha256'], unique=False)

    op.create_table('annotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('geometry', sa.JSON(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('author_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('updated_by_id', sa.Integer(), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(), nullable=True),
    sa.Column('provenance', sa.String(length=16), nullable=False),
    sa.Column('source_file', sa.String(length=500), nullable=True),
    sa.Column('derived_from_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], name=op.f('fk_annotations_author_id_users')),
    sa.ForeignKeyConstraint(['derived_from_id'], ['annotations.id'], name=op.f('fk_annotations_derived_from_id_annotations')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_annotations_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['updated_by_id'], ['users.id'], name=op.f('fk_annotations_updated_by_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotations'))
    )
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotations_author_id'), ['author_id'], unique=False)
        batch_op.create_index('ix_annotations_image_live', ['image_id', 'deleted_at'], unique=False)

    op.create_table('cached_maps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=64), nullable=False),
    sa.Column('target', sa.Integer(), nullable=False),
    sa.Column('params_hash', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_cached_maps_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_cached_maps_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cached_maps')),
    sa.UniqueConstraint('model_id', 'image_id', 'method', 'target', 'params_hash', name=op.f('uq_cached_maps_model_id_image_id_method_target_params_hash'))
    )
    with op.batch_alter_table('cached_maps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cached_maps_image_id'), ['image_id'], unique=False)

    op.create_table('image_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_image_keys_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_image_keys')),
    sa.UniqueConstraint('image_id', 'kind', 'digest', name=op.f('uq_image_keys_image_id_kind_digest'))
    )
    with op.batch_alter_table('image_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_image_keys_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_image_keys_image_id'), ['image_id'], unique=False)

    op.create_table('annotation_audit',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('annotation_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('before', sa.JSON(), nullable=True),
    sa.Column('after', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['annotation_id'], ['annotations.id'], name=op.f('fk_annotation_audit_annotation_id_annotations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_annotation_audit_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotation_audit'))
    )
    with op.batch_alter_table('annotation_audit', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotation_audit_annotation_id'), ['annotation_id'], unique=False)
    # key of the image-name hashes (db.repository): made once here so concurrent first imports agree
    op.bulk_insert(sa.table('settings', sa.column('key', sa.String), sa.column('value', sa.Text)),
                   [{'key': 'name_hmac_key', 'value': secrets.token_hex(32)}])


def downgrade() -> None:

    with op.batch_alter_table('annotation_audit', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_annotation_audit_annotation_id'))

    op.drop_table('annotation_audit')
    with op.batch_alter_table('image_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_image_keys_image_id'))
        batch_op.drop_index(batch_op.f('ix_image_keys_digest'))

    op.drop_table('image_keys')
    with op.batch_alter_table('cached_maps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cached_maps_image_id'))

    op.drop_table('cached_maps')
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.drop_index('ix_annotations_image_live')
        batch_op.drop_index(batch_op.f('ix_annotations_author_id'))

    op.drop_table('annotations')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_source_sha256'))
        batch_op.drop_index(batch_op.f('ix_images_sha256'))
        batch_op.drop_index(batch_op.f('ix_images_pseudonym'))
        batch_op.drop_index(batch_op.f('ix_images_cohort_id'))

    op.drop_table('images')
    op.drop_table('class_labels')
    op.drop_table('users')
    op.drop_table('settings')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_sha256'))

    op.drop_table('models')
    op.drop_table('cohorts')

