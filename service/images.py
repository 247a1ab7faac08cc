"""Image writes of the app: imports, the Review upload, labels and quarantine release, each checked
against the signed-in user's role (:mod:`service.access`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from service.access import require


def import_images(session, user_id: int | None, paths: Iterable[str | Path], cohort: str, *,
                  modality: str | None = None, confine_to: Sequence[Path] | None = None):
    """``db.repository.import_images`` as ``user_id`` (a researcher or admin)."""
    from db import repository

    require(session, user_id, "import_images")
    return repository.import_images(session, paths, cohort, modality=modality, confine_to=confine_to)


def upload_for_review(session, user_id: int | None, path: Path, cohort: str = "Uploads"):
    """One file a user opens on Review, imported (de-identified) into ``cohort``; any role may.

    Returns the image row. Raises ValueError with one line for a file that cannot be imported, and
    for one held in quarantine (possible burned-in text): it is stored, but shown only after an
    admin has released it.
    """
    from db import repository

    require(session, user_id, "upload_for_review")
    result = repository.import_images(session, [path], cohort, confine_to=[Path(path).parent])
    if result.rejected:
        raise ValueError(f"{Path(path).name}: {result.rejected[0].reason}")
    accepted = result.accepted[0]
    if accepted.quarantine_reason:
        raise ValueError(f"{Path(path).name} was imported as {accepted.pseudonym} and is held in quarantine "
                         f"({accepted.quarantine_reason}): an admin releases it on the Data page after looking at it")
    return repository.get_image(session, accepted.image_id)


def set_image_label(session, user_id: int | None, image_id: int, label: str | None, split: str | None = None):
    """Class label (and split) of one image, as ``user_id`` (a researcher or admin)."""
    from db import repository

    require(session, user_id, "label_images")
    return repository.set_image_label(session, repository.get_image(session, int(image_id)), label, split,
                                      user=user_id, source="edit")


def import_labels(session, user_id: int | None, cohort: str, data: bytes, *, source: str = "labels.csv",
                  image_col: str | None = None, label_col: str | None = None, partial: bool = False):
    """``db.repository.import_labels`` as ``user_id`` (a researcher or admin): one transaction."""
    from db import repository

    require(session, user_id, "label_images")
    return repository.import_labels(session, cohort, data, image_col=image_col, label_col=label_col,
                                    partial=partial, user=user_id, source=source)


def release_image(session, user_id: int | None, image_id: int):
    """Release an image held for possible burned-in text (an admin, who has looked at it)."""
    from db import repository

    from db.repository.audit import record_event

    user = require(session, user_id, "release_images")
    image = repository.get_image(session, int(image_id))
    was_held, reason = image.quarantined, image.quarantine_reason
    repository.release_image(session, image, user.id)
    if was_held:
        record_event(session, "image_released", image.pseudonym, actor_id=user.id, detail=reason)
    return image
