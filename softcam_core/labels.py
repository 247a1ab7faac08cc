"""Image-level label files and stratified splits: pure functions shared by training folders
(:mod:`softcam_core.data`) and database cohorts (:mod:`db.repository.labels`).

CSV layouts (:func:`read_label_rows`; the header decides, or ``image_col`` / ``label_col``):

==================  ========================  =================================================
layout              columns                   label
==================  ========================  =================================================
``plain``           ``image,label``           the text as given (a class name)
``kaggle_dr``       ``image,level``           DR grade 0-4 -> onset: 0 -> negative class,
                                              1-4 -> positive class (SoftCAM's binary task
                                              "{0} vs {1-4}", the ``onset1`` column)
``rsna``            ``patientId,Target``      0 -> negative class, 1 -> positive class (one row
                                              per box: rows of one patient must agree)
==================  ========================  =================================================

A ``split`` column (train / val / test), when present, is read too.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_BINARY_CLASSES = ("healthy", "diseased")
IMAGE_COLUMNS = ("image", "filename", "file", "patientid", "image_id", "id", "name")
LABEL_COLUMNS = ("label", "level", "gt_level", "target", "class")
MAX_LABEL_ROWS = 1_000_000


class LabelFileError(ValueError):
    """A file that is not a usable label CSV (no image / label column, not UTF-8); one line."""


@dataclass(frozen=True)
class LabelRow:
    line: int          # 1-based line number in the file (header = 1)
    ref: str           # the image as the file names it
    value: str         # the label cell as written
    label: str | None  # the class name it maps to (None: a bad value, see problem)
    problem: str = ""
    split: str = ""    # the split cell ("" when the file has no split column)


def _layout(label_col: str) -> str:
    if label_col.lower().endswith("level"):  # Kaggle's "level", the clinician study's "gt_level"
        return "kaggle_dr"
    if label_col.lower() == "target":
        return "rsna"
    return "plain"


def read_label_rows(data: bytes | str | Path, *, image_col: str | None = None, label_col: str | None = None,
                    classes: Sequence[str] = DEFAULT_BINARY_CLASSES, source: str = "labels") -> tuple[str, str, list[LabelRow]]:
    """``(layout, image column, rows)`` of a label CSV (see the module table); one row per image
    (RSNA's repeated rows folded, disagreeing ones reported as rows with a ``problem``).

    ``classes``: the negative and positive class names of the numeric layouts. ``data``: the file's
    bytes or text, or its path. Raises :class:`LabelFileError` for a file that is not a CSV with
    the needed columns.
    """
    if isinstance(data, Path):
        source = source if source != "labels" else str(data)
        data = data.read_bytes()
    try:
        text = data.decode("utf-8-sig", errors="strict") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{source}: not UTF-8 text ({exc.reason})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise LabelFileError(f"{source}: not a readable CSV file ({exc})") from None
    by_lower = {h.lower(): h for h in header}

    def pick(given: str | None, candidates: Sequence[str], what: str) -> str:
        if given:
            if given not in header and given.lower() not in by_lower:
                raise LabelFileError(f"{source}: no column {given!r} (columns: {', '.join(header) or 'none'})")
            return by_lower.get(given.lower(), given)
        for name in candidates:
            if name in by_lower:
                return by_lower[name]
        raise LabelFileError(f"{source}: no {what} column (looked for {', '.join(candidates)}; "
                             f"columns: {', '.join(header) or 'none'}); name it with --{what}-col")

    image_key, label_key = pick(image_col, IMAGE_COLUMNS, "image"), pick(label_col, LABEL_COLUMNS, "label")
    split_key = by_lower.get("split")
    layout = _layout(label_key)
    negative, positive = classes[0], classes[1] if len(classes) > 1 else None
    rows: dict[str, LabelRow] = {}
    order: list[str] = []
    conflicts: list[LabelRow] = []
    try:
        for number, record in enumerate(reader, start=2):
            if number > MAX_LABEL_ROWS:
                raise LabelFileError(f"{source}: more than {MAX_LABEL_ROWS} rows")
            record = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k is not None}
            if not any(record.values()):
                continue  # blank line
            ref, value = record.get(image_key, ""), record.get(label_key, "")
            split = record.get(split_key, "") if split_key else ""
            if not ref:
                conflicts.append(LabelRow(number, ref, value, None, "no image name"))
                continue
            label, problem = value or None, "" if value else "empty label"
            if value and layout in ("kaggle_dr", "rsna"):
                grades = range(5) if layout == "kaggle_dr" else range(2)
                try:
                    grade = int(float(value))
                    if float(value) != grade or grade not in grades:
                        raise ValueError
                except ValueError:
                    label, problem = None, f"{label_key} {value!r} is not one of {', '.join(map(str, grades))}"
                else:
                    label = negative if grade == 0 else positive
            if split and split not in SPLITS and not problem:  # an empty cell: no split
                label, problem = None, f"split {split!r} is not one of {', '.join(SPLITS)}"
            row = LabelRow(number, ref, value, label, problem, split)
            previous = rows.get(ref)
            if previous is not None and problem:
                conflicts.append(row)  # its own problem (a bad value) says more than a disagreement
            elif previous is None:
                rows[ref] = row
                order.append(ref)
            elif previous.label != row.label or previous.split != row.split:
                conflicts.append(LabelRow(number, ref, value, None,
                                          f"{ref!r} is labelled {previous.value!r} on line {previous.line} and {value!r} here"
                                          if previous.label != row.label else
                                          f"{ref!r} is in split {previous.split!r} on line {previous.line} and {split!r} here"))
    except csv.Error as exc:
        raise LabelFileError(f"{source}: not a readable CSV file ({exc})") from None
    return layout, image_key, [rows[r] for r in order] + conflicts


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``fractions`` as a (train, val, test) tuple; ValueError unless three non-negative numbers summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or not np.isclose(sum(values), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1 (train,val,test), got {fractions}")
    return values  # type: ignore[return-value]


def stratified_splits(labels: Sequence[str], fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                      seed: int = 0) -> list[str]:
    """The split (``train``/``val``/``test``) of each item, stratified by label.

    Within each label (labels taken in sorted order, one ``numpy.random.default_rng(seed)`` for all)
    the items, in input order, are permuted and cut at the cumulative ``fractions``: a class of ``n``
    items gets ``round(f_val * n)`` val and ``round(f_test * n)`` test items, at least one of each
    (when its fraction is > 0) once ``n >= 3``, and the rest train. Deterministic: the same labels in
    the same order and seed give the same splits. E.g. 11 of one class at 0.6/0.2/0.2 -> 7/2/2,
    4 -> 2/1/1.
    """
    fractions = check_fractions(fractions)
    by_label: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(label, []).append(position)
    rng = np.random.default_rng(seed)
    out = [""] * len(labels)
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n = len(group)
        n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
        if n >= 3:
            n_val = max(n_val, 1) if fractions[1] > 0 else 0
            n_test = max(n_test, 1) if fractions[2] > 0 else 0
        n_train = max(n - n_val - n_test, 0)
        names = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
        for rank, index in enumerate(order):
            out[group[int(index)]] = names[rank]
    return out
