"""Images: import (decoded, de-identified, content-addressed), name keys, listing, class labels."""

from __future__ import annotations

import hashlib
import hmac
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence

from sqlalchemy import func, or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from annotations.archive import ArchiveError, read_member, safe_members
from annotations.formats import (
    leading_token,
)
from db.repository.base import (
    NotFoundError,
    Progress,
    RepositoryError,
    _jsonable,
    _write_atomically,
)
from db.repository.cohorts import add_cohort, get_cohort
from db.repository.users import _user_id
from db.schema import (
    Annotation,
    Cohort,
    Image,
    ImageKey,
    Setting,
    User,
)

_KEY_SETTING = "name_hmac_key"


def _hmac_key(session: Session) -> bytes:
    """The key of the file-name and identifier hashes (``names.key`` in the key folder, see
    :func:`softcam_core.paths.secret_key`; ``SOFTCAM_NAMES_KEY`` overrides). Databases made before the
    key folder kept it in their ``settings`` table, beside the hashes it protects: such a key moves
    to the key folder and its row is deleted (on the first writable session)."""
    setting = session.get(Setting, _KEY_SETTING)
    key = names_key(legacy=setting.value.encode("ascii") if setting else None)
    if setting is not None:
        try:
            with session.begin_nested():
                session.delete(setting)
        except DBAPIError:  # a read-only session: the next write deletes it
            pass
    return key


def names_key(legacy: bytes | None = None) -> bytes:
    """The raw HMAC key behind pseudonyms and name hashes (32 bytes from ``names.key``, made on first
    use, or ``legacy`` if the key folder has none yet). :func:`_hmac_key` is the session-aware entry;
    this one exists for the migration that re-keys old pseudonyms."""
    from softcam_core.paths import secret_key

    key = secret_key("names.key", "SOFTCAM_NAMES_KEY", legacy=legacy)
    return bytes.fromhex(key.decode("ascii")) if _is_hex(key) else hashlib.sha256(key).digest()


def _is_hex(key: bytes) -> bool:
    try:
        bytes.fromhex(key.decode("ascii"))
    except ValueError:
        return False
    return True


def _digest(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}\x00{value.strip().lower()}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def pseudonym_for(key: bytes, sha256: str) -> str:
    """An image's pseudonym: ``img-`` + 16 hex of HMAC-SHA256(names key, sha256 of the stored file).

    Keyed because a PNG or JPEG without metadata is stored unchanged: an unkeyed hash of its bytes
    would let anyone holding the source files (named after patients) link every export row back to
    them. The same stored file gets the same pseudonym in every cohort of one server."""
    return "img-" + _digest(key, "pseudonym", sha256)[:16]


LEGACY_PSEUDONYM_KIND = "legacy_pseudonym"  # image_keys kind: a pseudonym from before keying (migration 0009)


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
    name: str            # as given: shown to the importing user only, never stored
    image_id: int
    pseudonym: str
    new: bool
    quarantine_reason: str | None = None  # held for possible burned-in text (see Image.quarantine_reason)


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

    @property
    def quarantined(self) -> list[AcceptedImage]:
        """Accepted images held in quarantine (possible burned-in text) until an admin releases them."""
        return [a for a in self.accepted if a.quarantine_reason]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".bmp", ""}
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm"}


def _iter_sources(paths: Iterable[str | Path], confine_to: Sequence[Path] | None = None) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(display name, reader) for every file under the given files, folders and zips; with
    ``confine_to`` (folders), a file whose real path (symbolic links resolved) lies in none of them
    is not read."""
    from softcam_core.paths import within

    def allowed(path: Path) -> bool:
        return confine_to is None or any(within(path, Path(root).resolve()) for root in confine_to)

    for raw in paths:
        path = Path(raw)
        if not allowed(path):
            yield path.name, _unreadable("not under the import folder")
            continue
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.startswith(".") or child.suffix.lower() not in IMAGE_SUFFIXES | {".zip"}:
                    continue
                if not allowed(child):
                    yield str(child.relative_to(path)), _unreadable("a link that leaves the import folder: not read")
                    continue
                yield from _iter_sources([child]) if child.suffix.lower() == ".zip" else [
                    (str(child.relative_to(path)), child.read_bytes)]
        elif path.suffix.lower() == ".zip" and path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:
                    members, skipped = safe_members(archive, path.name)
            except zipfile.BadZipFile:
                yield path.name, _unreadable("not a valid zip file")
                continue
            except ArchiveError as exc:
                yield path.name, _unreadable(str(exc).removeprefix(f"{path.name}: "))
                continue
            for member, reason in skipped:
                yield f"{path.name}:{member}", _unreadable(f"not read: {reason}")
            for info in sorted(members, key=lambda m: m.filename):
                member = info.filename
                base = PurePosixPath(member).name
                if base.startswith(".") or "__MACOSX" in member:
                    continue
                if PurePosixPath(member).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                yield f"{path.name}:{member}", (lambda p=path, m=member: _read_member(p, m))
        else:
            yield str(path), path.read_bytes


def _read_member(archive: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(archive) as zf:
            return read_member(zf, zf.getinfo(member), archive.name)
    except (ArchiveError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise RepositoryError(str(exc).removeprefix(f"{archive.name}: ")) from None


def _unreadable(reason: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise RepositoryError(reason)

    return read


@dataclass
class _PreparedImage:
    name: str
    base: str
    row: dict[str, Any]
    keys: dict[str, str]


def import_images(session: Session, paths: Iterable[str | Path], cohort: Cohort | str, modality: str | None = None,
                  *, progress: Progress | None = None, commit_every: int | None = None,
                  confine_to: Sequence[Path] | None = None, dates: str = "shift") -> ImageImportResult:
    """Import image files, folders (recursive) and zips into ``cohort``.

    Each file is decoded with :func:`softcam_core.imaging.load_image` (rejected with its reason if
    that fails), de-identified with ``deidentified_bytes`` and stored content-addressed as
    ``SOFTCAM_HOME/images/<sha256>.<ext>``. Idempotent: a file already in the cohort (same
    de-identified content; de-identification is deterministic for one key) is accepted again without
    a new row. Neither file names (they often carry patient names or ids) nor a hash of the file as
    given are stored; keyed hashes of names and DICOM ids (key apart from the database) let
    annotation files still match. An image that may show burned-in text
    (:func:`softcam_core.imaging.burned_in_text_risk`) is held in quarantine: reported in the result,
    hidden from every listing until an admin releases it (:func:`release_image`).

    ``commit_every=N`` (bulk imports, the CLI) commits after every N files and decodes files
    outside any transaction, so a long import never holds the SQLite write lock for more than one
    short batch and annotators keep saving meanwhile. Without it everything stays in the caller's
    transaction. ``confine_to`` (the app's imports: the import root and the upload folder): files
    whose real path lies in none of these folders are rejected, not read. ``dates``: ``"shift"``
    (default: DICOM dates move back by a per-patient offset) or ``"remove"`` (the table's actions).
    """
    from softcam_core.imaging import (
        ImageLoadError,
        burned_in_text_risk,
        deidentified_bytes,
        load_image,
        sniff,
    )
    from softcam_core.paths import images_dir, softcam_home

    # one cohort, one modality (add_cohort refuses another); files imported without one take the cohort's
    cohort = add_cohort(session, cohort if isinstance(cohort, str) else cohort.name, modality=modality)
    modality = modality or cohort.modality
    cohort_id = cohort.id
    key = _hmac_key(session)
    known: dict[str, tuple[int, str, str | None]] = {}
    for image_id, pseudonym, sha, reason in session.execute(
            select(Image.id, Image.pseudonym, Image.sha256, Image.quarantine_reason).where(Image.cohort_id == cohort_id)):
        known[sha] = (image_id, pseudonym, reason)
    if commit_every:
        session.commit()  # decode the first files without holding the write lock
    sources = list(_iter_sources(paths, confine_to))
    result = ImageImportResult()
    pending: list[_PreparedImage] = []

    def write_pending() -> None:
        for item in pending:
            row = item.row
            existing = session.scalar(select(Image).where(Image.cohort_id == cohort_id, Image.sha256 == row["sha256"]))
            if existing is not None:  # another process imported it meanwhile
                result.accepted.append(AcceptedImage(item.name, existing.id, existing.pseudonym, False, existing.quarantine_reason))
                continue
            image = Image(cohort_id=cohort_id, **row)
            session.add(image)
            session.flush()
            session.add_all(ImageKey(image_id=image.id, kind=k, digest=d) for k, d in sorted(item.keys.items()))
            session.flush()
            known[image.sha256] = (image.id, image.pseudonym, image.quarantine_reason)
            result.accepted.append(AcceptedImage(item.name, image.id, image.pseudonym, True, image.quarantine_reason))
        pending.clear()
        if commit_every:
            session.commit()

    for done, (name, read) in enumerate(sources, start=1):
        try:
            try:
                data = read()
            except OSError as exc:
                raise RepositoryError(f"cannot read ({exc.strerror or exc})") from None
            base = PurePosixPath(name.split(":")[-1].replace("\\", "/")).name
            image = load_image(data, name=base, modality=modality)
            stored = deidentified_bytes(data, name=base, dates=dates)
            sha = hashlib.sha256(stored).hexdigest()
            if sha in known:
                image_id, pseudonym, reason = known[sha]
                result.accepted.append(AcceptedImage(name, image_id, pseudonym, False, reason))
                continue
            kind = sniff(data)
            extension = _EXTENSIONS.get(kind or "", Path(base).suffix.lower() or ".bin")
            target = images_dir() / f"{sha}{extension}"
            _write_atomically(target, stored)
            names = dict(_name_keys(base))
            if kind == "dicom":
                names.update(_dicom_ids(data))
            pending.append(_PreparedImage(name, base, dict(
                pseudonym=pseudonym_for(key, sha), sha256=sha, modality=image.modality, extension=extension,
                stored_path=target.relative_to(softcam_home()).as_posix(), width=image.width, height=image.height,
                burned_in=bool(image.flags.get("burned_in_annotation")), metadata_json=_jsonable(image.metadata),
                quarantine_reason=burned_in_text_risk(image.metadata),
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


def image_path(image: Image) -> Path:
    """Absolute path of the stored (de-identified) file."""
    from softcam_core.paths import softcam_home

    return softcam_home() / image.stored_path


def get_image(session: Session, ref: int | str, cohort: Cohort | None = None) -> Image:
    """Image by id, pseudonym (or one from before pseudonyms were keyed) or sha256 (optionally within
    ``cohort``)."""
    if isinstance(ref, int):
        image = session.get(Image, ref)
    else:
        query = select(Image).where(or_(Image.pseudonym == ref, Image.sha256 == ref))
        if cohort is not None:
            query = query.where(Image.cohort_id == cohort.id)
        image = session.scalars(query.order_by(Image.id)).first()
        if image is None and ref.startswith("img-"):  # a pseudonym from before keying, kept as a keyed hash
            legacy = select(ImageKey.image_id).where(ImageKey.kind == LEGACY_PSEUDONYM_KIND, ImageKey.digest ==
                                                     _digest(_hmac_key(session), LEGACY_PSEUDONYM_KIND, ref))
            query = select(Image).where(Image.id.in_(legacy))
            if cohort is not None:
                query = query.where(Image.cohort_id == cohort.id)
            image = session.scalars(query.order_by(Image.id)).first()
    if image is None:
        raise NotFoundError(f"no image {ref!r}")
    return image


def _visible():
    """SQL condition: the image is not held in quarantine (never held, or released by an admin)."""
    return or_(Image.quarantine_reason.is_(None), Image.released_at.is_not(None))


_SEARCH_KINDS = ("name", "stem", "token", LEGACY_PSEUDONYM_KIND, *_DICOM_ID_KEYWORDS)


def _image_filter(session: Session, query, cohort: Cohort | str | None, modality: str | None, label: str | None,
                  split: str | None, search: str | None, annotated: bool | None, not_annotated_by,
                  quarantined: bool | None = False, annotated_by=None):
    """``query`` (over Image) with :func:`list_images`' filters, all in SQL."""
    if cohort is not None:
        query = query.where(Image.cohort_id == (get_cohort(session, cohort) if isinstance(cohort, str) else cohort).id)
    if quarantined is not None:
        query = query.where(~_visible() if quarantined else _visible())
    if modality:
        query = query.where(Image.modality == modality)
    if label is not None:
        query = query.where(Image.label == label)
    if split is not None:
        query = query.where(Image.split == split)
    if search and search.strip():
        text = search.strip()
        key = _hmac_key(session)
        # the original name and DICOM ids are not stored: a search matches their keyed hashes exactly
        digests = {_digest(key, kind, value) for kind, value in _name_keys(text).items()}
        digests |= {_digest(key, kind, text) for kind in _SEARCH_KINDS}
        named = select(ImageKey.id).where(ImageKey.image_id == Image.id, ImageKey.digest.in_(sorted(digests))).exists()
        query = query.where(or_(Image.pseudonym.ilike(f"%{text}%"), Image.sha256.ilike(f"{text}%"), named))
    if annotated is not None:
        live = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None)).exists()
        query = query.where(live if annotated else ~live)
    if not_annotated_by is not None:
        mine = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None),
                                           Annotation.author_id == _user_id(session, not_annotated_by)).exists()
        query = query.where(~mine)
    if annotated_by is not None:
        theirs = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None),
                                             Annotation.author_id == _user_id(session, annotated_by)).exists()
        query = query.where(theirs)
    return query


def list_images(session: Session, cohort: Cohort | str | None = None, *, modality: str | None = None,
                label: str | None = None, split: str | None = None, search: str | None = None,
                annotated: bool | None = None, not_annotated_by: User | str | int | None = None,
                quarantined: bool | None = False, limit: int | None = None, offset: int = 0,
                annotated_by: User | str | int | None = None) -> list[Image]:
    """Images in import order, filtered in one query. ``search`` matches a pseudonym, a hash prefix,
    or exactly an original file name, stem or DICOM id (through their keyed hashes; none is stored);
    ``annotated``: with (True) or without (False) a live annotation by anyone; ``not_annotated_by``:
    without a live annotation by that user (an annotator's queue); ``annotated_by``: with a live
    annotation by that user; ``quarantined``: False (default)
    only images a reviewer may see, True only those held for possible burned-in text, None all."""
    query = _image_filter(session, select(Image), cohort, modality, label, split, search, annotated, not_annotated_by,
                          quarantined, annotated_by)
    query = query.order_by(Image.id).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def count_images(session: Session, cohort: Cohort | str | None = None, *, modality: str | None = None,
                 label: str | None = None, split: str | None = None, search: str | None = None,
                 annotated: bool | None = None, not_annotated_by: User | str | int | None = None,
                 quarantined: bool | None = False) -> int:
    """How many images :func:`list_images` would return with these filters (one COUNT query)."""
    query = _image_filter(session, select(func.count(Image.id)), cohort, modality, label, split, search, annotated,
                          not_annotated_by, quarantined)
    return int(session.scalar(query) or 0)


def release_image(session: Session, image: Image, by: User | str | int) -> Image:
    """Release an image held for possible burned-in text: an admin has looked at it. Recorded with
    the admin's id and the time; releasing an image that is not held is a no-op."""
    from db.schema import utcnow

    user_id = _user_id(session, by)
    user = session.get(User, user_id)
    if user is None or user.role != "admin" or not user.active:
        raise PermissionError("only an active admin can release an image from quarantine")
    if image.quarantined:
        image.released_by, image.released_at = user_id, utcnow()
        session.flush()
    return image
