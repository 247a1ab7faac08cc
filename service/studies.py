"""Reader studies for the pages: every write checks the user's role first (service.access)."""

from __future__ import annotations

from service.access import require


def create_study(session, user_id: int | None, name: str, cohort: str, model_path: str, methods: list[str], *,
                 seed: int = 0, images: int | None = None):
    """A new blinded reader study (``db.repository.create_study``); researchers and admins."""
    from db import repository

    user = require(session, user_id, "manage_studies")
    return repository.create_study(session, name, cohort, model_path, methods, seed=seed, images=images, user=user.id)


def record_answer(session, user_id: int | None, study_id: int, image_id: int, method: str, rating: int, *,
                  point: tuple[float, float] | None = None, seconds: float | None = None):
    """One rating of the signed-in reader (``db.repository.record_answer``)."""
    from db import repository

    user = require(session, user_id, "answer_studies")
    return repository.record_answer(session, study_id, user.id, image_id, method, rating, point=point, seconds=seconds)
