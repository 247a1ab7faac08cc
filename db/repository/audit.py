"""The security audit log (``audit_log``): sign-ins, account changes, quarantine releases."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from db.schema import AuditEvent, utcnow


def record_event(session: Session, event: str, subject: str, *, actor_id: int | None = None,
                 detail: str | None = None, now: datetime | None = None) -> AuditEvent:
    """Append one row: ``event`` (e.g. ``sign_in_failed``), ``subject`` (an account name or a keyed
    hash of a typed one; at most 200 characters), the acting user's id and a short ``detail``."""
    row = AuditEvent(event=event, subject=subject[:200], actor_id=actor_id,
                     detail=detail[:500] if detail else None, at=now or utcnow())
    session.add(row)
    session.flush()
    return row
