"""Cohort folders (``softcam synth`` layout) found on disk and registered in the database."""

from __future__ import annotations

from pathlib import Path


def find_cohort_folders(*roots: str | Path) -> dict[str, Path]:
    """``{name: folder}`` for every folder under ``roots`` laid out like ``softcam synth`` output
    (``images/`` and ``labels.csv``), one level deep; default roots: ``SOFTCAM_HOME/demo`` and
    ``SOFTCAM_HOME/cohorts``. Names are ``<root name>-<folder name>`` (e.g. ``demo-fundus``)."""
    from softcam_core.paths import softcam_home

    if not roots:
        roots = (softcam_home() / "demo", softcam_home() / "cohorts")
    found: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if (folder / "images").is_dir() and (folder / "labels.csv").is_file():
                found[f"{root.name}-{folder.name}"] = folder
    return found


def register_cohort_folder(session, folder: str | Path, name: str, modality: str | None = None, user=None):
    """Import a ``softcam synth``-style folder into the database as cohort ``name`` (idempotent).

    Images go through ``db.repository.import_images`` (decoded, de-identified, content-addressed),
    their class label and split come from ``labels.csv``, and ``annotations.json`` (COCO, when present)
    through ``db.repository.import_annotations``. Returns the image import result.
    """
    import csv

    from db import repository

    folder = Path(folder)
    result = repository.import_images(session, [folder / "images"], name, modality=modality)
    cohort = repository.get_cohort(session, name)
    with open(folder / "labels.csv", newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    classes = list(dict.fromkeys(row["label"] for row in rows.values()))
    meta_path = folder / "synth_meta.json"
    if meta_path.is_file():
        import json

        classes = list(json.loads(meta_path.read_text()).get("classes") or classes)
    repository.set_class_labels(session, cohort, classes)
    for accepted in result.accepted:
        row = rows.get(Path(accepted.name).name) or rows.get(accepted.name)
        if row is not None:
            repository.set_image_label(session, repository.get_image(session, accepted.image_id),
                                       row["label"], row.get("split"), source="cohort folder")
    coco = folder / "annotations.json"
    if coco.is_file():
        repository.import_annotations(session, coco, "coco", cohort, user)
    return result


class ServerFolderError(PermissionError):
    """A server folder the app will not read; the message names the import root, never the path."""


def server_import_folder(text: str) -> Path:
    """The folder (or file) ``text`` names, for the app's "folder on the server" import.

    Only paths under the configured import root (``SOFTCAM_IMPORT_ROOT``,
    :func:`softcam_core.paths.import_root`) are read, with symbolic links resolved; relative paths
    are taken from the root. Raises :class:`ServerFolderError` when no root is configured or the
    path is outside it or does not exist. The message says the same in both cases, so it does not
    tell whether a path exists outside the root.
    """
    from softcam_core.paths import import_root, within

    root = import_root()
    if root is None:
        raise ServerFolderError("server-folder import is off (no SOFTCAM_IMPORT_ROOT is configured)")
    path = Path(text.strip()).expanduser()
    path = path if path.is_absolute() else root / path
    if not within(path, root):
        raise ServerFolderError(f"only files and folders that exist under the import folder {root} can be imported")
    return path.resolve()
