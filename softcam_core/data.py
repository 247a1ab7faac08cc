"""Cohort folders (the ``softcam synth`` layout) for training and evaluation.

A cohort folder holds::

    labels.csv          image,label[,split]  (more columns are allowed and ignored)
    images/             the files labels.csv names (a name is looked up in images/, then in the folder)
    annotations.json    optional COCO boxes, original image pixels
    masks/<stem>.png    optional lesion masks (non-zero = lesion), same H x W as the image
    synth_meta.json     optional, written by ``softcam synth`` (modality, class order, lesion facts)

Two more layouts a researcher already has are read for training (and evaluation):

* a folder of images with a label CSV elsewhere (``CohortFolder(root, labels=L.csv)``): any layout
  of :func:`softcam_core.labels.read_label_rows` (``image,label[,split]``, Kaggle DR
  ``image,level``, RSNA ``patientId,Target``); images are looked up in ``root/images`` then ``root``;
* an ImageFolder tree (:class:`ImageFolderTree`): ``root/<class>/<file>``, or
  ``root/<split>/<class>/<file>`` with split folders train / val / test, as torchvision's
  ``ImageFolder`` reads it.

Where the source has no split, :func:`open_cohort` (``assign_splits=(fractions, seed)``) gives each
image a stratified, seeded split (:func:`softcam_core.labels.stratified_splits`), and
:func:`write_splits` saves it as a label CSV that reproduces it.

:class:`CohortFolder` reads and checks it; :class:`CohortDataset` serves model inputs through the
one preprocessing path, :func:`softcam_core.imaging.preprocess`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

STANDARD_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
# names of a "no disease" class: it takes index 0, so in a binary cohort index 1 is the disease
# (the convention of AUC, of the evaluation's default target and of the synthetic cohorts)
NEGATIVE_CLASS_NAMES = ("healthy", "normal", "negative", "no_finding", "no finding", "nofinding", "none", "grade0", "0")


class CohortError(ValueError):
    """A malformed cohort folder; ``str(e)`` is one line: ``"<file>: <problem>"``."""


@dataclass(frozen=True)
class Record:
    """One image of a cohort: its file, its stem (file name without suffix: the key of masks and
    boxes), its class index into :attr:`CohortFolder.classes`, the class name and its split
    (``train``/``val``/``test``, or ``""`` when labels.csv has no split column)."""

    path: Path
    stem: str
    label_index: int
    label: str
    split: str


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name) if part]


def order_classes(names: Sequence[str]) -> list[str]:
    """Class order of a cohort: natural sort (``grade2`` before ``grade10``), with a "no disease"
    class (healthy, normal, negative, no finding, grade0) first. ``["diseased", "healthy"]`` ->
    ``["healthy", "diseased"]``; ``["grade1", "grade0", "grade2"]`` -> ``["grade0", "grade1", "grade2"]``."""
    ordered = sorted(set(names), key=_natural_key)
    negatives = [n for n in ordered if n.strip().lower() in NEGATIVE_CLASS_NAMES]
    if len(negatives) == 1:
        ordered.remove(negatives[0])
        ordered.insert(0, negatives[0])
    return ordered


class SplitRecords:
    """Split selection and image lookup shared by the cohort sources ``evaluate_cohort`` reads (a
    :class:`CohortFolder`, or a database cohort in ``db/evaluation.py``).

    Subclasses provide ``records`` (each with ``.split``), ``_by_stem`` (image key -> record) and
    ``_where`` (what bad-input messages name).
    """

    records: list
    _by_stem: dict
    _where: object
    # how the records got their splits when the source had none: {"fractions": [...], "seed": n}
    splits_assigned: dict | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def splits(self) -> list[str]:
        """Split names present, standard ones first (train, val, test)."""
        present = {r.split for r in self.records if r.split}
        return [s for s in STANDARD_SPLITS if s in present] + sorted(present - set(STANDARD_SPLITS))

    def split(self, name: str) -> list:
        """Records of split ``name`` in source order; ``"all"`` gives every record (images without a
        split too). A standard split (train/val/test) with no image gives ``[]``; any other unknown
        name raises :class:`CohortError`."""
        if name == "all":
            return list(self.records)
        chosen = [r for r in self.records if r.split == name]
        if not chosen and name not in STANDARD_SPLITS:
            raise CohortError(f"{self._where}: no split named {name!r} (splits: {', '.join(self.splits) or 'none'})")
        return chosen

    def data_hash(self) -> str:
        """SHA-256 (hex) of the content: every record's file name, label and split, in order, and the
        bytes of every image. Independent of where the files live; changes when any label, split or
        image byte changes."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(f"{record.path.name}\x1f{record.label}\x1f{record.split}\x1e".encode())
            digest.update(hashlib.sha256(record.path.read_bytes()).digest())
        return digest.hexdigest()

    def assign_splits(self, fractions: Sequence[float], seed: int = 0) -> bool:
        """Give every record a stratified, seeded split (:func:`softcam_core.labels.stratified_splits`)
        when none has one; True when it did. A source where some images have a split and others do
        not raises :class:`CohortError` (a half-split cohort is ambiguous)."""
        from softcam_core.labels import check_fractions, stratified_splits

        have = [bool(r.split) for r in self.records]
        if all(have):
            return False
        if any(have):
            missing = sum(1 for h in have if not h)
            raise CohortError(f"{self._where}: {missing} of {len(have)} images have no split; give every image "
                              "a split (train/val/test) or none, so one can be assigned")
        try:
            fractions = check_fractions(fractions)
        except ValueError as exc:
            raise CohortError(f"{self._where}: {exc}") from None
        splits = stratified_splits([r.label for r in self.records], fractions, seed)
        self.records = [replace(r, split=s) for r, s in zip(self.records, splits)]
        self._reindex()
        self.splits_assigned = {"fractions": list(fractions), "seed": int(seed)}
        return True

    def _reindex(self) -> None:
        """Rebuild the image lookup after :attr:`records` changed."""
        self._by_stem = {r.stem: r for r in self.records}

    def record(self, stem: str):
        """The record of image ``stem`` (file name without suffix; a database cohort also takes the
        pseudonym)."""
        try:
            return self._by_stem[stem]
        except KeyError:
            raise CohortError(f"{self._where}: no image with stem {stem!r}") from None


class CohortFolder(SplitRecords):
    """A cohort folder read from disk (see module doc); checks labels.csv and that every image exists.

    Attributes: ``root`` (Path), ``classes`` (class names; index = label_index), ``records``
    (list of :class:`Record` in labels.csv order), ``modality`` (from synth_meta.json, else None),
    ``labels_path``. Bad input raises :class:`CohortError` naming the file and the problem.
    """

    def __init__(self, root: str | Path, labels: str | Path | None = None, *, image_col: str | None = None,
                 label_col: str | None = None, classes: Sequence[str] | None = None):
        """``labels``: a label CSV in any layout of :func:`softcam_core.labels.read_label_rows`
        (default ``root/labels.csv``, the synth layout ``image,label[,split]``); ``image_col`` /
        ``label_col`` name its columns; ``classes``: the negative,positive class names of the
        numeric layouts (Kaggle DR grade, RSNA Target), default healthy,diseased."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise CohortError(f"{self.root}: not a folder (expected a cohort folder with labels.csv and images/)")
        self.labels_path = Path(labels) if labels is not None else self.root / "labels.csv"
        if not self.labels_path.is_file():
            if labels is not None:
                raise CohortError(f"{self.labels_path}: label file not found")
            raise CohortError(f"{self.labels_path}: missing; a cohort folder needs labels.csv with columns image,label[,split]")
        self.meta = self._read_meta()
        self.modality: str | None = self.meta.get("modality")
        if labels is None:
            rows = self._read_rows()
        else:
            rows = self._read_label_file(image_col, label_col, classes)
        self.classes = self._class_order([label for _, _, label, _ in rows])
        if classes and labels is not None and set(classes) >= set(self.classes):
            self.classes = [str(c) for c in classes]
        index = {name: i for i, name in enumerate(self.classes)}
        self.records = [Record(path, path.stem, index[label], label, split) for _, path, label, split in rows]
        self._by_stem = {r.stem: r for r in self.records}
        self._boxes: dict[str, list[tuple[np.ndarray, str | None]]] | None = None

    # -- reading --------------------------------------------------------------------------------

    def _read_meta(self) -> dict:
        path = self.root / "synth_meta.json"
        if not path.is_file():
            return {}
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CohortError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise CohortError(f"{path}: expected a JSON object")
        return meta

    def _read_rows(self) -> list[tuple[int, Path, str, str]]:
        name = self.labels_path
        try:
            with open(name, newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    raise CohortError(f"{name}: empty file; expected a header line image,label[,split]")
                columns = [c.strip().lower() for c in header]
                missing = [c for c in ("image", "label") if c not in columns]
                if missing:
                    raise CohortError(
                        f"{name}: missing column(s) {', '.join(missing)}; the header must name image,label[,split], got {','.join(header)}"
                    )
                duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
                if duplicated:
                    raise CohortError(f"{name}: column(s) {', '.join(duplicated)} appear more than once in the header")
                col = {c: columns.index(c) for c in ("image", "label", "split") if c in columns}
                rows, seen = [], {}
                for line, row in enumerate(reader, start=2):
                    if not any(cell.strip() for cell in row):
                        continue  # blank line
                    if len(row) < len(columns):
                        raise CohortError(f"{name}: line {line}: expected {len(columns)} fields, got {len(row)}")
                    image, label = row[col["image"]].strip(), row[col["label"]].strip()
                    split = row[col["split"]].strip() if "split" in col else ""
                    if not image:
                        raise CohortError(f"{name}: line {line}: empty image name")
                    if not label:
                        raise CohortError(f"{name}: line {line}: empty label for {image}")
                    if "split" in col and not split:
                        raise CohortError(f"{name}: line {line}: empty split for {image}")
                    path = self._resolve(image, line)
                    if path.stem in seen:
                        raise CohortError(f"{name}: line {line}: image {image} has the same stem as line {seen[path.stem]}; stems key masks and boxes")
                    seen[path.stem] = line
                    rows.append((line, path, label, split))
        except UnicodeDecodeError as exc:
            raise CohortError(f"{name}: not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise CohortError(f"{name}: not a readable CSV file ({exc})") from None
        if not rows:
            raise CohortError(f"{name}: no images listed")
        return rows

    def _read_label_file(self, image_col: str | None, label_col: str | None,
                         classes: Sequence[str] | None) -> list[tuple[int, Path, str, str]]:
        from softcam_core.labels import DEFAULT_BINARY_CLASSES, LabelFileError, read_label_rows

        try:
            _, _, label_rows = read_label_rows(self.labels_path, image_col=image_col, label_col=label_col,
                                               classes=tuple(classes or DEFAULT_BINARY_CLASSES),
                                               source=str(self.labels_path))
        except LabelFileError as exc:
            raise CohortError(str(exc)) from None
        problems = [(row.line, row.problem) for row in label_rows if row.problem]
        rows, seen = [], {}
        for row in label_rows:
            if row.problem:
                continue
            try:
                path = self._resolve(row.ref, row.line)
            except CohortError as exc:
                problems.append((row.line, str(exc).split(f"line {row.line}: ", 1)[-1]))
                continue
            if path.stem in seen:
                problems.append((row.line, f"image {row.ref} has the same stem as line {seen[path.stem]}; stems key masks and boxes"))
                continue
            seen[path.stem] = row.line
            rows.append((row.line, path, row.label, row.split))
        if problems:
            problems.sort()
            shown = "; ".join(f"line {line}: {text}" for line, text in problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CohortError(f"{self.labels_path}: {len(problems)} row(s) not usable ({shown}{more})")
        if not rows:
            raise CohortError(f"{self.labels_path}: no images listed")
        return rows

    def _resolve(self, image: str, line: int) -> Path:
        given = Path(image)
        candidates = [given] if given.is_absolute() else [self.root / "images" / given, self.root / given]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        # label files often name an image by its stem (Kaggle DR's "650_left" for 650_left.png)
        for candidate in candidates:
            found = [candidate.with_name(candidate.name + suffix) for suffix in IMAGE_SUFFIXES]
            found = [path for path in found if path.is_file()]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise CohortError(f"{self.labels_path}: line {line}: image {image} is ambiguous "
                                  f"({', '.join(p.name for p in found)}); name it with its suffix")
        raise CohortError(
            f"{self.labels_path}: line {line}: image file {image} not found (looked in {self.root / 'images'} and {self.root})"
        )

    def _class_order(self, labels: list[str]) -> list[str]:
        declared = self.meta.get("classes")
        if isinstance(declared, list) and set(declared) >= set(labels) and len(set(declared)) == len(declared):
            return [str(c) for c in declared]
        return order_classes(labels)

    # -- access ---------------------------------------------------------------------------------

    @property
    def _where(self) -> Path:
        return self.labels_path

    def __repr__(self) -> str:
        return f"CohortFolder({str(self.root)!r}, {len(self.records)} images, classes={self.classes})"

    @property
    def source(self) -> str:
        """What the cohort was read from, for checkpoint metadata: the folder, and the label file
        when it is not the folder's own labels.csv."""
        own = self.labels_path == self.root / "labels.csv"
        return str(self.root.resolve()) + ("" if own else f" (labels {self.labels_path.resolve()})")

    def mask(self, stem: str) -> np.ndarray | None:
        """Lesion mask of image ``stem``: bool (H, W) in original image pixels, or None when the folder
        has no mask for it (``masks/<stem>.png``, ``.tif``, ``.tiff`` or ``.bmp``)."""
        from annotations.formats import MASK_SUFFIXES, read_mask_array

        self.record(stem)
        for suffix in MASK_SUFFIXES:
            path = self.root / "masks" / f"{stem}{suffix}"
            if path.is_file():
                try:
                    return read_mask_array(path.read_bytes(), path.name)
                except ValueError as exc:
                    raise CohortError(f"{path}: {exc}") from None
        return None

    def boxes(self, stem: str, label: str | None = None) -> np.ndarray:
        """Boxes of image ``stem`` from annotations.json: float64 (N, 4) ``x0, y0, x1, y1`` in original
        image pixels, exclusive end; (0, 4) when the image has none or there is no annotations.json.
        ``label`` keeps only boxes of that category."""
        self.record(stem)
        entries = self._load_boxes().get(stem, [])
        rows = [box for box, name in entries if label is None or name == label]
        return np.array(rows, dtype=np.float64).reshape(-1, 4)

    def box_labels(self, stem: str) -> list[str | None]:
        """Category names of :meth:`boxes` (same order)."""
        self.record(stem)
        return [name for _, name in self._load_boxes().get(stem, [])]

    def _load_boxes(self) -> dict[str, list[tuple[np.ndarray, str | None]]]:
        if self._boxes is not None:
            return self._boxes
        from annotations.formats import AnnotationFormatError, folder_resolver, read_coco

        path = self.root / "annotations.json"
        self._boxes = {}
        if not path.is_file():
            return self._boxes
        resolve = folder_resolver({r.path.name: (None, None) for r in self.records})
        try:
            report = read_coco(path, resolve)
        except AnnotationFormatError as exc:
            raise CohortError(f"{path}: {str(exc).split(': ', 1)[-1]}") from None
        if report.errors:
            first = report.errors[0]
            raise CohortError(f"{path}: {first.location}: {first.problem}" + (f" (and {len(report.errors) - 1} more problems)" if len(report.errors) > 1 else ""))
        for parsed in report.annotations:
            box = parsed.geometry
            if getattr(box, "kind", None) != "box":
                continue
            stem = Path(parsed.image).stem
            self._boxes.setdefault(stem, []).append((np.array([box.x0, box.y0, box.x1, box.y1], dtype=np.float64), parsed.label))
        return self._boxes


class ImageFolderTree(SplitRecords):
    """An ImageFolder tree read from disk: ``root/<class>/<file>`` or ``root/<split>/<class>/<file>``
    (split folders named train, val and/or test), the layout torchvision's ``ImageFolder`` reads.

    Files with an image suffix (:data:`IMAGE_SUFFIXES`, any case) count; hidden files and folders
    are skipped. Records are in class-then-natural-file-name order; a record's ``stem`` is its path
    below the class folder without suffix (unique within the tree; two files with one stem in one
    class folder are an error). Attributes as :class:`CohortFolder` (``root``, ``classes``,
    ``records``, ``modality`` None, ``labels_path`` None); no boxes or masks.
    """

    labels_path = None
    modality = None

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CohortError(f"{self.root}: not a folder")
        top = self._subfolders(self.root)
        split_names = [d.name for d in top if d.name in STANDARD_SPLITS]
        if split_names and len(split_names) != len(top):
            others = ", ".join(d.name for d in top if d.name not in STANDARD_SPLITS)
            raise CohortError(f"{self.root}: mixes split folders ({', '.join(split_names)}) with other folders ({others}); "
                              "use root/<class>/<file> or root/<train|val|test>/<class>/<file>")
        entries: list[tuple[str, str, Path]] = []  # (split, class, file)
        for split_dir in (top if split_names else [self.root]):
            split = split_dir.name if split_names else ""
            for class_dir in self._subfolders(split_dir):
                for path in sorted(class_dir.rglob("*"), key=lambda p: _natural_key(str(p.relative_to(class_dir)))):
                    parts = path.relative_to(class_dir).parts
                    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in parts):
                        entries.append((split, class_dir.name, path))
        if not entries:
            raise CohortError(f"{self.root}: no images found; an ImageFolder tree holds root/<class>/<file> "
                              f"(or root/<split>/<class>/<file>) with files ending {', '.join(IMAGE_SUFFIXES)}")
        self.classes = order_classes([label for _, label, _ in entries])
        if len(self.classes) < 1:
            raise CohortError(f"{self.root}: no class folders")
        index = {name: i for i, name in enumerate(self.classes)}
        self.records, seen = [], {}
        for split, label, path in entries:
            base = self.root / split if split else self.root
            stem = (path.relative_to(base).with_suffix("")).as_posix()
            if stem in seen:
                raise CohortError(f"{self.root}: {path.relative_to(self.root)} and {seen[stem].relative_to(self.root)} "
                                  "are one image name twice; rename one")
            seen[stem] = path
            self.records.append(Record(path, stem, index[label], label, split))
        self.records.sort(key=lambda r: (r.label_index, _natural_key(r.stem)))
        self._reindex()

    @staticmethod
    def _subfolders(folder: Path) -> list[Path]:
        return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: _natural_key(d.name))

    @property
    def _where(self) -> Path:
        return self.root

    @property
    def source(self) -> str:
        return f"{self.root.resolve()} (ImageFolder tree)"

    def __repr__(self) -> str:
        return f"ImageFolderTree({str(self.root)!r}, {len(self.records)} images, classes={self.classes})"

    def mask(self, stem: str) -> None:
        """An ImageFolder tree has no lesion masks: always None (after checking ``stem``)."""
        self.record(stem)
        return None

    def boxes(self, stem: str, label: str | None = None) -> np.ndarray:
        """An ImageFolder tree has no boxes: (0, 4)."""
        self.record(stem)
        return np.zeros((0, 4), dtype=np.float64)


def open_cohort(path: str | Path, labels: str | Path | None = None, *, image_col: str | None = None,
                label_col: str | None = None, classes: Sequence[str] | None = None,
                assign_splits: tuple[Sequence[float], int] | None = None) -> SplitRecords:
    """The cohort at ``path``, whichever of the three layouts it has (module doc):

    * ``labels`` given: a folder of images with that label CSV (:class:`CohortFolder`);
    * ``path/labels.csv`` present: a cohort folder (synth layout);
    * otherwise an ImageFolder tree (:class:`ImageFolderTree`).

    ``assign_splits=(fractions, seed)``: when no image has a split, give each a stratified seeded
    split (recorded in ``splits_assigned``). Raises :class:`CohortError` naming the problem.
    """
    path = Path(path)
    if not path.is_dir():
        raise CohortError(f"{path}: not a folder (expected a cohort folder with labels.csv, a folder of "
                          "images with --labels L.csv, or an ImageFolder tree root/<class>/<file>)")
    if labels is not None or (path / "labels.csv").is_file():
        source: SplitRecords = CohortFolder(path, labels, image_col=image_col, label_col=label_col, classes=classes)
    elif image_col or label_col:
        raise CohortError(f"{path}: --image-col / --label-col need a label file (--labels L.csv)")
    else:
        source = ImageFolderTree(path)
    if assign_splits is not None:
        source.assign_splits(*assign_splits)
    return source


def write_splits(source: SplitRecords, path: str | Path) -> Path:
    """Write ``image,label,split`` (one row per record, source order) to ``path``: a label CSV that
    :class:`CohortFolder` (``labels=path``) reads back into the same records and splits. ``image``
    is the file's path relative to the source's folder (its pseudonym for a database cohort)."""
    path = Path(path)
    root = getattr(source, "root", None)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "split"])
        for record in source.records:
            if isinstance(root, Path):
                try:
                    image = record.path.relative_to(root).as_posix()
                except ValueError:
                    image = str(record.path)
            else:
                image = getattr(record, "pseudonym", None) or record.stem
            writer.writerow([image, record.label, record.split])
    return path


class CohortDataset(Dataset):
    """Model inputs of one split of a cohort (a ``torch.utils.data.Dataset``).

    ``dataset[i]`` is ``(x, label_index)``: x float32 (3, img_size, img_size), made by
    :func:`softcam_core.imaging.load_image` then :func:`softcam_core.imaging.preprocess` with
    ``mean``/``std`` (the checkpoint's normalisation), then ``augment(x)`` when given (a callable
    tensor (3, S, S) -> tensor (3, S, S), run on every access). ``split``: train/val/test or ``"all"``.
    ``modality``: passed to load_image (default: the folder's, else inferred per file).
    ``cache``: keep preprocessed tensors in memory (``3 * S * S * 4`` bytes per image) so later
    epochs skip decoding.
    """

    def __init__(
        self,
        folder: SplitRecords | str | Path,
        split: str,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable | None = None,
        modality: str | None = None,
        cache: bool = True,
    ):
        self.folder = folder if isinstance(folder, SplitRecords) else open_cohort(folder)
        self.split_name = split
        self.records = self.folder.split(split)
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.modality = modality or getattr(self.folder, "modality", None)
        self.cache = cache
        self._cache: dict[int, object] = {}

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    @property
    def targets(self) -> list[int]:
        """Label index of every item (for class-balanced sampling)."""
        return [r.label_index for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int):
        """(MedicalImage, Geometry, x) of item ``index`` before augmentation, x float32 (3, S, S)."""
        from softcam_core.imaging import load_image, preprocess

        record = self.records[index]
        image = load_image(record.path, modality=self.modality)
        x, geometry = preprocess(image, self.img_size, self.mean, self.std)
        return image, geometry, x

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} images")
        x = self._cache.get(index) if self.cache else None
        if x is None:
            _, _, x = self.load(index)
            if self.cache:
                self._cache[index] = x
        if self.augment is not None:
            x = self.augment(x.clone())
        return x, self.records[index].label_index
