"""Several processes on one database (SQLite file and PostgreSQL): nothing lost, no "database is
locked", no silent overwrite, and a process killed mid-import leaves the database as it was."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from annotations.geometry import Box
from db import repository as repo
from db.schema import Annotation, AnnotationAudit, Image
from db.session import dispose_engines, session_scope

SAVES_PER_PROCESS = 200


def _make_images(engine, count: int = 2) -> list[int]:
    with session_scope(engine) as s:
        cohort = repo.add_cohort(s, "c")
        ids = []
        for n in range(count):
            sha = hashlib.sha256(f"image-{n}".encode()).hexdigest()
            image = Image(cohort_id=cohort.id, pseudonym=f"img-{sha[:16]}", sha256=sha,
                          modality="cxr", extension=".png", stored_path=f"images/{sha}.png", width=1000, height=1000,
                          metadata_json={})
            s.add(image)
            s.flush()
            ids.append(image.id)
        for name in ("alice", "bob"):
            repo.create_user(s, name, "annotator")
    return ids


# --- child processes (spawned: module-level functions) -----------------------------------------

def _save_many(url: str, image_id: int, username: str, count: int, start, errors) -> None:
    try:
        from db.session import get_engine

        engine = get_engine(url)
        start.wait(60)
        for i in range(count):
            # one transaction per save, as the annotate page does
            with session_scope(engine) as s:
                repo.save_annotation(s, image_id, Box(i, i, i + 5, i + 7), f"{username}-{i}", username)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        errors.put(f"{username}: {traceback.format_exc()}")


def _edit_same_box(url: str, annotation_id: int, image_id: int, username: str, start, results) -> None:
    try:
        from db.session import get_engine

        engine = get_engine(url)
        start.wait(60)
        with session_scope(engine) as s:
            repo.save_annotation(s, image_id, Box(0, 0, 50, 50), username, username, annotation_id=annotation_id,
                                 expected_version=1)
        results.put((username, "saved"))
    except repo.ConflictError as exc:
        results.put((username, f"conflict: {exc}"))
    except BaseException:  # noqa: BLE001
        results.put((username, f"error: {traceback.format_exc()}"))


def _import_and_hang(url: str, csv_path: str, marker: str) -> None:
    from db.session import get_engine

    def progress(done: int, total: int) -> None:
        if done >= 500 and not Path(marker).exists():
            Path(marker).write_text(str(done))
            time.sleep(120)  # killed here, in the middle of the write transaction

    with session_scope(get_engine(url)) as s:
        repo.import_annotations(s, csv_path, "csv", "c", "alice", progress=progress)


# --- tests -------------------------------------------------------------------------------------

def test_two_processes_save_hundreds_each_and_lose_none(engine):
    url = engine.url.render_as_string(hide_password=False)
    image_ids = _make_images(engine)
    dispose_engines()  # no pooled connection crosses into the children
    ctx = mp.get_context("spawn")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_save_many, args=(url, image_ids[k % 2], name, SAVES_PER_PROCESS, start, errors))
             for k, name in enumerate(("alice", "bob"))]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    for p in procs:
        p.join(240)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)
    assert [p.exitcode for p in procs] == [0, 0]

    with session_scope(engine, readonly=True) as s:
        labels = s.scalars(select(Annotation.label)).all()
        assert len(labels) == len(set(labels)) == 2 * SAVES_PER_PROCESS
        assert s.scalar(select(func.count()).select_from(AnnotationAudit)) == 2 * SAVES_PER_PROCESS
        for name in ("alice", "bob"):
            assert {f"{name}-{i}" for i in range(SAVES_PER_PROCESS)} <= set(labels)
        if engine.dialect.name == "sqlite":
            assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"


def test_two_users_editing_the_same_box_at_once(engine):
    url = engine.url.render_as_string(hide_password=False)
    [image_id, _] = _make_images(engine)
    with session_scope(engine) as s:
        annotation_id = repo.save_annotation(s, image_id, Box(1, 1, 9, 9), "lesion", "alice").id
    dispose_engines()
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_edit_same_box, args=(url, annotation_id, image_id, name, start, results))
             for name in ("alice", "bob")]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    for p in procs:
        p.join(120)
    outcomes = dict(results.get(timeout=10) for _ in procs)
    saved = [u for u, o in outcomes.items() if o == "saved"]
    conflicts = [o for o in outcomes.values() if o.startswith("conflict")]
    assert len(saved) == 1 and len(conflicts) == 1, outcomes
    assert f"changed by {saved[0]}" in conflicts[0] and "you edited version 1" in conflicts[0]
    with session_scope(engine, readonly=True) as s:
        [row] = repo.list_annotations(s, image_id)
        assert (row.version, row.label) == (2, saved[0])  # the winner's edit, not a blend or an overwrite
        assert [h.action for h in repo.annotation_history(s, annotation_id)] == ["create", "update"]


def test_conflict_between_two_open_sessions(engine):
    [image_id, _] = _make_images(engine)
    with session_scope(engine) as s:
        annotation = repo.save_annotation(s, image_id, Box(1, 1, 9, 9), "lesion", "alice")
    loaded_version = annotation.version  # both users opened the page at version 1
    with session_scope(engine) as s:
        repo.save_annotation(s, image_id, Box(2, 2, 9, 9), "lesion", "bob", annotation_id=annotation.id,
                             expected_version=loaded_version)
    with pytest.raises(repo.ConflictError, match="changed by bob"), session_scope(engine) as s:
        repo.save_annotation(s, image_id, Box(3, 3, 9, 9), "lesion", "alice", annotation_id=annotation.id,
                             expected_version=loaded_version)
    with session_scope(engine, readonly=True) as s:
        assert repo.annotation_geometry(repo.list_annotations(s, image_id)[0]) == Box(2, 2, 9, 9)


def test_process_killed_mid_import_leaves_database_unchanged(engine, tmp_path):
    url = engine.url.render_as_string(hide_password=False)
    image_ids = _make_images(engine)
    with session_scope(engine) as s:
        repo.save_annotation(s, image_ids[0], Box(0, 0, 1, 1), "before", "alice")
        pseudonyms = [repo.get_image(s, i).pseudonym for i in image_ids]
    big = tmp_path / "big.csv"
    big.write_text("image,x0,y0,x1,y1,label\n" + "".join(
        f"{pseudonyms[i % 2]},{i % 900},{i % 800},{i % 900 + 10},{i % 800 + 10},l{i % 7}\n" for i in range(1500)))
    marker = tmp_path / "marker"
    dispose_engines()
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_import_and_hang, args=(url, str(big), str(marker)))
    proc.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"import never reached row 500 (exit code {proc.exitcode})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL

    with session_scope(engine, readonly=True) as s:
        assert s.scalars(select(Annotation.label)).all() == ["before"]
        assert s.scalar(select(func.count()).select_from(AnnotationAudit)) == 1
    # the database is usable at once: the same import now runs to the end
    with session_scope(engine) as s:
        assert repo.import_annotations(s, big, "csv", "c", "alice").added == 1500


def test_app_instances_upgrading_together(db_url):
    """Several app processes starting at once each call upgrade(); all succeed, one schema results."""
    from concurrent.futures import ThreadPoolExecutor

    from db.session import get_engine, head_revision, upgrade

    engine = get_engine(db_url)
    with ThreadPoolExecutor(4) as pool:
        revisions = list(pool.map(lambda _: upgrade(engine), range(4)))
    assert revisions == [head_revision()] * 4
    with session_scope(engine, readonly=True) as s:
        assert s.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_a_read_only_scope_reads_without_the_write_lock_and_refuses_writes(engine):
    """Page reads run in read-only scopes: they never queue behind a writer on SQLite, and a write in
    one (a bug) raises instead of vanishing in the scope's rollback."""
    import sqlalchemy.exc
    from sqlalchemy import select

    from db import repository
    from db.schema import User

    with session_scope(engine) as s:
        repository.create_user(s, "reader-test", "annotator", "pw-123456")
    with session_scope(engine) as writer:  # an open write transaction holds SQLite's write lock
        writer.add(User(username="pending-writer", role="annotator", password_hash="x"))
        writer.flush()
        with session_scope(engine, readonly=True) as reader:  # reads at once, sees only committed rows
            names = set(reader.scalars(select(User.username)))
        assert "reader-test" in names and "pending-writer" not in names
    with pytest.raises(sqlalchemy.exc.DBAPIError):
        with session_scope(engine, readonly=True) as s:
            s.add(User(username="sneaky", role="annotator", password_hash="x"))
            s.flush()
    with session_scope(engine) as s:  # the connection went back to the pool writable
        s.add(User(username="after", role="annotator", password_hash="x"))
    with session_scope(engine, readonly=True) as s:
        names = set(s.scalars(select(User.username)))
    assert "after" in names and "sneaky" not in names


def test_a_change_committed_between_read_and_write_is_a_conflict_not_a_lost_update(engine):
    """The window the ORM's version_id_col closes: the other user commits after this session read the
    annotation (at the version the user loaded) and before its UPDATE. That UPDATE matches no row
    (``WHERE version = 1``) and the save is refused, naming the winner."""
    from sqlalchemy import event

    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite serialises writers with BEGIN IMMEDIATE: no other commit can fall in the window")
    [image_id, _] = _make_images(engine)
    with session_scope(engine) as s:
        annotation_id = repo.save_annotation(s, image_id, Box(1, 1, 9, 9), "lesion", "alice").id
    with pytest.raises(repo.ConflictError, match="changed by bob.*you edited version 1"):
        with session_scope(engine) as mine:
            fired = []

            def bob_saves_first(session, flush_context, instances):
                if fired:
                    return
                fired.append(True)
                with session_scope(engine) as theirs:
                    repo.save_annotation(theirs, image_id, Box(2, 2, 9, 9), "bob's", "bob",
                                         annotation_id=annotation_id, expected_version=1)

            event.listen(mine, "before_flush", bob_saves_first)
            repo.save_annotation(mine, image_id, Box(3, 3, 9, 9), "alice's", "alice",
                                 annotation_id=annotation_id, expected_version=1)
    with session_scope(engine, readonly=True) as s:
        [row] = repo.list_annotations(s, image_id)
        assert (row.version, row.label) == (2, "bob's")
        assert [h.action for h in repo.annotation_history(s, annotation_id)] == ["create", "update"]
