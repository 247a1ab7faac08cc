"""Cohort folders (the ``softcam synth`` layout) for training and evaluation.

A cohort folder holds::

    labels.csv          image,label[,split]  (more columns are allowed and ignored)
    images/             the files labels.csv names (a name is looked up in images/, then in the folder)
    annotations.json    optional COCO boxes, original image pixels
    masks/<stem>.png    optional lesion masks (non-zero = lesion), same H x W as the image
    synth_meta.json     optional, written by ``softcam synth`` (modality, class order, lesion facts)

:class:`CohortFolder` reads and checks it; :class:`CohortDataset` serves model inputs through the
one preprocessing path, :func:`softcam_core.imaging.preprocess`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

STANDARD_SPLITS = ("train", "val", "test")
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

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CohortError(f"{self.root}: not a folder (expected a cohort folder with labels.csv and images/)")
        self.labels_path = self.root / "labels.csv"
        if not self.labels_path.is_file():
            raise CohortError(f"{self.labels_path}: missing; a cohort folder needs labels.csv with columns image,label[,split]")
        self.meta = self._read_meta()
        self.modality: str | None = self.meta.get("modality")
        rows = self._read_rows()
        self.classes = self._class_order([label for _, _, label, _ in rows])
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

    def _resolve(self, image: str, line: int) -> Path:
        given = Path(image)
        candidates = [given] if given.is_absolute() else [self.root / "images" / given, self.root / given]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
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

    def data_hash(self) -> str:
        """SHA-256 (hex) of the cohort's content: every record's file name, label and split, in order,
        and the bytes of every image. Independent of where the folder lives; changes when any label,
        split or image byte changes."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(f"{record.path.name}\x1f{record.label}\x1f{record.split}\x1e".encode())
            digest.update(hashlib.sha256(record.path.read_bytes()).digest())
        return digest.hexdigest()


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
        folder: CohortFolder | str | Path,
        split: str,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable | None = None,
        modality: str | None = None,
        cache: bool = True,
    ):
        self.folder = folder if isinstance(folder, CohortFolder) else CohortFolder(folder)
        self.split_name = split
        self.records = self.folder.split(split)
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.modality = modality or self.folder.modality
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
