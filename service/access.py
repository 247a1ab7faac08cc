"""Who may do what: the role matrix, checked on the server for every write.

The pages hide what a role cannot use, but hiding a button protects nothing: every write goes
through a service function that calls :func:`require` first. :func:`require` reads the user's role
and ``active`` flag from the database on each call, so a role changed or an account deactivated
by an admin takes effect on that user's next action, not at their next sign-in.

Roles (``db.repository.ROLES``): clinician, annotator, researcher, admin.
"""

from __future__ import annotations

ALL_ROLES = ("clinician", "annotator", "researcher", "admin")

# action -> roles allowed. Annotators and clinicians draw boxes; importing images, labelling,
# models and jobs are research work; releasing held images and managing accounts is the admin's.
PERMISSIONS: dict[str, tuple[str, ...]] = {
    "edit_annotations": ALL_ROLES,
    "upload_for_review": ALL_ROLES,          # one file opened on Review, stored de-identified
    "change_own_password": ALL_ROLES,
    "import_annotations": ("annotator", "researcher", "admin"),
    "adjudicate": ("annotator", "researcher", "admin"),
    "answer_studies": ALL_ROLES,             # a reader rates maps in a blinded reader study
    "manage_studies": ("researcher", "admin"),
    "import_images": ("researcher", "admin"),
    "label_images": ("researcher", "admin"),
    "register_cohorts": ("researcher", "admin"),
    "manage_models": ("researcher", "admin"),
    "run_jobs": ("researcher", "admin"),
    "release_images": ("admin",),
    "manage_users": ("admin",),
}


class AccessDenied(PermissionError):
    """The signed-in user may not do this (or no one is signed in); the message says which role may."""


def allowed(role: str | None, action: str) -> bool:
    """Whether ``role`` may do ``action`` (a key of :data:`PERMISSIONS`)."""
    if action not in PERMISSIONS:
        raise KeyError(f"unknown action {action!r}")
    return role in PERMISSIONS[action]


def require(session, user_id: int | None, action: str):
    """The active database user ``user_id`` if their current role may do ``action``; else
    :class:`AccessDenied`. Reads the role from the database (never from the caller's session state)."""
    from db.schema import User

    roles = PERMISSIONS.get(action)
    if roles is None:
        raise KeyError(f"unknown action {action!r}")
    what = action.replace("_", " ")
    if user_id is None:
        raise AccessDenied(f"sign in to {what}")
    user = session.get(User, int(user_id))
    if user is None or not user.active:
        raise AccessDenied(f"this account is not active: it cannot {what}")
    if user.role not in roles:
        raise AccessDenied(f"a {user.role} cannot {what} (allowed: {', '.join(roles)})")
    return user
