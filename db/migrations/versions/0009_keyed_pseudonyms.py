"""images: pseudonyms keyed (HMAC under names.key), no longer a prefix of the stored file's sha256

A PNG or JPEG without metadata is stored byte for byte, so ``img-`` + sha256[:16] could be
recomputed from the source file by anyone holding it, linking every export row back to the file
(whose name often carries the patient's). Images whose pseudonym still has that old form get
``db.repository.images.pseudonym_for``; the old pseudonym is kept only as a keyed hash in
``image_keys`` (kind ``legacy_pseudonym``), so annotation files and tables exported before still
find their images. Databases without such images never read the key.

Revision ID: 0009_keyed_pseudonyms
Revises: 0008_job_chunks
Create Date: 2026-12-07 23:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009_keyed_pseudonyms'
down_revision = '0008_job_chunks'
branch_labels = None
depends_on = None

_images = sa.table('images', sa.column('id', sa.Integer), sa.column('pseudonym', sa.String),
                   sa.column('sha256', sa.String))
_keys = sa.table('image_keys', sa.column('image_id', sa.Integer), sa.column('kind', sa.String),
                 sa.column('digest', sa.String))
_settings = sa.table('settings', sa.column('key', sa.String), sa.column('value', sa.Text))


def upgrade() -> None:
    # the live functions, not a copy: the pseudonyms made here must equal those made by new imports
    from db.repository.images import LEGACY_PSEUDONYM_KIND, _digest, names_key, pseudonym_for

    connection = op.get_bind()
    old = [(i, p, sha) for i, p, sha in connection.execute(sa.select(_images.c.id, _images.c.pseudonym, _images.c.sha256))
           if p == f"img-{sha[:16]}"]
    if not old:
        return
    legacy = connection.execute(sa.select(_settings.c.value).where(_settings.c.key == 'name_hmac_key')).scalar()
    key = names_key(legacy=legacy.encode('ascii') if legacy else None)
    for image_id, pseudonym, sha in old:
        connection.execute(_images.update().where(_images.c.id == image_id).values(pseudonym=pseudonym_for(key, sha)))
        connection.execute(_keys.insert().values(image_id=image_id, kind=LEGACY_PSEUDONYM_KIND,
                                                 digest=_digest(key, LEGACY_PSEUDONYM_KIND, pseudonym)))


def downgrade() -> None:
    connection = op.get_bind()
    migrated = sa.select(_keys.c.image_id).where(_keys.c.kind == 'legacy_pseudonym')
    connection.execute(_images.update().where(_images.c.id.in_(migrated))
                       .values(pseudonym=sa.literal('img-') + sa.func.substr(_images.c.sha256, 1, 16)))
    connection.execute(_keys.delete().where(_keys.c.kind == 'legacy_pseudonym'))
