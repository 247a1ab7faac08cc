"""The database operations the Streamlit pages and the CLI call. Every function takes a ``Session``
(from :func:`db.session.session_scope`) and leaves committing to the caller, so a page action or a
CLI command is one transaction: all of it happens or none of it.

Annotations are :mod:`annotations.geometry` objects in image pixels. Every change to an annotation
writes an audit row (who, when, action, state before and after); saves carry the version the user
started from and fail with :class:`ConflictError` instead of overwriting someone else's change.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import secrets
import socket
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotations.formats import (
    ExportAnnotation,
    ExportImage,
    ImportReport,
    leading_token,
    read_annotations,
    write_annotations,
)
from annotations.geometry import Geometry, Mask, Polygon, geometry_from_json

from .schema import (
    ANNOTATION_KINDS,
    FINISHED_JOB_STATUSES,
    JOB_STATUSES,
    PROVENANCES,
    ROLES,
    Annotation,
    AnnotationAudit,
    CachedMap,
    ClassLabel,
    Cohort,
    Image,
    ImageKey,
    Job,
    MetricResult,
    Model,
    Setting,
    User,
    utcnow,
)

Progress = Callable[[int, int], None]  # (done, total)


class RepositoryError(ValueError):
    """A request the database cannot satisfy; the message is one line meant for the user."""


class NotFoundError(RepositoryError):
    pass


class JobFinishedError(RepositoryError):
    """A job already done, failed or cancelled was asked to change (its worker learns it was cancelled)."""


class ConflictError(RepositoryError):
    """Someone else changed the annotation since the caller loaded it (optimistic concurrency)."""

    def __init__(self, message: str, current: Annotation | None = None):
        super().__init__(message)
        self.current = current


class AnnotationImportError(RepositoryError):
    """An annotation file with bad rows; nothing was imported. ``report`` lists every problem."""

    def __init__(self, report: ImportReport):
        self.report = report
        super().__init__(
            f"{report.source}: {len(report.errors)} bad row(s) of {report.rows}; nothing imported "
            f"(first: {report.errors[0] if report.errors else '-'})"
        )


# --- users -------------------------------------------------------------------------------------

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


# --- cohorts and labels ------------------------------------------------------------------------

def add_cohort(session: Session, name: str, description: str | None = None, modality: str | None = None) -> Cohort:
    """The cohort called ``name``, created if new (idempotent)."""
    name = (name or "").strip()
    if not name:
        raise RepositoryError("cohort name must not be empty")
    cohort = session.scalar(select(Cohort).where(Cohort.name == name))
    if cohort is None:
        cohort = Cohort(name=name, description=description, modality=modality)
        session.add(cohort)
        session.flush()
    return cohort


def get_cohort(session: Session, name_or_id: str | int) -> Cohort:
    cohort = (session.get(Cohort, name_or_id) if isinstance(name_or_id, int)
              else session.scalar(select(Cohort).where(Cohort.name == name_or_id)))
    if cohort is None:
        known = ", ".join(c.name for c in list_cohorts(session)[:10]) or "none yet"
        raise NotFoundError(f"no cohort {name_or_id!r} (known: {known})")
    return cohort


def list_cohorts(session: Session) -> list[Cohort]:
    return list(session.scalars(select(Cohort).order_by(Cohort.name)))


def set_class_labels(session: Session, cohort: Cohort, names: Sequence[str]) -> list[ClassLabel]:
    """Make the cohort's class list exactly ``names`` in that order (model output order)."""
    existing = {label.name: label for label in cohort.labels}
    result = []
    for position, name in enumerate(names):
        label = existing.pop(name, None) or ClassLabel(cohort=cohort, name=name, position=position)
        label.position = position
        session.add(label)
        result.append(label)
    for stale in existing.values():
        session.delete(stale)
    session.flush()
    return result


def ensure_label(session: Session, cohort: Cohort, name: str) -> ClassLabel:
    """The label ``name`` of ``cohort``, appended to its class list if new."""
    label = session.scalar(select(ClassLabel).where(ClassLabel.cohort_id == cohort.id, ClassLabel.name == name))
    if label is None:
        position = session.scalar(select(func.count()).where(ClassLabel.cohort_id == cohort.id)) or 0
        label = ClassLabel(cohort_id=cohort.id, name=name, position=position)
        session.add(label)
        session.flush()
    return label


# --- image name keys (keyed hashes, so names never need storing) -------------------------------

_KEY_SETTING = "name_hmac_key"


def _hmac_key(session: Session) -> bytes:
    setting = session.get(Setting, _KEY_SETTING)
    if setting is None:
        try:
            with session.begin_nested():
                session.add(Setting(key=_KEY_SETTING, value=secrets.token_hex(32)))
        except IntegrityError:  # another process created it first
            pass
        setting = session.get(Setting, _KEY_SETTING)
    return bytes.fromhex(setting.value)


def _digest(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}\x00{value.strip().lower()}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def _name_keys(name: str) -> dict[str, str]:
    base = PurePosixPath(name.replace("\\", "/")).name
    stem = PurePosixPath(base).stem
    return {"name": base, "stem": stem, "token": leading_token(stem)}


_DICOM_ID_KEYWORDS = {"patient": "PatientID", "sop": "SOPInstanceUID", "study": "StudyInstanceUID",
                      "accession": "AccessionNumber"}


def _dicom_ids(data: bytes) -> dict[str, str]:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - ids are optional; load_image already judged the file
        return {}
    ids = {}
    for kind, keyword in _DICOM_ID_KEYWORDS.items():
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            ids[kind] = value
    return ids


# --- images ------------------------------------------------------------------------------------

@dataclass
class AcceptedImage:
    name: str            # as given (shown to the importing user only, never stored for DICOM)
    image_id: int
    pseudonym: str
    new: bool


@dataclass
class RejectedImage:
    name: str
    reason: str


@dataclass
class ImageImportResult:
    accepted: list[AcceptedImage] = field(default_factory=list)
    rejected: list[RejectedImage] = field(default_factory=list)

    @property
    def new(self) -> int:
        return sum(a.new for a in self.accepted)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".bmp", ""}
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}


def _iter_sources(paths: Iterable[str | Path]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(display name, reader) for every file under the given files, folders and zips."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.startswith(".") or child.suffix.lower() not in IMAGE_SUFFIXES | {".zip"}:
                    continue
                yield from _iter_sources([child]) if child.suffix.lower() == ".zip" else [
                    (str(child.relative_to(path)), child.read_bytes)]
        elif path.suffix.lower() == ".zip" and path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:
                    members = sorted(archive.namelist())
            except zipfile.BadZipFile:
                yield path.name, _unreadable("not a valid zip file")
                continue
            for member in members:
                base = PurePosixPath(member).name
                if member.endswith("/") or base.startswith(".") or "__MACOSX" in member:
                    continue
                if PurePosixPath(member).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                yield f"{path.name}:{member}", (lambda p=path, m=member: _read_member(p, m))
        else:
            yield str(path), path.read_bytes


def _read_member(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as zf:
        return zf.read(member)


def _unreadable(reason: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise RepositoryError(reason)

    return read


def _write_atomically(target: Path, data: bytes) -> None:
    if target.exists() and target.stat().st_size == len(data):
        return  # content-addressed: same name, same bytes
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class _PreparedImage:
    name: str
    base: str
    row: dict[str, Any]
    keys: dict[str, str]


def import_images(session: Session, paths: Iterable[str | Path], cohort: Cohort | str, modality: str | None = None,
                  *, progress: Progress | None = None, commit_every: int | None = None) -> ImageImportResult:
    """Import image files, folders (recursive) and zips into ``cohort``.

    Each file is decoded with :func:`softcam_core.imaging.load_image` (rejected with its reason if
    that fails), de-identified with ``deidentified_bytes`` and stored content-addressed as
    ``SOFTCAM_HOME/images/<sha256>.<ext>``. Idempotent: a file already in the cohort (same source or
    stored hash) is accepted again without a new row. DICOM file names are not stored (they often
    carry patient ids); keyed hashes of names and DICOM ids let annotation files still match.

    ``commit_every=N`` (bulk imports, the CLI) commits after every N files and decodes files
    outside any transaction, so a long import never holds the SQLite write lock for more than one
    short batch and annotators keep saving meanwhile. Without it everything stays in the caller's
    transaction.
    """
    from softcam_core.imaging import ImageLoadError, deidentified_bytes, load_image, sniff
    from softcam_core.paths import images_dir, softcam_home

    if isinstance(cohort, str):
        cohort = add_cohort(session, cohort, modality=modality)
    cohort_id = cohort.id
    key = _hmac_key(session)
    known: dict[str, tuple[int, str]] = {}
    for image_id, pseudonym, sha, source_sha in session.execute(
            select(Image.id, Image.pseudonym, Image.sha256, Image.source_sha256).where(Image.cohort_id == cohort_id)):
        known[sha] = known[source_sha] = (image_id, pseudonym)
    if commit_every:
        session.commit()  # decode the first files without holding the write lock
    sources = list(_iter_sources(paths))
    result = ImageImportResult()
    pending: list[_PreparedImage] = []

    def write_pending() -> None:
        for item in pending:
            row = item.row
            existing = session.scalar(select(Image).where(
                Image.cohort_id == cohort_id, or_(Image.sha256 == row["sha256"], Image.source_sha256 == row["source_sha256"])))
            if existing is not None:  # another process imported it meanwhile
                result.accepted.append(AcceptedImage(item.name, existing.id, existing.pseudonym, False))
                continue
            image = Image(cohort_id=cohort_id, **row)
            session.add(image)
            session.flush()
            session.add_all(ImageKey(image_id=image.id, kind=k, digest=d) for k, d in sorted(item.keys.items()))
            session.flush()
            known[image.sha256] = known[image.source_sha256] = (image.id, image.pseudonym)
            result.accepted.append(AcceptedImage(item.name, image.id, image.pseudonym, True))
        pending.clear()
        if commit_every:
            session.commit()

    for done, (name, read) in enumerate(sources, start=1):
        try:
            try:
                data = read()
            except OSError as exc:
                raise RepositoryError(f"cannot read ({exc.strerror or exc})") from None
            source_sha = hashlib.sha256(data).hexdigest()
            if source_sha in known:
                result.accepted.append(AcceptedImage(name, *known[source_sha], False))
                continue
            base = PurePosixPath(name.split(":")[-1].replace("\\", "/")).name
            image = load_image(data, name=base, modality=modality)
            stored = deidentified_bytes(data, name=base)
            sha = hashlib.sha256(stored).hexdigest()
            if sha in known:
                result.accepted.append(AcceptedImage(name, *known[sha], False))
                continue
            kind = sniff(data)
            extension = _EXTENSIONS.get(kind or "", Path(base).suffix.lower() or ".bin")
            target = images_dir() / f"{sha}{extension}"
            _write_atomically(target, stored)
            names = dict(_name_keys(base))
            if kind == "dicom":
                names.update(_dicom_ids(data))
            pending.append(_PreparedImage(name, base, dict(
                pseudonym=f"img-{sha[:16]}", sha256=sha, source_sha256=source_sha, modality=image.modality,
                original_name=None if kind == "dicom" else base, extension=extension,
                stored_path=target.relative_to(softcam_home()).as_posix(), width=image.width, height=image.height,
                burned_in=bool(image.flags.get("burned_in_annotation")), metadata_json=_jsonable(image.metadata),
            ), {k: _digest(key, k, v) for k, v in names.items()}))
        except (ImageLoadError, RepositoryError) as exc:
            message = str(exc)
            prefix = f"{PurePosixPath(name).name}: "
            result.rejected.append(RejectedImage(name, message[len(prefix):] if message.startswith(prefix) else message))
        finally:
            if pending and (not commit_every or len(pending) >= commit_every):
                write_pending()
            if progress:
                progress(done, len(sources))
    if pending:
        write_pending()
    return result


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON types (numpy scalars, tuples, bytes made safe)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def image_path(image: Image) -> Path:
    """Absolute path of the stored (de-identified) file."""
    from softcam_core.paths import softcam_home

    return softcam_home() / image.stored_path


def get_image(session: Session, ref: int | str, cohort: Cohort | None = None) -> Image:
    """Image by id, pseudonym or sha256 (optionally within ``cohort``)."""
    if isinstance(ref, int):
        image = session.get(Image, ref)
    else:
        query = select(Image).where(or_(Image.pseudonym == ref, Image.sha256 == ref))
        if cohort is not None:
            query = query.where(Image.cohort_id == cohort.id)
        image = session.scalars(query.order_by(Image.id)).first()
    if image is None:
        raise NotFoundError(f"no image {ref!r}")
    return image


def _image_filter(session: Session, query, cohort: Cohort | str | None, modality: str | None, label: str | None,
                  split: str | None, search: str | None, annotated: bool | None, not_annotated_by):
    """``query`` (over Image) with :func:`list_images`' filters, all in SQL."""
    if cohort is not None:
        query = query.where(Image.cohort_id == (get_cohort(session, cohort) if isinstance(cohort, str) else cohort).id)
    if modality:
        query = query.where(Image.modality == modality)
    if label is not None:
        query = query.where(Image.label == label)
    if split is not None:
        query = query.where(Image.split == split)
    if search:
        like = f"%{search.strip()}%"
        query = query.where(or_(Image.pseudonym.ilike(like), Image.sha256.ilike(f"{search.strip()}%"),
                                Image.original_name.ilike(like)))
    if annotated is not None:
        live = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None)).exists()
        query = query.where(live if annotated else ~live)
    if not_annotated_by is not None:
        mine = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None),
                                           Annotation.author_id == _user_id(session, not_annotated_by)).exists()
        query = query.where(~mine)
    return query


def list_images(session: Session, cohort: Cohort | str | None = None, *, modality: str | None = None,
                label: str | None = None, split: str | None = None, search: str | None = None,
                annotated: bool | None = None, not_annotated_by: User | str | int | None = None,
                limit: int | None = None, offset: int = 0) -> list[Image]:
    """Images in import order, filtered in one query. ``search`` matches pseudonym, hash prefix or stored
    name; ``annotated``: with (True) or without (False) a live annotation by anyone;
    ``not_annotated_by``: without a live annotation by that user (an annotator's queue)."""
    query = _image_filter(session, select(Image), cohort, modality, label, split, search, annotated, not_annotated_by)
    query = query.order_by(Image.id).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_images(session: Session, cohort: Cohort | str | None = None, *, modality: str | None = None,
                 label: str | None = None, split: str | None = None, search: str | None = None,
                 annotated: bool | None = None, not_annotated_by: User | str | int | None = None) -> int:
    """How many images :func:`list_images` would return with these filters (one COUNT query)."""
    query = _image_filter(session, select(func.count(Image.id)), cohort, modality, label, split, search, annotated,
                          not_annotated_by)
    return int(session.scalar(query) or 0)


def set_image_label(session: Session, image: Image, label: str | None = None, split: str | None = None) -> Image:
    if split is not None and split not in ("train", "val", "test"):
        raise RepositoryError(f"split must be train, val or test, got {split!r}")
    image.label = label
    if split is not None:
        image.split = split
    if label:
        ensure_label(session, image.cohort, label)
    session.flush()
    return image


# --- annotations -------------------------------------------------------------------------------

def annotation_geometry(annotation: Annotation) -> Geometry:
    """The stored geometry as a Box / Point / Polygon / Mask in image pixels."""
    return geometry_from_json(annotation.kind, annotation.geometry)


def _state(annotation: Annotation) -> dict[str, Any]:
    return {
        "kind": annotation.kind, "geometry": annotation.geometry, "label": annotation.label,
        "version": annotation.version, "deleted": annotation.deleted_at is not None,
        "provenance": annotation.provenance, "source_file": annotation.source_file,
        "image_id": annotation.image_id,
    }


def _audit(session: Session, annotation: Annotation, user_id: int | None, action: str,
           before: dict | None, after: dict | None) -> None:
    session.add(AnnotationAudit(annotation_id=annotation.id, user_id=user_id, at=utcnow(), action=action,
                                before=before, after=after))


def _check_geometry(geometry: Geometry, image: Image) -> None:
    kind = getattr(geometry, "kind", None)
    if kind not in ANNOTATION_KINDS:
        raise RepositoryError(f"unsupported geometry {type(geometry).__name__}; expected Box, Point, Polygon or Mask")
    if kind == "mask" and image.width and geometry.shape != (image.height, image.width):
        raise RepositoryError(f"mask is {geometry.shape[1]}x{geometry.shape[0]} but image {image.pseudonym} is "
                              f"{image.width}x{image.height}")


def _who(session: Session, user_id: int | None) -> str:
    user = session.get(User, user_id) if user_id is not None else None
    return user.username if user is not None else "an unknown user"


def save_annotation(session: Session, image: Image | int, geometry: Geometry, label: str | None = None,
                    user: User | str | int | None = None, *, annotation_id: int | None = None,
                    expected_version: int | None = None, provenance: str = "drawn",
                    source_file: str | None = None) -> Annotation:
    """Create (``annotation_id`` None) or update an annotation; writes an audit row.

    An update must pass ``expected_version``: the version the user loaded. If the stored version
    differs (someone saved or deleted in between) nothing is written and :class:`ConflictError`
    names who changed it and when. The check and the write are one conditional UPDATE, so two
    processes cannot both win.
    """
    image = session.get(Image, image) if isinstance(image, int) else image
    if image is None:
        raise NotFoundError("no such image")
    if provenance not in PROVENANCES:
        raise RepositoryError(f"provenance {provenance!r} is not one of {', '.join(PROVENANCES)}")
    _check_geometry(geometry, image)
    user_id = _user_id(session, user)
    now = utcnow()
    if annotation_id is None:
        annotation = Annotation(image_id=image.id, kind=geometry.kind, geometry=geometry.to_json(), label=label,
                                author_id=user_id, updated_by_id=user_id, created_at=now, updated_at=now,
                                provenance=provenance, source_file=source_file)
        session.add(annotation)
        session.flush()
        _audit(session, annotation, user_id, "create", None, _state(annotation))
        session.flush()
        return annotation

    if expected_version is None:
        raise RepositoryError("updating an annotation needs expected_version (the version you loaded)")
    return _change(session, annotation_id, expected_version, user_id, "update", deleted=False,
                   kind=geometry.kind, geometry=geometry.to_json(), label=label)


def _change(session: Session, annotation_id: int, expected_version: int, user_id: int | None, action: str, *,
            deleted: bool, **values) -> Annotation:
    """The one optimistic-locking path of every annotation change (update, delete, restore).

    The annotation must be at ``expected_version`` (the version the user loaded) and live
    (``deleted=False``) or deleted (``deleted=True``); the change is then an ORM UPDATE guarded by
    ``version_id_col`` (``WHERE version = expected_version``), so two sessions cannot both win: the
    loser gets :class:`ConflictError` naming who changed it and when. Writes the audit row.
    """
    from sqlalchemy.orm.exc import StaleDataError

    current = _reload_or_missing(session, annotation_id)
    if current.version != expected_version or (current.deleted_at is not None) != deleted:
        _raise_conflict(session, annotation_id, expected_version)
    before = _state(current)
    for name, value in dict(values, updated_at=utcnow(), updated_by_id=user_id).items():
        setattr(current, name, value)
    try:
        session.flush()
    except StaleDataError:
        # another transaction committed a change between our read and our UPDATE (PostgreSQL: read
        # committed). The failed flush voids this transaction: roll it back (the caller's scope is
        # all-or-nothing anyway) and read who won for the message
        session.rollback()
        _raise_conflict(session, annotation_id, expected_version)
    _audit(session, current, user_id, action, before, _state(current))
    session.flush()
    return current


def _reload(session: Session, annotation_id: int) -> Annotation:
    return session.scalars(select(Annotation).where(Annotation.id == annotation_id)
                           .execution_options(populate_existing=True)).one()


def _reload_or_missing(session: Session, annotation_id: int) -> Annotation:
    current = session.scalars(select(Annotation).where(Annotation.id == annotation_id)
                              .execution_options(populate_existing=True)).first()
    if current is None:
        raise NotFoundError(f"no annotation {annotation_id}")
    return current


def _raise_conflict(session: Session, annotation_id: int, expected_version: int) -> None:
    current = _reload(session, annotation_id)
    who = _who(session, current.updated_by_id)
    when = current.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    what = "deleted" if current.deleted_at is not None else "changed"
    raise ConflictError(
        f"annotation {annotation_id} was {what} by {who} at {when} (now version {current.version}, you edited "
        f"version {expected_version}); reload it and apply your edit again", current)


def delete_annotation(session: Session, annotation_id: int, user: User | str | int | None = None, *,
                      expected_version: int) -> Annotation:
    """Soft delete: the row stays (``deleted_at`` set, version + 1) with an audit entry."""
    return _change(session, annotation_id, expected_version, _user_id(session, user), "delete", deleted=False,
                   deleted_at=utcnow())


def restore_annotation(session: Session, annotation_id: int, user: User | str | int | None = None, *,
                       expected_version: int) -> Annotation:
    """Undo a soft delete (audited)."""
    return _change(session, annotation_id, expected_version, _user_id(session, user), "restore", deleted=True,
                   deleted_at=None)


def list_annotations(session: Session, image: Image | int, *, include_deleted: bool = False,
                     author: User | str | int | None = None) -> list[Annotation]:
    """Annotations of one image, oldest first."""
    image_id = image if isinstance(image, int) else image.id
    query = select(Annotation).where(Annotation.image_id == image_id)
    if not include_deleted:
        query = query.where(Annotation.deleted_at.is_(None))
    if author is not None:
        query = query.where(Annotation.author_id == _user_id(session, author))
    return list(session.scalars(query.order_by(Annotation.id)))


def annotation_history(session: Session, annotation_id: int) -> list[AnnotationAudit]:
    """Every change of one annotation, oldest first."""
    return list(session.scalars(select(AnnotationAudit).where(AnnotationAudit.annotation_id == annotation_id)
                                .order_by(AnnotationAudit.at, AnnotationAudit.id)))


def next_unannotated_image(session: Session, cohort: Cohort | str, user: User | str | int | None = None, *,
                           after_id: int | None = None, skip: Iterable[int] = ()) -> Image | None:
    """Annotator queue: the first image (import order, after ``after_id``) with no live annotation by
    ``user`` (by anyone when ``user`` is None); ``skip`` lists image ids the annotator passed over."""
    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    live = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None))
    if user is not None:
        live = live.where(Annotation.author_id == _user_id(session, user))
    query = select(Image).where(Image.cohort_id == cohort.id, ~live.exists())
    if after_id is not None:
        query = query.where(Image.id > after_id)
    skip = list(skip)
    if skip:
        query = query.where(Image.id.not_in(skip))
    return session.scalars(query.order_by(Image.id).limit(1)).first()


# --- annotation import / export ----------------------------------------------------------------

@dataclass
class _Resolved:
    key: int
    width: int | None
    height: int | None


class CohortResolver:
    """Finds the image an annotation file names, within one cohort: pseudonym, content hash (stored
    or source file), file name, stem, DICOM PatientID / SOP / Study UID (RSNA ``patientId``), or,
    for masks, a unique leading token of the stem."""

    def __init__(self, session: Session, cohort: Cohort):
        self.key = _hmac_key(session)
        images = list(session.scalars(select(Image).where(Image.cohort_id == cohort.id)))
        self.images = {i.id: i for i in images}
        self.by_text: dict[str, set[int]] = {}
        for i in images:
            for text in (i.pseudonym, i.sha256, i.source_sha256):
                self.by_text.setdefault(text.lower(), set()).add(i.id)
        self.by_digest: dict[str, set[int]] = {}
        if images:
            rows = session.execute(select(ImageKey.digest, ImageKey.image_id).join(Image)
                                   .where(Image.cohort_id == cohort.id))
            for digest, image_id in rows:
                self.by_digest.setdefault(digest, set()).add(image_id)
        self.cohort = cohort

    def _lookup(self, kind: str, value: str) -> set[int]:
        return self.by_digest.get(_digest(self.key, kind, value), set()) if value else set()

    def __call__(self, ref: str, fuzzy: bool = False) -> _Resolved | None:
        base = PurePosixPath(ref.strip().replace("\\", "/")).name
        stem = PurePosixPath(base).stem
        steps = [
            lambda: self.by_text.get(ref.strip().lower(), set()) | self.by_text.get(stem.lower(), set()),
            lambda: self._lookup("name", base),
            lambda: self._lookup("stem", stem) or self._lookup("stem", base),
            lambda: self._lookup("patient", ref) | self._lookup("sop", ref) | self._lookup("study", ref),
        ]
        if fuzzy:
            steps.append(lambda: self._lookup("token", leading_token(stem)))
        for step in steps:
            found = step()
            if len(found) > 1:
                names = ", ".join(sorted(self.images[i].pseudonym for i in found)[:5])
                raise LookupError(f"{ref!r} matches {len(found)} images in cohort {self.cohort.name!r} ({names})")
            if found:
                image = self.images[next(iter(found))]
                return _Resolved(image.id, image.width, image.height)
        return None


def _dedupe_key(image_id: int, kind: str, label: str | None, geometry: dict) -> tuple:
    return (image_id, kind, label or "", json.dumps(geometry, sort_keys=True))


@dataclass
class AnnotationImportResult:
    report: ImportReport
    added: int = 0
    duplicates: int = 0
    images: int = 0


def import_annotations(session: Session, path: str | Path, fmt: str, cohort: Cohort | str,
                       user: User | str | int | None = None, *, label: str | None = None,
                       progress: Progress | None = None) -> AnnotationImportResult:
    """Import an annotation file into ``cohort``: all rows or none.

    Every row is validated first (:func:`annotations.formats.read_annotations`); any bad row raises
    :class:`AnnotationImportError` carrying the per-row report and nothing is written. Rows equal
    to a live annotation of the same image (kind, label, exact coordinates) are skipped, so a
    re-import adds nothing. Boxes derived from a mask point at the mask (``derived_from_id``).

    When ``session`` has not begun a transaction yet, reading and validating the file happens in a
    separate read-only transaction, so a slow file (thousands of masks) does not hold the SQLite
    write lock; only the final bulk write does.
    """
    path = Path(path)
    if session.in_transaction():
        cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
        report = read_annotations(path, fmt, CohortResolver(session, cohort), label=label)
    else:
        reader = Session(bind=session.get_bind().execution_options(sqlite_begin="DEFERRED"))
        try:
            cohort_id = get_cohort(reader, cohort if isinstance(cohort, str) else cohort.id).id
            report = read_annotations(path, fmt, CohortResolver(reader, get_cohort(reader, cohort_id)), label=label)
        finally:
            reader.close()
        cohort = get_cohort(session, cohort_id)
    if report.errors:
        raise AnnotationImportError(report)
    user_id = _user_id(session, user)
    result = AnnotationImportResult(report, images=len(report.images_seen))
    image_ids = {a.image for a in report.annotations}
    existing: dict[tuple, int] = {}
    if image_ids:
        for a in session.scalars(select(Annotation).where(Annotation.image_id.in_(image_ids),
                                                          Annotation.deleted_at.is_(None))):
            existing.setdefault(_dedupe_key(a.image_id, a.kind, a.label, a.geometry), a.id)
    now = utcnow()
    # Plan first: which rows are new, and which mask each derived box came from (by plan index).
    plan: list[dict[str, Any]] = []
    derived_from: list[int | None] = []     # plan index of the source mask, for derived rows
    mask_ref: int | str | None = None        # plan index (new mask) or "id:<n>" (mask already stored)
    for parsed in report.annotations:
        geometry_json = parsed.geometry.to_json()
        key = _dedupe_key(parsed.image, parsed.geometry.kind, parsed.label, geometry_json)
        known = existing.get(key)
        if known is not None:
            result.duplicates += 1
            if parsed.geometry.kind == "mask":
                mask_ref = f"id:{known}"
            continue
        existing[key] = -1
        if parsed.geometry.kind == "mask":
            mask_ref = len(plan)
        plan.append(dict(image_id=parsed.image, kind=parsed.geometry.kind, geometry=geometry_json, label=parsed.label,
                         author_id=user_id, updated_by_id=user_id, created_at=now, updated_at=now, version=1,
                         provenance="derived" if parsed.derived else "imported", source_file=path.name,
                         derived_from_id=None))
        derived_from.append(mask_ref if parsed.derived else None)
    # Bulk INSERT ... RETURNING in chunks (one round trip per chunk on SQLite and PostgreSQL); a mask
    # always precedes its derived boxes in the plan, so its id is known by the time they are written.
    ids: dict[int, int] = {}  # plan index -> new annotation id
    sources = [i for i, ref in enumerate(derived_from) if ref is None]
    derived = [i for i, ref in enumerate(derived_from) if ref is not None]
    chunk = 250
    batches = [sources[k:k + chunk] for k in range(0, len(sources), chunk)]
    batches += [derived[k:k + chunk] for k in range(0, len(derived), chunk)]  # after every mask has its id
    written = 0
    for indices in batches:
        rows = [plan[i] for i in indices]
        for i, row in zip(indices, rows):
            ref = derived_from[i]
            if ref is not None:
                row["derived_from_id"] = int(ref[3:]) if isinstance(ref, str) else ids[ref]
        new_ids = session.scalars(insert(Annotation).returning(Annotation.id, sort_by_parameter_order=True), rows).all()
        ids.update(zip(indices, new_ids))
        session.execute(insert(AnnotationAudit), [
            dict(annotation_id=new_id, user_id=user_id, at=now, action="create", before=None,
                 after={"kind": r["kind"], "geometry": r["geometry"], "label": r["label"], "version": 1,
                        "deleted": False, "provenance": r["provenance"], "source_file": r["source_file"],
                        "image_id": r["image_id"]})
            for new_id, r in zip(new_ids, rows)])
        written += len(rows)
        if progress:
            progress(written, len(plan))
    result.added = len(plan)
    session.flush()
    return result


def export_images(session: Session, cohort: Cohort | str) -> list[ExportImage]:
    """Every image of the cohort with its live annotations, keyed by pseudonym only."""
    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    images = list_images(session, cohort)
    by_image: dict[int, list[ExportAnnotation]] = {i.id: [] for i in images}
    if images:
        query = (select(Annotation).join(Image).where(Image.cohort_id == cohort.id, Annotation.deleted_at.is_(None))
                 .order_by(Annotation.id))
        for a in session.scalars(query):
            by_image[a.image_id].append(ExportAnnotation(annotation_geometry(a), a.label))
    return [ExportImage(i.pseudonym, i.extension, i.width, i.height, by_image[i.id]) for i in images]


def export_annotations(session: Session, fmt: str, cohort: Cohort | str, out: str | Path) -> Path:
    """Write the cohort's live box annotations as ``fmt`` to ``out`` (pseudonymous image ids only)."""
    return write_annotations(Path(out), fmt, export_images(session, cohort))


def export_dicom_seg(session: Session, cohort: Cohort | str, out_dir: str | Path) -> list[Path]:
    """One DICOM SEG (``<out_dir>/<pseudonym>-seg.dcm``) per DICOM image of the cohort that has live
    mask or polygon annotations, built on the stored de-identified file (so it carries pseudonyms
    only). Non-DICOM images are skipped. Returns the written paths."""
    import pydicom

    from annotations.formats import write_dicom_seg

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    written = []
    for image in list_images(session, cohort):
        if image.extension != ".dcm":
            continue
        masks = []
        for annotation in list_annotations(session, image):
            geometry = annotation_geometry(annotation)
            if isinstance(geometry, Mask):
                masks.append((annotation.label, geometry.array))
            elif isinstance(geometry, Polygon):
                masks.append((annotation.label, geometry.to_mask(image.height, image.width)))
        if masks:
            source = pydicom.dcmread(image_path(image))
            written.append(write_dicom_seg(Path(out_dir) / f"{image.pseudonym}-seg.dcm", source, masks))
    return written


# --- models ------------------------------------------------------------------------------------

def register_model(session: Session, name: str, checkpoint_path: str | Path, *, modality: str | None = None,
                   metadata: dict | None = None, default: bool = False) -> Model:
    """Record a checkpoint (its sha256 computed now). Re-registering a name updates path, hash and
    metadata. ``default=True`` makes it the default for its modality."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise NotFoundError(f"{path}: checkpoint file not found")
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(name=name, checkpoint_path=str(path), sha256="", modality=modality)
        session.add(model)
    model.checkpoint_path = str(path.resolve())
    from softcam_core.models import file_sha256

    model.sha256 = file_sha256(path)
    model.modality = modality or model.modality
    model.metadata_json = _jsonable(metadata or model.metadata_json or {})
    session.flush()
    if default:
        set_default_model(session, model)
    return model


def list_models(session: Session, modality: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.name)
    if modality:
        query = query.where(Model.modality == modality)
    return list(session.scalars(query))


def get_model(session: Session, ref: int | str) -> Model:
    model = session.get(Model, ref) if isinstance(ref, int) else session.scalar(select(Model).where(Model.name == ref))
    if model is None:
        raise NotFoundError(f"no model {ref!r}")
    return model


def set_default_model(session: Session, model: Model | int | str) -> Model:
    """Make ``model`` the one default of its modality (others of that modality lose the flag)."""
    model = model if isinstance(model, Model) else get_model(session, model)
    same_modality = Model.modality.is_(None) if model.modality is None else Model.modality == model.modality
    # ORM-enabled UPDATE: loaded Model objects in this session are updated in place as well
    session.execute(update(Model).where(same_modality, Model.id != model.id).values(is_default=False))
    model.is_default = True
    session.flush()
    return model


def get_default_model(session: Session, modality: str | None) -> Model | None:
    query = select(Model).where(Model.is_default.is_(True))
    query = query.where(Model.modality.is_(None) if modality is None else Model.modality == modality)
    return session.scalars(query.order_by(Model.id)).first()


# --- cached explanation maps -------------------------------------------------------------------

def params_hash(params: dict | None) -> str:
    """sha256 of the canonical JSON of a method's options (sorted keys)."""
    return hashlib.sha256(json.dumps(params or {}, sort_keys=True, default=str).encode()).hexdigest()


def cache_map(session: Session, model: Model, image: Image, method: str, target: int, saliency: np.ndarray,
              *, params: dict | None = None, seconds: float | None = None) -> CachedMap:
    """Store a float32 map as ``SOFTCAM_HOME/maps/<model>/<image>/<method>-<target>-<hash>.npy``."""
    from softcam_core.paths import softcam_home

    digest = params_hash(params)
    safe_method = re.sub(r"[^A-Za-z0-9_.-]", "_", method)
    relative = Path("maps") / str(model.id) / str(image.id) / f"{safe_method}-{int(target)}-{digest[:16]}.npy"
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(saliency, dtype=np.float32))
    _write_atomically_replace(softcam_home() / relative, buffer.getvalue())
    row = session.scalar(select(CachedMap).where(
        CachedMap.model_id == model.id, CachedMap.image_id == image.id, CachedMap.method == method,
        CachedMap.target == int(target), CachedMap.params_hash == digest))
    if row is None:
        row = CachedMap(model_id=model.id, image_id=image.id, method=method, target=int(target), params_hash=digest,
                        path=str(relative))
        session.add(row)
    row.path, row.seconds, row.created_at = str(relative), seconds, utcnow()
    session.flush()
    return row


def _write_atomically_replace(target: Path, data: bytes) -> None:
    if target.exists():
        target.unlink()
    _write_atomically(target, data)


def get_cached_map(session: Session, model: Model, image: Image, method: str, target: int,
                   params: dict | None = None) -> tuple[np.ndarray, float | None] | None:
    """``(map float32, seconds it took)`` if cached and the file is still there, else None."""
    from softcam_core.paths import softcam_home

    row = session.scalar(select(CachedMap).where(
        CachedMap.model_id == model.id, CachedMap.image_id == image.id, CachedMap.method == method,
        CachedMap.target == int(target), CachedMap.params_hash == params_hash(params)))
    if row is None:
        return None
    path = softcam_home() / row.path
    if not path.is_file():
        return None
    return np.load(path), row.seconds


# --- metric results ----------------------------------------------------------------------------

def save_metric_results(session: Session, model: Model, rows: Iterable[dict[str, Any]], *,
                        cohort: Cohort | None = None, job: Job | None = None) -> int:
    """Store metric values; each row: ``method, metric, value`` and optional ``image_id, target, params``."""
    count = 0
    for row in rows:
        value = row.get("value")
        value = None if value is None or (isinstance(value, float) and not np.isfinite(value)) else float(value)
        session.add(MetricResult(model_id=model.id, cohort_id=cohort.id if cohort else None,
                                 image_id=row.get("image_id"), job_id=job.id if job else None, method=row["method"],
                                 metric=row["metric"], target=row.get("target"), value=value,
                                 params=_jsonable(row.get("params") or {})))
        count += 1
    session.flush()
    return count


def list_metric_results(session: Session, model: Model, *, cohort: Cohort | None = None, method: str | None = None,
                        metric: str | None = None, per_image: bool | None = None) -> list[MetricResult]:
    query = select(MetricResult).where(MetricResult.model_id == model.id)
    if cohort is not None:
        query = query.where(MetricResult.cohort_id == cohort.id)
    if method:
        query = query.where(MetricResult.method == method)
    if metric:
        query = query.where(MetricResult.metric == metric)
    if per_image is not None:
        query = query.where(MetricResult.image_id.is_not(None) if per_image else MetricResult.image_id.is_(None))
    return list(session.scalars(query.order_by(MetricResult.id)))


# --- background jobs ---------------------------------------------------------------------------

def create_job(session: Session, kind: str, *, total: int | None = None, params: dict | None = None,
               user: User | str | int | None = None, message: str | None = None,
               worker: str | None = None) -> Job:
    """A ``queued`` job row. ``worker``: :func:`this_worker` of the process that will run it, which
    lets :func:`close_interrupted_jobs` tell a job whose process died from one still running."""
    now = utcnow()
    job = Job(kind=kind, status="queued", progress_done=0, progress_total=total, params=_jsonable(params or {}),
              user_id=_user_id(session, user), message=message, created_at=now, updated_at=now, worker=worker)
    session.add(job)
    session.flush()
    return job


def update_job(session: Session, job_id: int, *, done: int | None = None, total: int | None = None,
               message: str | None = None, status: str | None = None, result_path: str | Path | None = None,
               error: str | None = None) -> Job:
    """Record progress; status ``running`` stamps ``started_at`` once, ``done``/``failed``/``cancelled``
    stamp ``finished_at``. Commit after each call so other sessions (a reloaded page) see it.

    A finished job (done, failed, cancelled) never changes again: :class:`JobFinishedError`. That is
    how a worker learns that its job was cancelled (its next progress report raises)."""
    job = session.get(Job, job_id, populate_existing=True, with_for_update=True)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    if status is not None and status not in JOB_STATUSES:
        raise RepositoryError(f"job status {status!r} is not one of {', '.join(JOB_STATUSES)}")
    if job.status in FINISHED_JOB_STATUSES:
        raise JobFinishedError(f"job {job_id} is {job.status}" + (f": {job.message}" if job.message else ""))
    now = utcnow()
    if status is not None:
        job.status = status
        if status == "running" and job.started_at is None:
            job.started_at = now
        if status in ("done", "failed", "cancelled"):
            job.finished_at = now
    if done is not None:
        job.progress_done = int(done)
    if total is not None:
        job.progress_total = int(total)
    if message is not None:
        job.message = message
    if result_path is not None:
        job.result_path = str(result_path)
    if error is not None:
        job.error = error
    job.updated_at = now
    session.flush()
    return job


def cancel_job(session: Session, job_id: int, user: User | str | int | None = None) -> Job:
    """Mark a queued or running job ``cancelled``; its worker stops at its next progress report.

    Raises :class:`JobFinishedError` when the job has already finished (nothing to cancel)."""
    who = session.get(User, _user_id(session, user)) if user is not None else None
    by = f"cancelled by {who.username}" if who is not None else "cancelled"
    return update_job(session, job_id, status="cancelled", message=by)


def this_worker() -> str:
    """``host:pid:start`` of this process (start: its start time in clock ticks since boot, where
    ``/proc`` tells it), recorded in the jobs it runs so a later process can tell if it still lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def worker_alive(worker: str) -> bool:
    """Whether the process named by :func:`this_worker`'s string still runs. Another host's process
    cannot be checked from here and counts as alive; a reused pid is told apart by its start time."""
    host, _, rest = worker.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return not start or _process_start(pid) in ("", start)


def close_interrupted_jobs(session: Session, alive: Callable[[str], bool] = worker_alive) -> list[Job]:
    """Mark ``failed`` the queued or running jobs whose worker process has stopped (an app restart or
    crash) so they do not show progress forever; jobs without a recorded worker are left alone.

    Returns the jobs it closed."""
    query = select(Job).where(Job.status.in_(("queued", "running")), Job.worker.is_not(None))
    closed = []
    for job in session.scalars(query):
        if not alive(job.worker):
            closed.append(update_job(
                session, job.id, status="failed",
                error=f"interrupted: the app process that ran it ({job.worker}) stopped before it finished "
                      f"({job.progress_done}/{job.progress_total or '?'} done); start it again"))
    return closed


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def list_jobs(session: Session, kind: str | None = None, status: str | Sequence[str] | None = None,
              limit: int = 50) -> list[Job]:
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status.in_([status] if isinstance(status, str) else list(status)))
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))
