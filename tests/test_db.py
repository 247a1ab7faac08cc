"""Database: migrations, users, annotations with audit and optimistic concurrency, models, maps,
jobs, image import, atomic annotation import/export on real data, privacy of exports, CLI.

Every test taking ``engine`` / ``session`` / ``db_url`` runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, text

from annotations.geometry import Box, Mask, Point, Polygon
from db import repository as repo
from db.schema import Annotation, AnnotationAudit, Image, ImageKey
from db.session import current_revision, downgrade, get_engine, head_revision, session_scope, upgrade

FIRST_REVISION = "0001_initial"
ROOT = Path(__file__).resolve().parents[1]


# --- migrations --------------------------------------------------------------------------------

def test_migrated_database_matches_the_models(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from db.schema import Base

    assert current_revision(engine) == head_revision() == "0009_keyed_pseudonyms"
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert upgrade(engine) == head_revision()  # idempotent: the app calls it on every start


@pytest.fixture
def db_at_first_revision(db_url):
    """A database made by the FIRST revision, holding rows written the way that revision's code did."""
    engine = get_engine(db_url)
    assert upgrade(engine, FIRST_REVISION) == FIRST_REVISION
    at = datetime(2026, 1, 2, 3, 4, 5)
    geometry = json.dumps({"x0": 1.5, "y0": 2.0, "x1": 30.25, "y1": 40.0})
    statements = [
        ("INSERT INTO cohorts (id, name, created_at) VALUES (1, 'old', :at)", {}),
        ("INSERT INTO users (id, username, role, active, created_at) VALUES (1, 'ann', 'annotator', :t, :at)", {"t": True}),
        ("INSERT INTO images (id, cohort_id, pseudonym, sha256, source_sha256, modality, extension, stored_path, width,"
         " height, burned_in, metadata, created_at) VALUES (1, 1, 'img-0123456789abcdef', :sha, :sha, 'cxr', '.png',"
         " 'images/x.png', 64, 48, :f, '{}', :at)", {"sha": "ab" * 32, "f": False}),
        ("INSERT INTO annotations (id, image_id, kind, geometry, label, author_id, created_at, updated_at, version,"
         " provenance) VALUES (1, 1, 'box', :g, 'opacity', 1, :at, :at, 3, 'drawn')", {"g": geometry}),
        ("INSERT INTO annotation_audit (id, annotation_id, user_id, at, action, after) VALUES (1, 1, 1, :at, 'create', :g)",
         {"g": geometry}),
        ("INSERT INTO models (id, name, checkpoint_path, sha256, is_default, metadata, created_at) VALUES"
         " (1, 'm', '/x.pt', :sha, :t, '{}', :at)", {"sha": "cd" * 32, "t": True}),
    ]
    with engine.begin() as connection:
        for sql, params in statements:
            connection.execute(text(sql), {"at": at, **params})
        if engine.dialect.name == "postgresql":  # explicit ids: move the sequences on
            for table in ("cohorts", "users", "images", "annotations", "annotation_audit", "models"):
                connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 10)"))
    return engine


def test_upgrade_keys_old_pseudonyms_and_old_exports_still_find_their_images(db_url):
    from db.repository.annotation_files import CohortResolver

    engine = get_engine(db_url)
    assert upgrade(engine, "0008_job_chunks") == "0008_job_chunks"
    old_sha, kept_sha = hashlib.sha256(b"old").hexdigest(), hashlib.sha256(b"kept").hexdigest()
    rows = [(1, f"img-{old_sha[:16]}", old_sha), (2, "img-handmade000001", kept_sha)]
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO cohorts (id, name, created_at) VALUES (1, 'old', :at)"), {"at": datetime(2026, 1, 2)})
        for image_id, pseudonym, sha in rows:
            connection.execute(text(
                "INSERT INTO images (id, cohort_id, pseudonym, sha256, modality, extension, stored_path, burned_in,"
                " metadata, created_at) VALUES (:id, 1, :p, :sha, 'cxr', '.png', 'images/x.png', :f, '{}', :at)"),
                {"id": image_id, "p": pseudonym, "sha": sha, "f": False, "at": datetime(2026, 1, 2)})
    assert upgrade(engine) == head_revision()
    with session_scope(engine) as s:
        migrated, kept = s.get(Image, 1), s.get(Image, 2)
        assert migrated.pseudonym == repo.pseudonym_for(repo.names_key(), old_sha) != f"img-{old_sha[:16]}"
        assert kept.pseudonym == "img-handmade000001"  # not of the old form: left as it was
        assert old_sha[:16] not in migrated.pseudonym
        # a table or annotation file exported before the upgrade still names the image
        assert repo.get_image(s, f"img-{old_sha[:16]}").id == 1
        resolve = CohortResolver(s, repo.get_cohort(s, "old"))
        assert resolve(f"img-{old_sha[:16]}.png").key == 1 and resolve(migrated.pseudonym).key == 1
        assert [i.id for i in repo.list_images(s, "old", search=f"img-{old_sha[:16]}")] == [1]
        with pytest.raises(repo.NotFoundError):
            repo.get_image(s, f"img-{kept_sha[:16]}")  # no old pseudonym was ever made for it
    assert upgrade(engine) == head_revision()  # idempotent: nothing of the old form is left
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(ImageKey).where(ImageKey.kind == "legacy_pseudonym")) == 1
    downgrade(engine, "0008_job_chunks")
    with session_scope(engine) as s:
        assert s.get(Image, 1).pseudonym == f"img-{old_sha[:16]}" and s.get(Image, 2).pseudonym == "img-handmade000001"
        assert s.scalar(select(func.count()).select_from(ImageKey)) == 0


def test_old_database_upgrades_without_loss(db_at_first_revision):
    engine = db_at_first_revision
    assert upgrade(engine) == head_revision()
    with session_scope(engine) as s:
        image = repo.get_image(s, "img-0123456789abcdef")
        [annotation] = repo.list_annotations(s, image)
        assert repo.annotation_geometry(annotation) == Box(1.5, 2, 30.25, 40)
        assert (annotation.label, annotation.version, annotation.author.username) == ("opacity", 3, "ann")
        assert annotation.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        assert [h.action for h in repo.annotation_history(s, annotation.id)] == ["create"]
        assert repo.list_models(s)[0].is_default
        # the old row keeps working with the new code, and the new tables exist
        updated = repo.save_annotation(s, image, Box(2, 2, 31, 40), "opacity", "ann", annotation_id=annotation.id,
                                       expected_version=3)
        assert updated.version == 4
        job = repo.create_job(s, "evaluate", total=3)
        assert repo.update_job(s, job.id, done=1, status="running").progress_done == 1


# --- users -------------------------------------------------------------------------------------

def test_users_roles_and_passwords(session):
    alice = repo.create_user(session, "alice", "clinician", "correct horse")
    bob = repo.create_user(session, "bob", "annotator", "correct horse")
    assert alice.password_hash.startswith("scrypt$") and alice.password_hash != bob.password_hash  # per-user salt
    assert repo.verify_password(session, "alice", "correct horse").id == alice.id
    assert repo.verify_password(session, "alice", "wrong") is None
    assert repo.verify_password(session, "nobody", "correct horse") is None
    with pytest.raises(repo.RepositoryError, match="role 'boss' is not one of"):
        repo.create_user(session, "carol", "boss", "x")
    with pytest.raises(repo.RepositoryError, match="already exists"):
        repo.create_user(session, "alice", "admin", "x")
    repo.set_password(session, "alice", "new secret")
    assert repo.verify_password(session, "alice", "correct horse") is None
    assert repo.verify_password(session, "alice", "new secret") is not None


# --- annotations -------------------------------------------------------------------------------

def _fake_image(session, cohort, n: int = 0, width: int = 64, height: int = 48) -> Image:
    sha = hashlib.sha256(str(n).encode()).hexdigest()
    image = Image(cohort_id=cohort.id, pseudonym=f"img-{sha[:16]}", sha256=sha, modality="cxr",
                  extension=".png", stored_path=f"images/{sha}.png", width=width, height=height, metadata_json={})
    session.add(image)
    session.flush()
    return image


def test_annotation_lifecycle_audit_and_conflict(session):
    cohort = repo.add_cohort(session, "c")
    image = _fake_image(session, cohort)
    alice = repo.create_user(session, "alice", "annotator")
    bob = repo.create_user(session, "bob", "annotator")

    a = repo.save_annotation(session, image, Box(1, 2, 10, 20), "lesion", alice)
    assert (a.version, a.provenance, a.author_id) == (1, "drawn", alice.id)
    a2 = repo.save_annotation(session, image, Box(1, 2, 12, 20), "lesion", bob, annotation_id=a.id, expected_version=1)
    assert a2.version == 2 and a2.author_id == alice.id and a2.updated_by_id == bob.id
    # alice still holds version 1: her save must not overwrite bob's
    with pytest.raises(repo.ConflictError, match=r"changed by bob at .* \(now version 2, you edited version 1\)"):
        repo.save_annotation(session, image, Box(0, 0, 5, 5), "lesion", alice, annotation_id=a.id, expected_version=1)
    assert repo.annotation_geometry(repo.list_annotations(session, image)[0]) == Box(1, 2, 12, 20)

    repo.delete_annotation(session, a.id, alice, expected_version=2)
    assert repo.list_annotations(session, image) == []
    assert [x.id for x in repo.list_annotations(session, image, include_deleted=True)] == [a.id]
    with pytest.raises(repo.ConflictError, match="deleted by alice"):
        repo.save_annotation(session, image, Box(0, 0, 5, 5), "lesion", bob, annotation_id=a.id, expected_version=3)
    repo.restore_annotation(session, a.id, bob, expected_version=3)

    history = repo.annotation_history(session, a.id)
    assert [(h.action, h.user_id) for h in history] == [
        ("create", alice.id), ("update", bob.id), ("delete", alice.id), ("restore", bob.id)]
    assert history[0].before is None and history[0].after["geometry"] == {"x0": 1, "y0": 2, "x1": 10, "y1": 20}
    assert history[1].before["geometry"]["x1"] == 10 and history[1].after["geometry"]["x1"] == 12
    assert history[2].after["deleted"] is True and history[3].after["deleted"] is False
    assert all(h.at.tzinfo is not None for h in history)


def test_other_kinds_and_mask_size_check(session):
    cohort = repo.add_cohort(session, "c")
    image = _fake_image(session, cohort, width=8, height=6)
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    for geometry in (Point(3, 4), Polygon(((0, 0), (4, 0), (0, 4))), Mask(mask)):
        saved = repo.save_annotation(session, image, geometry, "x")
        assert repo.annotation_geometry(saved) == geometry
    with pytest.raises(repo.RepositoryError, match="mask is 3x3 but image"):
        repo.save_annotation(session, image, Mask(np.ones((3, 3), bool)), "x")


def test_annotator_queue_and_image_listing(session):
    cohort = repo.add_cohort(session, "c")
    images = [_fake_image(session, cohort, n) for n in range(3)]
    alice = repo.create_user(session, "alice", "annotator")
    bob = repo.create_user(session, "bob", "annotator")
    assert repo.next_unannotated_image(session, cohort, alice).id == images[0].id
    repo.save_annotation(session, images[0], Box(0, 0, 1, 1), "x", alice)
    repo.save_annotation(session, images[1], Box(0, 0, 1, 1), "x", bob)
    assert repo.next_unannotated_image(session, cohort, alice).id == images[1].id
    assert repo.next_unannotated_image(session, cohort, alice, skip=[images[1].id]).id == images[2].id
    assert repo.next_unannotated_image(session, cohort).id == images[2].id
    assert [i.id for i in repo.list_images(session, cohort, annotated=True)] == [images[0].id, images[1].id]
    assert [i.id for i in repo.list_images(session, "c", search=images[2].pseudonym)] == [images[2].id]
    repo.set_image_label(session, images[2], "normal", "test")
    assert [i.id for i in repo.list_images(session, cohort, label="normal", split="test")] == [images[2].id]
    assert [label.name for label in repo.get_cohort(session, "c").labels] == ["normal"]
    # the annotator queue and the counts are single SQL queries over the same filters
    assert [i.id for i in repo.list_images(session, cohort, not_annotated_by=alice)] == [images[1].id, images[2].id]
    assert [i.id for i in repo.list_images(session, cohort, not_annotated_by="bob")] == [images[0].id, images[2].id]
    assert repo.count_images(session, cohort) == 3 and repo.count_images(session, cohort, annotated=True) == 2
    assert repo.count_images(session, cohort, not_annotated_by=alice.id) == 2
    assert repo.count_images(session, "c", label="normal", split="test") == 1
    deleted = repo.list_annotations(session, images[0], author=alice.id)[0]
    repo.delete_annotation(session, deleted.id, alice, expected_version=deleted.version)
    assert repo.count_images(session, cohort, not_annotated_by=alice) == 3  # a deleted box no longer counts


# --- models, maps, metrics, jobs ---------------------------------------------------------------

def test_models_maps_metrics_jobs(session, tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    first = repo.register_model(session, "fundus-a", ckpt, modality="fundus", metadata={"arch": "resnet18"}, default=True)
    second = repo.register_model(session, "fundus-b", ckpt, modality="fundus")
    assert first.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert repo.get_default_model(session, "fundus").id == first.id
    repo.set_default_model(session, second.id)
    assert repo.get_default_model(session, "fundus").id == second.id
    assert [m.is_default for m in repo.list_models(session, "fundus")] == [False, True]

    cohort = repo.add_cohort(session, "c")
    image = _fake_image(session, cohort)
    saliency = np.arange(12, dtype=np.float32).reshape(3, 4) - 5  # signed maps stay signed
    assert repo.get_cached_map(session, first, image, "gradcam", 1, {"layer": "x"}) is None
    row = repo.cache_map(session, first, image, "cascam:gradcam", 1, saliency, params={"layer": "x"}, seconds=0.25)
    assert row.path.startswith("maps/") and row.path.endswith(".npy")
    cached, seconds = repo.get_cached_map(session, first, image, "cascam:gradcam", 1, {"layer": "x"})
    assert np.array_equal(cached, saliency) and cached.dtype == np.float32 and seconds == 0.25
    assert repo.get_cached_map(session, first, image, "cascam:gradcam", 1, {"layer": "y"}) is None
    assert repo.get_cached_map(session, first, image, "cascam:gradcam", 0, {"layer": "x"}) is None

    job = repo.create_job(session, "evaluate", total=10, params={"methods": ["gradcam"]})
    assert job.status == "queued"
    repo.update_job(session, job.id, status="running", done=4, message="4 of 10")
    repo.save_metric_results(session, first, [{"method": "gradcam", "metric": "pointing_game", "value": 1.0,
                                               "image_id": image.id}, {"method": "gradcam", "metric": "auc",
                                                                       "value": float("nan")}], cohort=cohort, job=job)
    done = repo.update_job(session, job.id, status="done", done=10, result_path=tmp_path / "out")
    assert done.started_at is not None and done.finished_at >= done.started_at
    assert repo.list_jobs(session, "evaluate", status="done")[0].id == job.id
    per_image = repo.list_metric_results(session, first, per_image=True)
    assert [(r.metric, r.value) for r in per_image] == [("pointing_game", 1.0)]
    assert repo.list_metric_results(session, first, per_image=False)[0].value is None
    with pytest.raises(repo.RepositoryError, match="job status"):
        repo.update_job(session, job.id, status="weird")


def test_finished_jobs_never_change_and_cancelling_stops_at_the_next_report(session):
    admin = repo.create_user(session, "ada", "researcher", "pw-ada-1234")
    job = repo.create_job(session, "evaluate", total=10)
    repo.update_job(session, job.id, status="running", done=3)
    cancelled = repo.cancel_job(session, job.id, admin)
    assert (cancelled.status, cancelled.message, cancelled.progress_done) == ("cancelled", "cancelled by ada", 3)
    assert cancelled.finished_at is not None
    # the worker's next progress report, its "done" and its "failed" are all refused, unchanged row
    for fields in ({"done": 4, "status": "running"}, {"status": "done"}, {"status": "failed", "error": "x"}):
        with pytest.raises(repo.JobFinishedError, match=f"job {job.id} is cancelled: cancelled by ada"):
            repo.update_job(session, job.id, **fields)
    assert repo.get_job(session, job.id).progress_done == 3
    finished = repo.create_job(session, "train")
    repo.update_job(session, finished.id, status="done")
    with pytest.raises(repo.JobFinishedError, match="is done"):
        repo.cancel_job(session, finished.id)


def test_jobs_left_running_by_a_stopped_process_are_closed_as_interrupted(session):
    """The worker string of a process that has exited (a real child process), of this live process, of
    another host (cannot be checked: left alone) and of this pid with another start time (pid reuse)."""
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "from db.repository import this_worker; print(this_worker())"],
                          capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    alive = repo.this_worker()
    host, pid, start = alive.split(":")
    assert pid == str(os.getpid()) and (start.isdigit() or start == "")
    assert repo.worker_alive(alive) and not repo.worker_alive(dead)
    reused = f"{host}:{pid}:{int(start) + 1}" if start else None
    jobs = {name: repo.create_job(session, "evaluate", total=8, worker=worker)
            for name, worker in [("dead", dead), ("alive", alive), ("other host", "elsewhere:1:1"),
                                 ("unknown", None), ("reused", reused)]}
    repo.update_job(session, jobs["dead"].id, status="running", done=5)
    finished = repo.create_job(session, "evaluate", worker=dead)
    repo.update_job(session, finished.id, status="done")

    closed = repo.close_interrupted_jobs(session)
    expected = {"dead"} | ({"reused"} if reused else set())
    assert {name for name, job in jobs.items() if job.id in {c.id for c in closed}} == expected
    row = repo.get_job(session, jobs["dead"].id)
    assert row.status == "failed" and row.finished_at is not None
    assert row.error.startswith(f"interrupted: the app process that ran it ({dead}) stopped before it "
                                f"finished (5/8 done)")
    assert {repo.get_job(session, jobs[n].id).status for n in ("alive", "other host", "unknown")} == {"queued"}
    assert repo.get_job(session, finished.id).status == "done"
    assert repo.close_interrupted_jobs(session) == []  # idempotent


# --- image import ------------------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # file handling, not SQL
def test_import_images_accepts_rejects_and_is_idempotent(session, real_data, tmp_path):
    folder = real_data / "cxr_rsna_png" / "images"
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(real_data / "cxr_tbx11k_nih" / "tbx11k_test_data" / "imgs" / "health" / "h0001.png", "h0001.png")
        zf.writestr("notes.txt", "not an image")  # skipped: not an image suffix
        zf.writestr("broken.png", b"\x89PNG\r\n\x1a\nbroken")
    text_file = tmp_path / "scan.png"
    text_file.write_text("hello")
    result = repo.import_images(session, [folder, archive, text_file], "cxr", modality="cxr")
    assert len(result.accepted) == 5 and result.new == 5
    reasons = {Path(r.name).name: r.reason for r in result.rejected}
    assert set(reasons) == {"more.zip:broken.png", "scan.png"}
    assert "text" in reasons["scan.png"]
    images = repo.list_images(session, "cxr")
    assert {(i.width, i.height) for i in images} == {(1024, 1024), (512, 512)}
    for image in images:
        stored = repo.image_path(image)
        assert stored.name == f"{image.sha256}.png" and stored.is_file()
        assert image.pseudonym == repo.pseudonym_for(repo.names_key(), image.sha256)
    again = repo.import_images(session, [folder], "cxr")
    assert again.new == 0 and len(again.accepted) == 4
    assert repo.count_images(session, repo.get_cohort(session, "cxr")) == 5


# --- annotation import / export on real data ---------------------------------------------------

def _box_rows(session, cohort) -> list[tuple]:
    """(image sha256, kind, geometry json, label) of the live annotations: comparable across cohorts."""
    rows = session.execute(select(Image.sha256, Annotation.kind, Annotation.geometry, Annotation.label)
                           .join(Image).where(Image.cohort_id == cohort.id, Annotation.deleted_at.is_(None)))
    return sorted((sha, kind, json.dumps(g, sort_keys=True), label) for sha, kind, g, label in rows)


def _round_trip(session, paths, source, fmt, export_fmt, tmp_path, suffix="", label=None):
    """Import ``source`` into cohort A, export, import the export into cohort B (same images), compare."""
    for cohort in ("A", "B"):
        imported = repo.import_images(session, paths, cohort)
        assert not imported.rejected, imported.rejected
    repo.get_or_create_user(session, "importer")
    first = repo.import_annotations(session, source, fmt, "A", "importer", label=label)
    assert first.added > 0 and first.duplicates == 0
    again = repo.import_annotations(session, source, fmt, "A", "importer", label=label)
    assert again.added == 0 and again.duplicates == first.added  # idempotent
    out = repo.export_annotations(session, export_fmt, "A", tmp_path / f"export{suffix}")
    repo.import_annotations(session, out, export_fmt, "B", "importer")
    a, b = repo.get_cohort(session, "A"), repo.get_cohort(session, "B")
    boxes_a = [r for r in _box_rows(session, a) if r[1] == "box"]
    assert boxes_a == _box_rows(session, b)  # coordinates bit-identical after export + re-import
    return first, out


def test_rsna_round_trip_in_database(session, real_data, tmp_path):
    folder = real_data / "cxr_rsna_png"
    first, out = _round_trip(session, [folder / "images"], folder / "stage_2_train_labels.csv", "rsna", "rsna",
                             tmp_path, ".csv")
    assert first.added == 8 and first.images == 4
    exported = list(csv.DictReader(out.open()))
    assert all(r["patientId"].startswith("img-") for r in exported) and len(exported) == 8


def test_tbx11k_coco_round_trip_in_database(session, real_data, tmp_path):
    folder = real_data / "cxr_tbx11k_nih" / "tbx11k_test_data"
    first, out = _round_trip(session, [folder / "imgs"], folder / "annotations" / "json" / "TBX11K_train.json",
                             "coco", "coco", tmp_path, ".json")
    assert first.added == 3
    source = json.loads((folder / "annotations" / "json" / "TBX11K_train.json").read_text())
    exported = json.loads(out.read_text())
    assert sorted(a["bbox"] for a in exported["annotations"]) == sorted(a["bbox"] for a in source["annotations"])
    assert all(i["file_name"].startswith("img-") for i in exported["images"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # large JPEGs: once is enough
def test_idrid_yolo_round_trip_in_database(session, real_data, tmp_path):
    folder = real_data / "fundus_idrid"
    labels = tmp_path / "labels"
    labels.mkdir()
    for stem in ("0348", "0391"):
        (labels / f"{stem}.txt").write_bytes((folder / "images" / f"{stem}.txt").read_bytes())
    (labels / "retinal.names").write_bytes((folder / "retinal.names").read_bytes())
    paths = [folder / "images" / "0348.jpg", folder / "images" / "0391.jpg"]
    first, out = _round_trip(session, paths, labels, "yolo", "yolo", tmp_path, ".zip")
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist())[0] == "classes.txt"
    # the class list (retinal.names) named the labels
    assert {r[3] for r in _box_rows(session, repo.get_cohort(session, "A"))} == {"optic_disc", "hard_exudates", "haemorrhage"}


def test_oct_masks_import_and_csv_round_trip(session, real_data, tmp_path):
    folder = real_data / "oct_bonn_drusen"
    stems = ["12", "42", "7"]
    masks = tmp_path / "masks"
    masks.mkdir()
    for s in stems:
        (masks / f"{s}-drusen-derived.png").write_bytes((folder / "derived_drusen_masks" / f"{s}-drusen-derived.png").read_bytes())
    paths = [folder / "bscans" / f"{s}-Input.tif" for s in stems]
    first, out = _round_trip(session, paths, masks, "mask", "csv", tmp_path, ".csv", label="drusen")
    cohort = repo.get_cohort(session, "A")
    rows = session.scalars(select(Annotation).join(Image).where(Image.cohort_id == cohort.id)).all()
    by_kind = {k: [r for r in rows if r.kind == k] for k in ("mask", "box")}
    assert len(by_kind["mask"]) == 3
    assert all(b.provenance == "derived" and b.derived_from_id in {m.id for m in by_kind["mask"]} for b in by_kind["box"])
    [image_12] = repo.list_images(session, cohort, search="12-Input.tif")  # by the keyed hash of its name
    mask_12 = next(m for m in by_kind["mask"] if m.image_id == image_12.id)
    png = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(masks / "12-drusen-derived.png")) != 0
    assert np.array_equal(repo.annotation_geometry(mask_12).array, png)
    with open(folder / "derived_drusen_boxes.csv") as fh:
        expected = sorted(tuple(Box.from_inclusive(*(int(r[k]) for k in ("x0", "y0", "x1", "y1"))).to_json().values())
                          for r in csv.DictReader(fh) if r["bscan"] in stems)
    wide = sorted(tuple(b.geometry[k] for k in ("x0", "y0", "x1", "y1")) for b in by_kind["box"]
                  if b.geometry["x1"] - b.geometry["x0"] >= 5)
    assert wide == expected


def test_import_is_all_or_nothing(session, real_data, tmp_path):
    folder = real_data / "cxr_rsna_png"
    repo.import_images(session, [folder / "images"], "rsna")
    lines = (folder / "stage_2_train_labels.csv").read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines + [lines[1].replace(",1", ",7").replace("637.0", "abc"), "ghost,1,1,1,1,1"]) + "\n")
    with pytest.raises(repo.AnnotationImportError) as info:
        repo.import_annotations(session, bad, "rsna", "rsna")
    report = info.value.report
    assert [e.location for e in report.errors] == ["line 10", "line 11"]
    assert "nothing imported" in str(info.value)
    assert session.scalar(select(func.count()).select_from(Annotation)) == 0


# --- privacy -----------------------------------------------------------------------------------

SECRET_ID, SECRET_NAME = "PID-73519-SECRET", "Doe^Jane"


def _identified_dicom(tmp_path) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.PatientName = SECRET_NAME
    ds.PatientID = SECRET_ID
    path = tmp_path / f"{SECRET_ID}.dcm"  # the file name itself identifies the patient
    ds.save_as(path)
    return path


def test_exports_carry_pseudonyms_only(session, tmp_path):
    dicom = _identified_dicom(tmp_path)
    result = repo.import_images(session, [dicom], "private")
    assert not result.rejected, result.rejected
    image = repo.get_image(session, result.accepted[0].image_id)
    row = session.execute(select(Image.__table__).where(Image.id == image.id)).one()
    assert not any(SECRET_ID in str(value) for value in row) and SECRET_ID not in json.dumps(image.metadata_json)
    # an RSNA file keyed by the DICOM PatientID still finds the image (keyed hash, not the stored id)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"patientId,x,y,width,height,Target\n{SECRET_ID},10,12,20,22,1\n")
    assert repo.import_annotations(session, labels, "rsna", "private").added == 1
    needles = [SECRET_ID.encode(), b"Doe", b"Jane", b"73519"]
    for fmt, name in (("coco", "x.json"), ("voc", "voc.zip"), ("rsna", "r.csv"), ("yolo", "y.zip"), ("csv", "p.csv")):
        out = repo.export_annotations(session, fmt, "private", tmp_path / "out" / name)
        blobs = [out.read_bytes()]
        if out.suffix == ".zip":
            with zipfile.ZipFile(out) as zf:
                blobs = [zf.read(n) + n.encode() for n in zf.namelist()]
        for blob in blobs:
            assert not any(n in blob for n in needles), (fmt, blob[:200])
        assert image.pseudonym.encode() in b"".join(blobs)
    stored = repo.image_path(image).read_bytes()
    assert SECRET_ID.encode() not in stored and b"Doe^Jane" not in stored
    # nothing in the database holds the id in clear either
    dump = json.dumps([list(map(str, r)) for r in session.execute(select(Image)).all()])
    assert SECRET_ID not in dump


# --- CLI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the CLI calls the functions tested on both
def test_cli_export_counts_what_its_format_cannot_hold_and_import_lists_the_first_50_bad_rows(db_env, tmp_path, capsys):
    from PIL import Image as PILImage

    from softcam_core.cli import main

    PILImage.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "eye.png")
    assert main(["images", "import", str(tmp_path / "eye.png"), "--cohort", "c", "--modality", "fundus"]) == 0
    (tmp_path / "points.csv").write_text("filename,label,x,y,participant\neye.png,ma,10,12,ann\neye.png,ma,20,22,ann\n")
    (tmp_path / "boxes.csv").write_text("image,x0,y0,x1,y1,label\neye.png,1,2,30,31,lesion\n")
    assert main(["annotations", "import", str(tmp_path / "points.csv"), "--format", "points", "--cohort", "c"]) == 0
    assert main(["annotations", "import", str(tmp_path / "boxes.csv"), "--format", "csv", "--cohort", "c",
                 "--user", "ann"]) == 0
    capsys.readouterr()
    assert main(["annotations", "export", "--format", "csv", "--cohort", "c", "--out", str(tmp_path / "out.csv")]) == 0
    err = capsys.readouterr().err
    assert "not in csv: 2 point annotation(s) (written by --format coco or points)" in err
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 2  # header + the box
    assert main(["annotations", "export", "--format", "coco", "--cohort", "c", "--out", str(tmp_path / "out.json")]) == 0
    assert "not in" not in capsys.readouterr().err  # COCO holds boxes and points

    bad = tmp_path / "bad.csv"
    bad.write_text("image,x0,y0,x1,y1,label\n" + "".join(f"eye.png,x{i},2,30,31,lesion\n" for i in range(80)))
    assert main(["annotations", "import", str(bad), "--format", "csv", "--cohort", "c"]) == 1
    err = capsys.readouterr().err
    assert sum(line.startswith("bad.csv: line") for line in err.splitlines()) == 50
    assert "... and 30 more" in err and "80 bad row(s) (--all-errors lists them all); nothing imported" in err
    assert main(["annotations", "import", str(bad), "--format", "csv", "--cohort", "c", "--all-errors"]) == 1
    err = capsys.readouterr().err
    assert sum(line.startswith("bad.csv: line") for line in err.splitlines()) == 80 and "more" not in err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_reports_a_file_system_error_as_path_and_reason_not_errno(db_env, tmp_path, capsys):
    from softcam_core.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with session_scope(db_env) as s:
        repo.add_cohort(s, "c")
    assert main(["annotations", "export", "--format", "csv", "--cohort", "c", "--out", str(a_file / "x.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"softcam annotations: error: {a_file}") and "Errno" not in err and "'" not in err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the CLI calls the functions tested on both
def test_cli_commands(db_env, real_data, tmp_path, capsys):
    from softcam_core.cli import main

    folder = real_data / "cxr_rsna_png"
    assert main(["db", "upgrade"]) == 0
    assert "0009_keyed_pseudonyms" in capsys.readouterr().out
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"")
    assert main(["images", "import", str(folder / "images"), str(junk), "--cohort", "rsna", "--modality", "cxr"]) == 1
    out = capsys.readouterr().out
    assert out.count("accepted  ") == 4 and "rejected  " in out and "empty file" in out

    bad = tmp_path / "bad.csv"
    bad.write_text((folder / "stage_2_train_labels.csv").read_text() + "nobody,1,2,3,4,1\n")
    assert main(["annotations", "import", str(bad), "--format", "rsna", "--cohort", "rsna"]) == 1
    err = capsys.readouterr().err
    assert "bad.csv: line 10: no image matches 'nobody'" in err and "nothing imported" in err
    with session_scope(db_env) as s:
        assert s.scalar(select(func.count()).select_from(Annotation)) == 0

    assert main(["annotations", "import", str(folder / "stage_2_train_labels.csv"), "--format", "rsna",
                 "--cohort", "rsna", "--user", "reader1"]) == 0
    assert "8 annotation(s) imported" in capsys.readouterr().out
    out_file = tmp_path / "export.json"
    assert main(["annotations", "export", "--format", "coco", "--cohort", "rsna", "--out", str(out_file)]) == 0
    assert len(json.loads(out_file.read_text())["annotations"]) == 8
    assert main(["annotations", "export", "--format", "coco", "--cohort", "nope", "--out", str(out_file)]) == 2
    assert "no cohort 'nope'" in capsys.readouterr().err
    with session_scope(db_env) as s:
        audit = s.scalars(select(AnnotationAudit)).all()
        assert len(audit) == 8 and {a.action for a in audit} == {"create"}
        assert {a.after["provenance"] for a in audit} == {"imported"}


def test_bulk_image_import_leaves_the_write_lock_free_between_batches(sqlite_url, real_data):
    """With commit_every, another writer gets the SQLite lock at once while files are decoded;
    without it the import holds the lock (so the CLI uses batches)."""
    import sqlite3

    engine = get_engine(sqlite_url)
    upgrade(engine)
    path = engine.url.database
    outcomes: list[str] = []

    def other_writer(done: int, total: int) -> None:
        connection = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
            outcomes.append("free")
        except sqlite3.OperationalError as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    folder = real_data / "cxr_rsna_png" / "images"
    with session_scope(engine) as s:
        assert len(repo.import_images(s, [folder], "batched", progress=other_writer, commit_every=1).accepted) == 4
    assert outcomes == ["free"] * 4
    outcomes.clear()
    with session_scope(engine) as s:
        repo.import_images(s, [folder], "one-transaction", progress=other_writer)
    assert outcomes == ["database is locked"] * 4


def test_dicom_seg_export_round_trips_masks_with_pseudonyms_only(session, tmp_path):
    import highdicom as hd
    import pydicom

    result = repo.import_images(session, [_identified_dicom(tmp_path)], "seg")
    image = repo.get_image(session, result.accepted[0].image_id)
    lesion = np.zeros((image.height, image.width), bool)
    lesion[10:20, 5:30] = True
    repo.save_annotation(session, image, Mask(lesion), "lesion", provenance="drawn")
    repo.save_annotation(session, image, Polygon(((40, 40), (60, 40), (40, 60))), "nodule")
    [out] = repo.export_dicom_seg(session, "seg", tmp_path / "seg")
    blob = out.read_bytes()
    assert SECRET_ID.encode() not in blob and b"Doe" not in blob
    seg = hd.seg.segread(out)
    stored = pydicom.dcmread(repo.image_path(image))
    assert seg.PatientID == stored.PatientID != SECRET_ID
    numbers = {d.SegmentLabel: int(d.SegmentNumber) for d in seg.SegmentSequence}
    pixels = seg.get_pixels_by_source_instance([stored.SOPInstanceUID], segment_numbers=[numbers["lesion"], numbers["nodule"]])
    assert np.array_equal(pixels[0, ..., 0] > 0, lesion)
    triangle = Polygon(((40, 40), (60, 40), (40, 60))).to_mask(image.height, image.width)
    assert np.array_equal(pixels[0, ..., 1] > 0, triangle)


def test_postgres_params_skip_with_a_reason_when_no_server(monkeypatch):
    from tests.plugins import db as db_plugin

    monkeypatch.setattr(db_plugin, "_pg_state", {})
    monkeypatch.setenv("SOFTCAM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:1/test")
    reason = db_plugin.pg_unavailable_reason()
    assert reason.startswith("no PostgreSQL server at postgresql+psycopg://postgres@127.0.0.1:1/test: ")
    assert db_plugin.pg_unavailable_reason() is reason  # checked once per session


def _dicom_file(tmp_path, name: str, **attributes) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if "BurnedInAnnotation" in ds and attributes.get("BurnedInAnnotation") is None:
        del ds.BurnedInAnnotation
    path = tmp_path / name
    ds.save_as(path)
    return path


def test_images_that_may_show_burned_in_text_are_held_until_an_admin_releases_them(session, tmp_path):
    from db.evaluation import load_database_cohort

    files = [_dicom_file(tmp_path, "yes.dcm", BurnedInAnnotation="YES"),
             _dicom_file(tmp_path, "us.dcm", Modality="US", BurnedInAnnotation=None),  # unknown, on ultrasound
             _dicom_file(tmp_path, "ct.dcm", BurnedInAnnotation=None),  # unknown, but CT does not burn text in
             _dicom_file(tmp_path, "no.dcm", Modality="US", BurnedInAnnotation="NO")]
    result = repo.import_images(session, files, "held")
    assert not result.rejected
    reasons = {item.name.split("/")[-1]: item.quarantine_reason for item in result.accepted}
    assert reasons["yes.dcm"] == "BurnedInAnnotation is YES"
    assert "absent on ultrasound" in reasons["us.dcm"]
    assert reasons["ct.dcm"] is None and reasons["no.dcm"] is None
    assert len(result.quarantined) == 2
    held_ids = {item.image_id for item in result.quarantined}
    # hidden from every listing a reviewer, an annotator's queue or an evaluation reads
    visible = {image.id for image in repo.list_images(session, "held")}
    assert visible.isdisjoint(held_ids) and len(visible) == 2
    assert repo.count_images(session, "held") == 2 and repo.count_images(session, "held", quarantined=True) == 2
    assert {image.id for image in repo.list_images(session, "held", quarantined=True)} == held_ids
    queue = []
    while (image := repo.next_unannotated_image(session, "held", after_id=queue[-1] if queue else None)) is not None:
        queue.append(image.id)
    assert set(queue) == visible
    repo.set_class_labels(session, repo.get_cohort(session, "held"), ["healthy", "diseased"])
    for image in repo.list_images(session, "held", quarantined=None):
        repo.set_image_label(session, image, "healthy", "test")
    assert len(load_database_cohort(session, "held").split("test")) == 2
    # a re-import reports the hold again
    again = repo.import_images(session, files[:1], "held")
    assert again.accepted[0].quarantine_reason == "BurnedInAnnotation is YES" and not again.accepted[0].new
    # only an admin releases; the release is recorded
    repo.create_user(session, "ann", "annotator", "pw")
    repo.create_user(session, "root", "admin", "pw")
    image = repo.get_image(session, next(iter(held_ids)))
    with pytest.raises(PermissionError, match="admin"):
        repo.release_image(session, image, "ann")
    assert image.quarantined
    repo.release_image(session, image, "root")
    assert not image.quarantined and image.released_by == repo.get_user(session, "root").id and image.released_at
    assert image.id in {i.id for i in repo.list_images(session, "held")}


def test_no_original_file_name_or_hash_of_the_identified_file_is_stored(session, tmp_path):
    from PIL import Image as PILImage
    from PIL import PngImagePlugin

    pixels = np.random.default_rng(3).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    path = tmp_path / "Doe_Jane_19450212_fundus.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Jane Doe, clinic 7")  # so the file as given differs from its stored copy
    PILImage.fromarray(pixels).save(path, pnginfo=info)
    original_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    result = repo.import_images(session, [path], "names")
    [accepted] = result.accepted
    assert accepted.new
    dump = []
    for table in Image.metadata.sorted_tables:
        for row in session.execute(select(table)):
            dump.append(repr(tuple(row)))
    text_dump = "\n".join(dump)
    assert "Doe_Jane" not in text_dump and "19450212" not in text_dump and original_sha not in text_dump
    # the keyed hash of the name still finds it, and a second import of the same file adds nothing
    assert [i.id for i in repo.list_images(session, "names", search="Doe_Jane_19450212_fundus.png")] == [accepted.image_id]
    assert [i.id for i in repo.list_images(session, "names", search="Doe_Jane_19450212_fundus")] == [accepted.image_id]
    assert repo.list_images(session, "names", search="Jane") == []  # no partial match on a name nobody stored
    assert not repo.import_images(session, [path], "names").accepted[0].new


def test_pseudonyms_are_keyed_so_a_source_file_does_not_give_its_pseudonym(session, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    path = tmp_path / "Doe_Jane_fundus.png"
    PILImage.fromarray(np.random.default_rng(4).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    [first] = repo.import_images(session, [path], "a").accepted
    image = repo.get_image(session, first.image_id)
    source_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert repo.image_path(image).read_bytes() == path.read_bytes()  # no metadata: stored unchanged
    assert source_sha[:16] not in first.pseudonym and first.pseudonym.startswith("img-") and len(first.pseudonym) == 20
    [again] = repo.import_images(session, [path], "b").accepted
    assert again.pseudonym == first.pseudonym  # one server: the same file has one pseudonym in every cohort
    repo.get_or_create_user(session, "ann")
    repo.save_annotation(session, first.image_id, Box(1, 1, 9, 9), "lesion", "ann")
    exported = repo.export_annotations(session, "coco", "a", tmp_path / "a.json").read_text()
    assert first.pseudonym in exported and source_sha[:16] not in exported and "Doe_Jane" not in exported
    monkeypatch.setenv("SOFTCAM_NAMES_KEY", "another server's key")
    [elsewhere] = repo.import_images(session, [path], "c").accepted
    assert elsewhere.pseudonym != first.pseudonym  # another key, other pseudonyms


def test_a_cohort_keeps_one_modality_and_an_import_of_another_is_refused(session, tmp_path):
    from PIL import Image as PILImage

    eye = tmp_path / "eye.png"
    PILImage.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(eye)
    cohort = repo.add_cohort(session, "eyes", modality="fundus")
    assert repo.add_cohort(session, "eyes", modality="fundus") is cohort and repo.add_cohort(session, "eyes") is cohort
    assert repo.import_images(session, [eye], "eyes", modality="fundus").new == 1
    with pytest.raises(repo.RepositoryError, match="cohort 'eyes' holds fundus images, not cxr"):
        repo.import_images(session, [eye], "eyes", modality="cxr")  # before: accepted, modality kept silently
    assert cohort.modality == "fundus" and repo.count_images(session, cohort) == 1
    PILImage.fromarray(np.full((20, 20, 3), 9, dtype=np.uint8)).save(tmp_path / "eye2.png")
    [second] = repo.import_images(session, [tmp_path / "eye2.png"], cohort).accepted  # no modality given
    assert repo.get_image(session, second.image_id).modality == "fundus"  # the cohort's, not a guess
    # a cohort made without a modality takes the first one given, unless its images say otherwise
    loose = repo.add_cohort(session, "loose")
    assert repo.add_cohort(session, "loose", modality="oct").modality == "oct"
    guessed = repo.add_cohort(session, "guessed")
    repo.import_images(session, [eye], guessed)  # no modality given: the image's own guess (cxr for a plain PNG)
    with pytest.raises(repo.RepositoryError, match="holds cxr images, not fundus"):
        repo.add_cohort(session, "guessed", modality="fundus")
    assert loose.modality == "oct" and guessed.modality is None


# --- hostile archives and folders ---------------------------------------------------------------

def _png_bytes(seed: int = 0) -> bytes:
    import io as _io

    from PIL import Image as PILImage

    buffer = _io.BytesIO()
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_zip_members_that_leave_the_archive_or_are_links_are_not_read(session, tmp_path):
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/good.png", _png_bytes(1))
        zf.writestr("../escape.png", _png_bytes(2))
        zf.writestr("/abs/root.png", _png_bytes(3))
        link = zipfile.ZipInfo("link.png")
        link.create_system = 3
        link.external_attr = (0o120777 << 16)  # a symbolic link to /etc/passwd
        zf.writestr(link, "/etc/passwd")
    result = repo.import_images(session, [archive], "zips")
    assert [a.name for a in result.accepted] == ["hostile.zip:ok/good.png"]
    reasons = {r.name: r.reason for r in result.rejected}
    assert "path with '..'" in reasons["hostile.zip:../escape.png"]
    assert "absolute path" in reasons["hostile.zip:/abs/root.png"]
    assert "symbolic link" in reasons["hostile.zip:link.png"]


def test_a_zip_bomb_is_refused_before_it_is_expanded(session, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("scan.dcm", b"\0" * (8 * 1024**2))  # 8 MiB of zeros: ~8 KiB compressed, 1000x
        zf.writestr("fine.png", _png_bytes())
    result = repo.import_images(session, [bomb], "bombs")
    assert not result.accepted and len(result.rejected) == 1
    assert "zip bomb" in result.rejected[0].reason
    assert repo.count_images(session, quarantined=None) == 0
    many = tmp_path / "many.zip"
    from annotations.archive import ArchiveError, ArchiveLimits, safe_members

    with zipfile.ZipFile(many, "w") as zf:
        for index in range(30):
            zf.writestr(f"{index}.png", b"x")
    with zipfile.ZipFile(many) as zf, pytest.raises(ArchiveError, match="holds 30 files"):
        safe_members(zf, "many.zip", ArchiveLimits(max_members=20))
    with zipfile.ZipFile(many) as zf, pytest.raises(ArchiveError, match="expands to more than"):
        safe_members(zf, "many.zip", ArchiveLimits(max_total_bytes=10))


def test_confined_import_reads_nothing_outside_its_folders(session, tmp_path):
    root = tmp_path / "root"
    (root / "study").mkdir(parents=True)
    (root / "study" / "inside.png").write_bytes(_png_bytes(1))
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "outside.png").write_bytes(_png_bytes(2))
    (root / "study" / "sneaky.png").symlink_to(outside / "outside.png")  # a link that leaves the root
    result = repo.import_images(session, [root / "study", outside], "confined", confine_to=[root])
    assert [a.name for a in result.accepted] == ["inside.png"]
    reasons = {r.name: r.reason for r in result.rejected}
    assert "leaves the import folder" in reasons["sneaky.png"] and "not under the import folder" in reasons["secret"]


def test_a_cohort_named_like_sql_is_stored_and_listed_as_its_name(session, tmp_path):
    """Every statement is parameterised: the name is data, and the images table survives it."""
    name = "x'); DROP TABLE images;--"
    result = repo.import_images(session, [_png_file(tmp_path / "a.png")], name)
    assert not result.rejected
    repo.set_class_labels(session, repo.get_cohort(session, name), ["healthy", "x'; DELETE FROM users;--"])
    assert name in [c.name for c in repo.list_cohorts(session)]
    assert repo.count_images(session, name) == 1 and repo.list_images(session, name, search=name) == []
    assert session.scalar(select(func.count()).select_from(Image)) == 1


def _png_file(path):
    path.write_bytes(_png_bytes(5))
    return path


def test_a_dicom_with_phi_in_fifty_attributes_leaves_none_in_the_database_files_or_exports(session, tmp_path):
    """The issue's held-out check, rebuilt: PHI tokens in 50 text attributes that Table E.1-1 names
    (top level, nested in a kept sequence, private, file meta) and a file named after the patient.
    After import and every export, no token is in the stored file, the database or an export."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from softcam_core.imaging.deid import profile_table

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    tokens = []
    text_vrs = ("LO", "SH", "ST", "LT", "UT", "PN", "UC")
    rules = [r for r in profile_table() if r.keyword and "x" not in r.tag]
    for rule in rules:
        try:
            vr = dictionary_VR(rule.keyword).split(" or ")[0]
        except KeyError:
            continue
        if vr in text_vrs and len(tokens) < 46:
            token = f"PHITOKEN{len(tokens):03d}"
            setattr(ds, rule.keyword, token if vr != "PN" else f"{token}^Jane")
            tokens.append(token)
    item = Dataset()
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PatientName = "PHITOKENNESTED^X"
    item.ImageComments = "PHITOKENNESTEDCOMMENT"
    ds.ReferencedImageSequence = Sequence([item])
    ds.add_new(0x00110010, "LO", "HOSPITAL PRIVATE")
    ds.add_new(0x00111001, "LO", "PHITOKENPRIVATE")
    ds.file_meta.SourceApplicationEntityTitle = "PHITOKENAE"
    tokens += ["PHITOKENNESTED", "PHITOKENNESTEDCOMMENT", "PHITOKENPRIVATE", "PHITOKENAE"]
    assert len(tokens) == 50
    path = tmp_path / "Doe_Jane_PHITOKENFILE.dcm"
    ds.save_as(path)
    tokens.append("PHITOKENFILE")
    result = repo.import_images(session, [path], "phi")
    assert not result.rejected, result.rejected
    image = repo.get_image(session, result.accepted[0].image_id)
    repo.save_annotation(session, image, Box(1, 1, 9, 9), "lesion", None)
    blobs = {"stored file": repo.image_path(image).read_bytes()}
    for table in Image.metadata.sorted_tables:
        blobs[f"table {table.name}"] = repr([tuple(row) for row in session.execute(select(table))]).encode()
    for fmt, name in (("coco", "x.json"), ("voc", "voc.zip"), ("rsna", "r.csv"), ("yolo", "y.zip"), ("csv", "p.csv")):
        out = repo.export_annotations(session, fmt, "phi", tmp_path / "out" / name)
        if out.suffix == ".zip":
            with zipfile.ZipFile(out) as zf:
                blobs[fmt] = b"".join(zf.read(n) + n.encode() for n in zf.namelist())
        else:
            blobs[fmt] = out.read_bytes()
    for where, blob in blobs.items():
        leaked = [t for t in tokens if t.encode() in blob]
        assert not leaked and b"Doe_Jane" not in blob, (where, leaked)
