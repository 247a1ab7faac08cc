"""Signed, expiring sign-in tokens, so a signed-in user stays signed in across a browser reload.

Streamlit's session state dies with the browser tab's connection; the token lives in the page URL
(``?session=...``) instead and is checked on every fresh session. A token is
``v1.<user id>.<expiry, POSIX seconds>.<password stamp>.<HMAC-SHA256 signature>``, signed with the
server secret ``SOFTCAM_SESSION_KEY`` (else ``session.key`` in the key folder, made on first use). The
password stamp is a digest of the account's password hash: changing the password ends every
session. Expired, tampered or foreign tokens, and tokens of disabled or deleted accounts, are
refused. The user's role is read from the database, never from the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
import time

SESSION_SECONDS = 8 * 3600  # one working day
_VERSION = "v1"


def session_key() -> bytes:
    from softcam_core.paths import secret_key

    return secret_key("session.key", "SOFTCAM_SESSION_KEY")


def password_stamp(password_hash: str | None) -> str:
    """12 hex characters identifying the account's current password hash (no secret is derivable)."""
    return hashlib.sha256((password_hash or "").encode("utf-8")).hexdigest()[:12]


def _signature(key: bytes, body: str) -> str:
    digest = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def issue_token(user_id: int, password_hash: str | None, *, key: bytes | None = None, now: float | None = None,
                lifetime: float = SESSION_SECONDS) -> str:
    """A token for ``user_id`` valid ``lifetime`` seconds from ``now`` (default: the clock)."""
    expires = int((time.time() if now is None else now) + lifetime)
    body = f"{_VERSION}.{int(user_id)}.{expires}.{password_stamp(password_hash)}"
    return f"{body}.{_signature(key or session_key(), body)}"


def token_user_id(token: str | None, *, key: bytes | None = None, now: float | None = None) -> tuple[int, str] | None:
    """``(user id, password stamp)`` of a well-signed, unexpired token, else None (never raises)."""
    if not token or not isinstance(token, str) or len(token) > 200:
        return None
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != _VERSION:
        return None
    body, signature = ".".join(parts[:4]), parts[4]
    if not hmac.compare_digest(_signature(key or session_key(), body), signature):
        return None
    try:
        user_id, expires = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if (time.time() if now is None else now) >= expires:
        return None
    return user_id, parts[3]


def user_for_token(session, token: str | None, *, key: bytes | None = None, now: float | None = None):
    """The active ``db.schema.User`` a token signs in, else None: bad or expired token, unknown or
    disabled account, or a password changed since the token was issued."""
    from db.schema import User

    found = token_user_id(token, key=key, now=now)
    if found is None:
        return None
    user_id, stamp = found
    user = session.get(User, user_id)
    if user is None or not user.active or not hmac.compare_digest(password_stamp(user.password_hash), stamp):
        return None
    return user


MIN_PASSWORD_LENGTH = 8


def change_password(session, user_id: int | None, current: str, new: str) -> None:
    """Change the signed-in user's own password. ValueError (one line) when ``current`` is wrong or
    ``new`` is shorter than :data:`MIN_PASSWORD_LENGTH`; tokens issued before stop working (their
    stamp is of the old hash)."""
    from db import repository
    from service.access import require

    user = require(session, user_id, "change_own_password")
    if repository.verify_password(session, user.username, current) is None:
        raise ValueError("the current password is wrong")
    if len(new) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the new password must have at least {MIN_PASSWORD_LENGTH} characters")
    repository.set_password(session, user.username, new)


FIRST_ADMIN = "admin"
FIRST_ADMIN_PASSWORD_FILE = "first-admin-password"


def create_first_admin(session) -> tuple[str, Path | None] | None:
    """On a database without any user, create the account ``admin`` (role admin). Its password is
    ``SOFTCAM_ADMIN_PASSWORD`` when set, else a random one (16 URL-safe characters) written once to
    ``first-admin-password`` in the key folder (mode 0600; delete it after signing in). There is no
    published default password. Returns ``(user name, password file or None)``; None when users exist."""
    import os
    import secrets

    from db import repository
    from softcam_core.paths import key_dir

    if repository.list_users(session):
        return None
    password = os.environ.get("SOFTCAM_ADMIN_PASSWORD")
    path = None
    if not password:
        password = secrets.token_urlsafe(12)
        path = key_dir() / FIRST_ADMIN_PASSWORD_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        os.chmod(path, 0o600)
    repository.create_user(session, FIRST_ADMIN, "admin", password, display_name="Administrator")
    return FIRST_ADMIN, path


# rate limit of failed sign-ins, per account name typed: this many failures within the window lock
# the name for the rest of the window (even with the right password), so guessing a password costs
# MAX_FAILED_SIGN_INS tries per SIGN_IN_WINDOW
MAX_FAILED_SIGN_INS = 5
SIGN_IN_WINDOW_MINUTES = 15


@dataclass(frozen=True)
class SignInResult:
    """``user`` (the database account) when the sign-in succeeded, else None with ``message``."""

    user: object | None
    message: str | None = None


def audit_subject(session, typed_name: str) -> str:
    """What the audit log records for a typed account name: the name when such an account exists,
    else ``unknown:<keyed hash>`` (a password typed into the name field is never stored in clear)."""
    from db import repository
    from db.repository.images import _digest, _hmac_key

    name = typed_name.strip()
    if repository.get_user(session, name) is not None:
        return name
    return "unknown:" + _digest(_hmac_key(session), "sign-in", name)[:16]


def sign_in(session, typed_name: str, password: str, *, now=None) -> SignInResult:
    """Check a local sign-in and write it to the audit log (ok, failed, or refused while locked).

    After :data:`MAX_FAILED_SIGN_INS` failures of one typed name within
    :data:`SIGN_IN_WINDOW_MINUTES` minutes, that name is refused until the window has passed, the
    right password included. The messages do not tell whether an account exists. The caller commits
    the session whatever the outcome (the failures must be kept).
    """
    from datetime import timedelta

    from sqlalchemy import func, select

    from db import repository
    from db.repository.audit import record_event
    from db.schema import AuditEvent, utcnow

    now = now or utcnow()
    subject = audit_subject(session, typed_name)
    since = now - timedelta(minutes=SIGN_IN_WINDOW_MINUTES)
    failures = session.scalar(select(func.count(AuditEvent.id)).where(
        AuditEvent.subject == subject, AuditEvent.event == "sign_in_failed", AuditEvent.at > since)) or 0
    if failures >= MAX_FAILED_SIGN_INS:
        record_event(session, "sign_in_locked", subject, now=now)
        return SignInResult(None, f"Too many failed sign-ins for this name: try again in {SIGN_IN_WINDOW_MINUTES} minutes.")
    account = repository.verify_password(session, typed_name.strip(), password)
    if account is None:
        record_event(session, "sign_in_failed", subject, now=now)
        return SignInResult(None, "Unknown user name or wrong password.")
    record_event(session, "sign_in", subject, actor_id=account.id, now=now)
    return SignInResult(account)


NO_ROLE = "none"  # an identity the provider vouches for, but no admin has given an account yet


def oidc_account(session, claims: dict):
    """The active account an OIDC identity signs in as, or None (no role until an admin grants one).

    Matches the provider's subject (``sub``) against ``users.oidc_subject``; else a *verified* email
    (``email_verified`` true) against an account named by that email that is not linked to another
    subject. Never a display-name claim: a user whose provider name is "admin" is not the admin.
    """
    from sqlalchemy import select

    from db import repository
    from db.schema import User

    subject = str(claims.get("sub") or "").strip()
    if subject:
        user = session.scalar(select(User).where(User.oidc_subject == subject))
        if user is not None:
            return user if user.active else None
    email = str(claims.get("email") or "").strip()
    if email and claims.get("email_verified") is True:
        user = repository.get_user(session, email)
        if user is not None and user.active and user.oidc_subject in (None, subject or None):
            return user
    return None


def current_account(session, user_id: int | None):
    """The account behind a signed-in session, re-read on every request: None when it was
    deactivated or deleted (the session ends), else the row with its current role."""
    from db.schema import User

    if user_id is None:
        return None
    user = session.get(User, int(user_id))
    return user if user is not None and user.active else None
