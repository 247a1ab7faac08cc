"""SQLAlchemy 2 models of the SoftCAM Review database (see docs/database.md).

The Alembic revisions under db/migrations/versions create exactly these tables; a test compares the
migrated database with this metadata, so a change here needs a new revision.

Privacy: images are known by a pseudonym (``img-`` + 16 hex of an HMAC of the stored file's sha256
under ``names.key``, :func:`db.repository.images.pseudonym_for`) and by
keyed hashes of their names / DICOM ids (``image_keys``), never by a patient name or ID.
Timestamps are stored as naive UTC and come back as aware UTC datetimes (:class:`UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("clinician", "annotator", "researcher", "admin")
ANNOTATION_KINDS = ("box", "point", "polygon", "mask")
PROVENANCES = ("drawn", "imported", "derived", "consensus")
AUDIT_ACTIONS = ("create", "update", "delete", "restore", "adjudicate", "reject")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_JOB_STATUSES = ("done", "failed", "cancelled")  # final: nothing moves a job out of these

# constraint names fixed so migrations on SQLite (batch mode) and PostgreSQL agree
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Naive UTC in the database, aware UTC in Python, on SQLite and PostgreSQL alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime (db.schema.utcnow())")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Setting(Base):
    """Key/value settings of this database (e.g. the key of the image-name hashes)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Cohort(Base):
    __tablename__ = "cohorts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    modality: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    images: Mapped[list["Image"]] = relationship(back_populates="cohort")
    labels: Mapped[list["ClassLabel"]] = relationship(back_populates="cohort", order_by="ClassLabel.position")


class ClassLabel(Base):
    """Class names of a cohort (image-level classes and annotation labels), in model output order."""

    __tablename__ = "class_labels"
    __table_args__ = (UniqueConstraint("cohort_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)
    colour: Mapped[str | None] = mapped_column(String(16))

    cohort: Mapped[Cohort] = relationship(back_populates="labels")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (Index("uq_users_oidc_subject", "oidc_subject", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(120), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str | None] = mapped_column(String(400))  # "scrypt$n$r$p$salt_hex$hash_hex"
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the OIDC provider's subject ("sub" claim) this account signs in as; never a display name
    oidc_subject: Mapped[str | None] = mapped_column(String(255))


class Image(Base):
    """An imported, de-identified image stored at ``SOFTCAM_HOME/<stored_path>``. Neither its original
    file name nor a hash of the file as given is kept (see ``image_keys`` for how annotation files
    still find it)."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("cohort_id", "sha256"), UniqueConstraint("cohort_id", "pseudonym"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"), index=True)
    pseudonym: Mapped[str] = mapped_column(String(64), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)           # of the stored (de-identified) file
    modality: Mapped[str] = mapped_column(String(32))
    extension: Mapped[str] = mapped_column(String(16))
    stored_path: Mapped[str] = mapped_column(String(500))                 # relative to SOFTCAM_HOME
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(200))
    split: Mapped[str | None] = mapped_column(String(16))
    burned_in: Mapped[bool] = mapped_column(Boolean, default=False)
    # why the image may show burned-in text (None: it is not held); hidden from reviewers until released
    quarantine_reason: Mapped[str | None] = mapped_column(String(200))
    released_by: Mapped[int | None] = mapped_column(Integer)             # the admin's user id
    released_at: Mapped[datetime | None] = mapped_column()

    @property
    def quarantined(self) -> bool:
        """Held for possible burned-in text and not yet released by an admin."""
        return self.quarantine_reason is not None and self.released_at is None
    metadata_json: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    cohort: Mapped[Cohort] = relationship(back_populates="images")


class ImageKey(Base):
    """Keyed hash (HMAC-SHA256) of a name an annotation file may use for an image: file name, stem,
    leading token, DICOM PatientID / SOP / Study UID. Lets imports match without storing the name."""

    __tablename__ = "image_keys"
    __table_args__ = (UniqueConstraint("image_id", "kind", "digest"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), index=True)


class Annotation(Base):
    """A box / point / polygon / mask on an image. ``version`` increases on every change (optimistic
    concurrency); deleting sets ``deleted_at`` (rows are never removed)."""

    __tablename__ = "annotations"
    __table_args__ = (Index("ix_annotations_image_live", "image_id", "deleted_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    geometry: Mapped[dict[str, Any]] = mapped_column(JSON)
    label: Mapped[str | None] = mapped_column(String(200))
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    version: Mapped[int] = mapped_column(Integer, default=1)
    deleted_at: Mapped[datetime | None] = mapped_column()
    provenance: Mapped[str] = mapped_column(String(16), default="drawn")
    source_file: Mapped[str | None] = mapped_column(String(500))
    derived_from_id: Mapped[int | None] = mapped_column(ForeignKey("annotations.id"))

    image: Mapped[Image] = relationship()
    author: Mapped[User | None] = relationship(foreign_keys=[author_id])
    updated_by: Mapped[User | None] = relationship(foreign_keys=[updated_by_id])

    # optimistic locking by the ORM: every UPDATE says "WHERE version = <the version loaded>" and sets
    # version + 1; no row matched (someone else changed it first) raises StaleDataError
    __mapper_args__ = {"version_id_col": version}


class ImageLabelChange(Base):
    """One change of an image's class label or split: who, when, the value before and after, and
    where it came from (``"csv"`` import, ``"edit"`` on the Data page, ``"split"`` assignment).
    Rows are only added: the history of a label is the image's rows in ``at`` order."""

    __tablename__ = "image_label_history"
    __table_args__ = (Index("ix_image_label_history_image_at", "image_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    field: Mapped[str] = mapped_column(String(16))                        # "label" | "split"
    before: Mapped[str | None] = mapped_column(String(200))
    after: Mapped[str | None] = mapped_column(String(200))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(String(32))


class AnnotationAudit(Base):
    """One row per change of an annotation: who, when, what, and the state before and after."""

    __tablename__ = "annotation_audit"
    __table_args__ = (Index("ix_annotation_audit_history", "annotation_id", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    action: Mapped[str] = mapped_column(String(16))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AuditEvent(Base):
    """One security event: a sign-in (ok, failed, refused while locked), a quarantine release, an
    account change. ``subject`` is the account name for existing accounts and a keyed hash of the
    typed name otherwise (a password typed into the name field must not be stored in clear)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_subject_at", "subject", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(40))
    subject: Mapped[str] = mapped_column(String(200))
    actor_id: Mapped[int | None] = mapped_column(Integer)      # the signed-in user who acted, if any
    detail: Mapped[str | None] = mapped_column(String(500))


class Model(Base):
    """A registered classifier checkpoint."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    checkpoint_path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(32))
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    metadata_json: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CachedMap(Base):
    """An explanation map computed once and kept as ``SOFTCAM_HOME/<path>`` (.npy float32)."""

    __tablename__ = "cached_maps"
    __table_args__ = (UniqueConstraint("model_id", "image_id", "method", "target", "params_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(64))
    target: Mapped[int] = mapped_column(Integer)
    params_hash: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1000))
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- revision 2 --------------------------------------------------------------------------------

class MetricResult(Base):
    """One metric value: per image (``image_id`` set) or per cohort (``image_id`` NULL)."""

    __tablename__ = "metric_results"
    __table_args__ = (Index("ix_metric_results_lookup", "model_id", "cohort_id", "method", "metric"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    cohort_id: Mapped[int | None] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    method: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(64))
    target: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Float)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A background job (e.g. cohort metrics) whose progress outlives a page reload."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    result_path: Mapped[str | None] = mapped_column(String(1000))
    error: Mapped[str | None] = mapped_column(Text)
    # "host:pid:start" of the process whose thread runs the job, so a restarted app can tell the
    # jobs its dead predecessor left "running" from those another live server process is running
    worker: Mapped[str | None] = mapped_column(String(200))


CHUNK_STATUSES = ("queued", "running", "done")


class JobChunk(Base):
    """A part of a job that one ``softcam worker`` claims and runs (an evaluation's slice of images;
    a training job is one chunk). A claim is a lease: the worker renews ``lease_expires_at`` by
    heartbeats; a lease that runs out (a killed worker) puts the chunk back in the queue, with
    ``attempt`` one higher, and only the holder of the current attempt can complete it."""

    __tablename__ = "job_chunks"
    __table_args__ = (UniqueConstraint("job_id", "index"), Index("ix_job_chunks_status", "status", "job_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    units: Mapped[int] = mapped_column(Integer, default=1)  # progress units (image x method pairs)
    done: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    result_path: Mapped[str | None] = mapped_column(String(1000))
    finished_at: Mapped[datetime | None] = mapped_column()


class ReaderStudy(Base):
    """A blinded reader study: a clinician rates each map of each image of ``image_ids`` for
    ``methods`` (made by the model at ``model_path``), in an order seeded by ``seed`` and the reader."""

    __tablename__ = "reader_studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    cohort_id: Mapped[int] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"))
    model_path: Mapped[str] = mapped_column(String(1000))
    methods: Mapped[list[str]] = mapped_column(JSON)
    image_ids: Mapped[list[int]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    cohort: Mapped[Cohort] = relationship()


class ReaderAnswer(Base):
    """One reader's judgement of one map: plausibility 1-5 and, optionally, where the evidence
    should be (image pixels). One row per study, reader, image and method; rating again replaces it."""

    __tablename__ = "reader_answers"
    __table_args__ = (UniqueConstraint("study_id", "reader_id", "image_id", "method"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("reader_studies.id", ondelete="CASCADE"), index=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(64))
    rating: Mapped[int] = mapped_column(Integer)
    point_x: Mapped[float | None] = mapped_column(Float)
    point_y: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)
    answered_at: Mapped[datetime] = mapped_column(default=utcnow)
