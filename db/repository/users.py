"""Users: local accounts, password hashes, roles."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.repository.base import NotFoundError, RepositoryError
from db.schema import (
    ROLES,
    User,
)

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """scrypt with a random 16-byte salt: ``"scrypt$n$r$p$<salt hex>$<64-byte key hex>"``."""
    if not password:
        raise RepositoryError("password must not be empty")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=64)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def check_password(stored: str | None, password: str) -> bool:
    """Constant-time comparison of ``password`` with a :func:`hash_password` string."""
    if not stored or not password:
        return False
    try:
        scheme, n, r, p, salt_hex, key_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        key = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
                             dklen=len(key_hex) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(key.hex(), key_hex)


def create_user(session: Session, username: str, role: str, password: str | None = None,
                display_name: str | None = None) -> User:
    """New user with one of :data:`db.schema.ROLES`; ``password`` None makes a user who cannot sign in."""
    username = (username or "").strip()
    if not username:
        raise RepositoryError("username must not be empty")
    if role not in ROLES:
        raise RepositoryError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise RepositoryError(f"user {username!r} already exists")
    user = User(username=username, role=role, display_name=display_name,
                password_hash=hash_password(password) if password else None)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def get_or_create_user(session: Session, username: str, role: str = "annotator") -> User:
    return get_user(session, username) or create_user(session, username, role)


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def set_password(session: Session, username: str, password: str) -> User:
    user = get_user(session, username)
    if user is None:
        raise NotFoundError(f"no user {username!r}")
    user.password_hash = hash_password(password)
    return user


def verify_password(session: Session, username: str, password: str) -> User | None:
    """The active user if ``password`` matches, else None (unknown users cost the same time)."""
    user = get_user(session, username)
    stored = user.password_hash if user is not None and user.active else None
    if stored is None:
        check_password(hash_password("timing-equaliser"), password)
        return None
    return user if check_password(stored, password) else None


def _user_id(session: Session, user: User | str | int | None) -> int | None:
    if user is None or isinstance(user, int):
        return user
    if isinstance(user, User):
        return user.id
    found = get_user(session, user)
    if found is None:
        raise NotFoundError(f"no user {user!r}")
    return found.id
