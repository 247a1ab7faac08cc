"""Annotation file formats: read and write COCO JSON, Pascal VOC XML, RSNA CSV, YOLO txt, plain CSV
and binary mask PNGs. Every coordinate conversion between those formats and :class:`Box` lives here
(and in geometry.py), nowhere else.

Reading never touches a database. A reader validates EVERY row and returns an :class:`ImportReport`
holding the parsed annotations and a per-row error list (``"line 7: x is not a number ('abc')"``);
the caller imports all rows or, if ``report.errors`` is not empty, none. Images are looked up through
a *resolver* the caller passes in (the repository resolves against a cohort in the database), so the
formats that need the image size (YOLO normalisation, mask shape, bounds checks) can validate here.

Coordinate conventions of the formats (all converted to exclusive-end image pixels):

* COCO ``bbox = [x, y, w, h]`` -> ``Box(x, y, x + w, y + h)``.
* Pascal VOC ``xmin..xmax`` are 1-based pixel indices, inclusive (the VOC devkit convention):
  ``Box(xmin - 1, ymin - 1, xmax, ymax)``.
* RSNA ``x, y, width, height`` like COCO; ``Target = 0`` rows with empty coordinates mark negatives.
* YOLO ``class cx cy w h`` normalised by the image width / height.
* plain CSV ``image,x0,y0,x1,y1,label`` already in our convention.
* mask PNG: non-zero pixels are foreground; one mask annotation plus one box per 8-connected component.
* points CSV ``filename,label,x,y[,participant]`` (the Sparse-BagNet clinician study's layout): one
  lesion point per row, ``(x, y)`` in image pixels taken as continuous coordinates (the point lies
  in pixel ``(floor(x), floor(y))``); ``participant`` names the annotator who placed it.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import warnings
import xml.etree.ElementTree as ET  # writing only; reading goes through defusedxml
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Protocol, Sequence

import defusedxml.ElementTree as DefusedET
import numpy as np
from defusedxml import DefusedXmlException

from .cells import neutralise, restore
from .geometry import Box, Geometry, Mask, Point, Polygon, mask_to_boxes

IMPORT_FORMATS = ("coco", "voc", "rsna", "yolo", "csv", "mask", "points")
EXPORT_FORMATS = ("coco", "voc", "rsna", "yolo", "csv", "points")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


class AnnotationFormatError(ValueError):
    """A file that cannot be read at all (not JSON, no header...): ``"<file>: <problem>"``."""


class ResolvedImage(Protocol):
    """What a resolver returns for an image reference: its key (opaque to this module) and size."""

    key: Any
    width: int | None
    height: int | None


Resolver = Callable[[str, bool], "ResolvedImage | None"]
"""``resolve(ref, fuzzy)``: find the image a file refers to (file name, path, stem, content hash,
pseudonym or DICOM/RSNA id). ``fuzzy`` allows a unique prefix-token match (mask files named
``<id>-anything.png``). Returns None when nothing matches; raises LookupError when several do."""


@dataclass
class ParsedAnnotation:
    """One annotation read from a file, already in image pixels."""

    image: Any                 # the resolver's key for the image
    image_ref: str             # the reference as written in the file
    geometry: Geometry
    label: str | None
    location: str              # "line 7", "annotations[3]", "objects[2] in x.xml"
    derived: bool = False      # True for boxes computed from a mask in the same file
    author: str | None = None  # the annotator the file names for this row (points' participant), if any


@dataclass
class RowProblem:
    location: str
    problem: str

    def __str__(self) -> str:
        return f"{self.location}: {self.problem}"


@dataclass
class ImportReport:
    """Result of validating an annotation file: parsed rows, images seen (negatives too) and problems."""

    source: str
    format: str
    annotations: list[ParsedAnnotation] = field(default_factory=list)
    images_seen: dict[Any, str] = field(default_factory=dict)   # resolver key -> first location
    errors: list[RowProblem] = field(default_factory=list)
    warnings: list[RowProblem] = field(default_factory=list)
    rows: int = 0
    # rows naming an image that is not in the cohort are errors, unless the caller allows skipping
    # them (a study file covering more images than were imported): then counted per reference here
    unknown: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, location: str, problem: str) -> None:
        self.errors.append(RowProblem(location, problem))

    def warn(self, location: str, problem: str) -> None:
        self.warnings.append(RowProblem(location, problem))

    def summary(self, limit: int | None = 50) -> str:
        """Multi-line text: one line per problem (``<file>: <location>: <problem>``), capped at ``limit``."""
        lines = [f"{self.source}: {e}" for e in self.errors]
        lines += [f"{self.source}: warning: {w}" for w in self.warnings]
        if limit is not None and len(lines) > limit:
            lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
        return "\n".join(lines)


# --- helpers -----------------------------------------------------------------------------------

def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} is not a number ({value!r})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number ({value!r})") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} is not finite ({value!r})")
    return number


def format_number(value: float) -> str:
    """Shortest text that reads back to the same float; integers without a trailing '.0'."""
    value = float(value)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


UNKNOWN_IMAGE = "no image matches {ref!r}"


def _resolve(report: ImportReport, resolve: Resolver, ref: str, location: str, fuzzy: bool = False):
    ref = (ref or "").strip()
    if not ref:
        report.error(location, "image reference is empty")
        return None
    try:
        image = resolve(ref, fuzzy)
    except LookupError as exc:
        report.error(location, str(exc))
        return None
    if image is None:
        report.error(location, UNKNOWN_IMAGE.format(ref=ref))
        return None
    report.images_seen.setdefault(image.key, location)
    return image


def _check_box(report: ImportReport, box: Box, image, location: str) -> bool:
    """Boxes entirely outside the image are errors; a partial overshoot is kept exactly and reported."""
    width, height = image.width, image.height
    if not width or not height:
        return True
    # outside = not even touching the closed image rectangle (zero-size boxes on an edge are valid)
    if box.x0 > width or box.y0 > height or box.x1 < 0 or box.y1 < 0:
        report.error(location, f"box {box.to_json()} lies outside the {width}x{height} image")
        return False
    if not box.inside(width, height):
        over = max(-box.x0, -box.y0, box.x1 - width, box.y1 - height)
        report.warn(location, f"box extends {over:g} px outside the {width}x{height} image; kept as given")
    return True


def _add(report: ImportReport, image, ref: str, geometry: Geometry, label, location: str, derived=False,
         author: str | None = None) -> None:
    report.annotations.append(ParsedAnnotation(image.key, ref, geometry, label, location, derived, author))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationFormatError(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise AnnotationFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _members(path: Path, suffixes: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files with the given suffixes in a file, folder (recursive) or zip."""
    if not path.exists():
        raise AnnotationFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        return [(str(p.relative_to(path)), p.read_bytes()) for p in files]
    if path.suffix.lower() == ".zip":
        from annotations.archive import ArchiveError, read_member, safe_members

        try:
            with zipfile.ZipFile(path) as zf:
                members, _ = safe_members(zf, path.name)  # links and paths leaving the archive are not read
                members = sorted((m for m in members if PurePosixPath(m.filename).suffix.lower() in suffixes),
                                 key=lambda m: m.filename)
                return [(m.filename, read_member(zf, m, path.name)) for m in members]
        except zipfile.BadZipFile:
            raise AnnotationFormatError(f"{path.name}: not a valid zip file") from None
        except ArchiveError as exc:
            raise AnnotationFormatError(str(exc)) from None
    return [(path.name, path.read_bytes())]


# --- COCO --------------------------------------------------------------------------------------

def read_coco(path: Path, resolve: Resolver) -> ImportReport:
    """COCO JSON (``images``, ``annotations`` with ``bbox``, ``categories``); element numbers are 0-based."""
    path = Path(path)
    report = ImportReport(path.name, "coco")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise AnnotationFormatError(f"{path.name}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise AnnotationFormatError(f"{path.name}: JSON nested too deeply to be a COCO file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationFormatError(f"{path.name}: not a COCO file (no 'images' list)")
    annotations = data.get("annotations") or []
    categories = data.get("categories") or []
    if not isinstance(annotations, list) or not isinstance(categories, list):
        raise AnnotationFormatError(f"{path.name}: 'annotations' and 'categories' must be lists")

    category_names: dict[Any, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or not str(cat.get("name", "")).strip():
            report.error(f"categories[{i}]", "needs 'id' and a non-empty 'name'")
            continue
        category_names[cat["id"]] = str(cat["name"]).strip()

    images: dict[Any, Any] = {}
    for i, entry in enumerate(data["images"]):
        location = f"images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry:
            report.error(location, "needs 'id' and 'file_name'")
            continue
        report.rows += 1
        image = _resolve(report, resolve, str(entry.get("file_name", "")), location)
        if image is None:
            continue
        for dim, known in (("width", image.width), ("height", image.height)):
            given = entry.get(dim)
            if given is not None and known and int(given) != int(known):
                report.error(location, f"{dim} {given} differs from the stored image's {known}")
        if entry["id"] in images:
            report.error(location, f"duplicate image id {entry['id']!r}")
        images[entry["id"]] = (image, str(entry.get("file_name")))

    for i, ann in enumerate(annotations):
        report.rows += 1
        location = f"annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            report.error(location, "not an object")
            continue
        if ann.get("image_id") not in images:
            report.error(location, f"image_id {ann.get('image_id')!r} is not among the file's usable images")
            continue
        if ann.get("category_id") not in category_names:
            report.error(location, f"category_id {ann.get('category_id')!r} is not in 'categories'")
            continue
        image, ref = images[ann["image_id"]]
        label = category_names[ann["category_id"]]
        keypoints, segmentation = ann.get("keypoints"), ann.get("segmentation")
        # a keypoint annotation: its visible points (v > 0); a polygon segmentation: its outlines; not their boxes
        polygonal = isinstance(segmentation, list) and bool(segmentation)
        if keypoints or polygonal:
            try:
                shapes = _coco_keypoints(keypoints) if keypoints else _coco_polygons(segmentation)
            except ValueError as exc:
                report.error(location, str(exc))
                continue
            for shape in shapes:
                if _check_box(report, shape.bounds(), image, location):
                    _add(report, image, ref, shape, label, location)
            continue
        bbox = ann.get("bbox")
        try:
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"bbox must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (_number(v, name) for v, name in zip(bbox, ("x", "y", "width", "height")))
            if w < 0 or h < 0:
                raise ValueError(f"negative width or height ({w}, {h})")
            box = Box.from_xywh(x, y, w, h)
        except ValueError as exc:
            report.error(location, str(exc))
            continue
        if _check_box(report, box, image, location):
            _add(report, image, ref, box, label, location)
    return report


def _coco_polygons(segmentation: list) -> list[Polygon]:
    """COCO polygon segmentation ``[[x1, y1, x2, y2, ...], ...]`` (image pixels) -> Polygons."""
    polygons = []
    for k, ring in enumerate(segmentation):
        if not isinstance(ring, list) or len(ring) < 6 or len(ring) % 2:
            raise ValueError(f"segmentation[{k}] must be a list of at least 3 x, y pairs, got {str(ring)[:60]}")
        values = [_number(v, f"segmentation[{k}]") for v in ring]
        polygons.append(Polygon(tuple(zip(values[0::2], values[1::2]))))
    return polygons


def _coco_keypoints(keypoints: Any) -> list[Point]:
    """COCO ``keypoints`` ``[x1, y1, v1, ...]`` -> the points with visibility v > 0."""
    if not isinstance(keypoints, list) or len(keypoints) % 3:
        raise ValueError(f"keypoints must be [x, y, v, ...] triples, got {str(keypoints)[:60]}")
    points = []
    for k in range(0, len(keypoints), 3):
        x, y, v = (_number(value, name) for value, name in zip(keypoints[k:k + 3], ("x", "y", "v")))
        if v > 0:
            points.append(Point(x, y))
    return points


def write_coco(out: Path, images: Sequence["ExportImage"]) -> Path:
    """COCO JSON with every image (negatives too), categories sorted by name, and one annotation
    per shape: a box as ``bbox``; a polygon as ``segmentation`` (with its bounding ``bbox`` and
    area); a point as a one-keypoint annotation (``keypoints [x, y, 2]``, ``bbox`` of zero size;
    its category lists the keypoint ``"point"``). Masks go to DICOM SEG or mask PNGs instead."""
    shapes = [a for img in images for a in img.shapes()]
    labels = sorted({a.label or "" for a in shapes})
    category_id = {name: i + 1 for i, name in enumerate(labels)}
    with_points = {a.label or "" for a in shapes if isinstance(a.geometry, Point)}
    data: dict[str, Any] = {
        "info": {"description": "SoftCAM Review export (pseudonymous image ids)"},
        "images": [],
        "annotations": [],
        "categories": [{"id": category_id[n], "name": n, **({"keypoints": ["point"], "skeleton": []} if n in with_points else {})}
                       for n in labels],
    }
    next_id = 1
    for image_id, img in enumerate(images, start=1):
        data["images"].append({"id": image_id, "file_name": img.file_name, "width": img.width, "height": img.height})
        for ann in img.shapes():
            shape = ann.geometry
            entry: dict[str, Any] = {"id": next_id, "image_id": image_id, "category_id": category_id[ann.label or ""],
                                     "iscrowd": 0}
            if isinstance(shape, Box):
                entry |= {"bbox": [float(v) for v in shape.to_xywh()], "area": float(shape.area)}
            elif isinstance(shape, Polygon):
                bounds = shape.bounds()
                entry |= {"segmentation": [[float(v) for p in shape.points for v in p]],
                          "bbox": [float(v) for v in bounds.to_xywh()], "area": float(shape.area)}
            else:
                entry |= {"keypoints": [float(shape.x), float(shape.y), 2], "num_keypoints": 1,
                          "bbox": [float(shape.x), float(shape.y), 0.0, 0.0], "area": 0.0}
            data["annotations"].append(entry)
            next_id += 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return out


# --- Pascal VOC --------------------------------------------------------------------------------

def _voc_polygon(element) -> Polygon:
    """A VOC ``<polygon>``: ``<pt><x>..</x><y>..</y></pt>`` vertices (LabelMe) or numbered
    ``<x1>, <y1>, <x2>, <y2> ...`` children (Roboflow, CVAT); 1-based like ``<bndbox>``."""
    points = element.findall("pt")
    if points:
        values = [(pt.findtext("x"), pt.findtext("y")) for pt in points]
    else:
        values, k = [], 1
        while element.find(f"x{k}") is not None or element.find(f"y{k}") is not None:
            values.append((element.findtext(f"x{k}"), element.findtext(f"y{k}")))
            k += 1
    vertices = tuple((_number((x or "").strip(), "polygon x") - 1, _number((y or "").strip(), "polygon y") - 1)
                     for x, y in values)
    if len(vertices) < 3:
        raise ValueError(f"<polygon> needs at least 3 vertices, got {len(vertices)}")
    return Polygon(vertices)


def read_voc(path: Path, resolve: Resolver) -> ImportReport:
    """Pascal VOC XML: one file, a folder of ``.xml`` files or a zip of them (1-based inclusive boxes).

    An object with a ``<polygon>`` is imported as that polygon (its ``<bndbox>``, when present, is
    only its bounding box), as COCO polygon segmentations are."""
    path = Path(path)
    report = ImportReport(path.name, "voc")
    members = _members(path, (".xml",))
    if not members:
        raise AnnotationFormatError(f"{path.name}: no .xml files found")
    for name, blob in members:
        report.rows += 1
        try:
            # defusedxml refuses entity declarations (billion laughs) and external entities / DTDs (XXE)
            root = DefusedET.fromstring(blob, forbid_dtd=True)
        except ET.ParseError as exc:
            report.error(name, f"not valid XML ({exc})")
            continue
        except DefusedXmlException as exc:
            report.error(name, f"refused: the XML declares a DTD or entities ({type(exc).__name__}), which VOC files never need")
            continue
        if root.tag != "annotation":
            report.error(name, f"root element is <{root.tag}>, expected <annotation>")
            continue
        ref = (root.findtext("filename") or "").strip() or Path(name).stem
        image = _resolve(report, resolve, ref, name)
        if image is None:
            continue
        size = root.find("size")
        if size is not None:
            for dim, known in (("width", image.width), ("height", image.height)):
                given = (size.findtext(dim) or "").strip()
                if given and known and given.isdigit() and int(given) != int(known):
                    report.error(f"{name}: <size>", f"{dim} {given} differs from the stored image's {known}")
        for j, obj in enumerate(root.findall("object")):
            report.rows += 1
            location = f"{name}: object {j + 1}"
            label = (obj.findtext("name") or "").strip()
            bnd = obj.find("bndbox")
            if obj.find("polygon") is not None:
                try:
                    if not label:
                        raise ValueError("<name> is empty")
                    polygon = _voc_polygon(obj.find("polygon"))
                except ValueError as exc:
                    report.error(location, str(exc))
                    continue
                if _check_box(report, polygon.bounds(), image, location):
                    _add(report, image, ref, polygon, label, location)
                continue
            try:
                if not label:
                    raise ValueError("<name> is empty")
                if bnd is None:
                    raise ValueError("no <bndbox>")
                xmin, ymin, xmax, ymax = (
                    _number((bnd.findtext(tag) or "").strip(), f"<{tag}>") for tag in ("xmin", "ymin", "xmax", "ymax")
                )
                if xmax < xmin - 1 or ymax < ymin - 1:  # xmax = xmin - 1 is an empty (zero-width) box
                    raise ValueError(f"xmax/ymax ({xmax:g}, {ymax:g}) below xmin/ymin ({xmin:g}, {ymin:g})")
                box = Box(xmin - 1, ymin - 1, xmax, ymax)
            except ValueError as exc:
                report.error(location, str(exc))
                continue
            if _check_box(report, box, image, location):
                _add(report, image, ref, box, label, location)
    return report


def _voc_xml(img: "ExportImage") -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = img.file_name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(img.width)
    ET.SubElement(size, "height").text = str(img.height)
    ET.SubElement(size, "depth").text = "1"
    for ann in img.boxes() + img.polygons():
        box = ann.geometry if isinstance(ann.geometry, Box) else ann.geometry.bounds()
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = ann.label or ""
        bnd = ET.SubElement(obj, "bndbox")  # a polygon's too: readers of plain VOC still get its box
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (box.x0 + 1, box.y0 + 1, box.x1, box.y1)):
            ET.SubElement(bnd, tag).text = format_number(value)
        if isinstance(ann.geometry, Polygon):
            polygon = ET.SubElement(obj, "polygon")
            for k, (x, y) in enumerate(ann.geometry.points, start=1):
                ET.SubElement(polygon, f"x{k}").text = format_number(x + 1)
                ET.SubElement(polygon, f"y{k}").text = format_number(y + 1)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _write_members(out: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write files into a zip (``out`` ends with .zip) or a folder."""
    out = Path(out)
    if out.suffix.lower() == ".zip":
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, blob in members:
                zf.writestr(name, blob)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in members:
            (out / name).write_bytes(blob)
    return out


def write_voc(out: Path, images: Sequence["ExportImage"]) -> Path:
    """One ``<pseudonym>.xml`` per image (negatives too) into a zip (``out`` ends .zip) or a folder."""
    return _write_members(out, ((f"{img.ref}.xml", _voc_xml(img)) for img in images))


# --- CSV family (RSNA, plain) ------------------------------------------------------------------

def _csv_rows(path: Path, required: Sequence[str]) -> tuple[list[tuple[int, dict[str, str]]], str]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise AnnotationFormatError(f"{path.name}: not a readable CSV header ({exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationFormatError(f"{path.name}: header lacks column(s) {', '.join(missing)} (found: {', '.join(header) or 'nothing'})")
    reader.fieldnames = header
    rows = []
    try:
        for row in reader:
            # reader.line_num is the physical line just read (header is line 1)
            # a cell our own export neutralised for spreadsheets ('=x) reads back as what was written (=x)
            rows.append((reader.line_num, {k: restore((v or "").strip()) for k, v in row.items() if k is not None}))
    except csv.Error as exc:  # a field over csv's limit (131,072 characters), a NUL byte, a broken quote
        raise AnnotationFormatError(f"{path.name}: not a readable CSV file near line {reader.line_num} ({exc})") from None
    return rows, path.name


def read_rsna(path: Path, resolve: Resolver) -> ImportReport:
    """RSNA pneumonia CSV ``patientId,x,y,width,height,Target``: several rows per image; ``Target=0``
    rows carry empty coordinates and mark an image without opacity."""
    path = Path(path)
    report = ImportReport(path.name, "rsna")
    rows, _ = _csv_rows(path, ("patientId", "x", "y", "width", "height", "Target"))
    for line, row in rows:
        report.rows += 1
        location = f"line {line}"
        image = _resolve(report, resolve, row["patientId"], location)
        if image is None:
            continue
        target = row["Target"]
        coords = [row[c] for c in ("x", "y", "width", "height")]
        if target == "0":
            if any(coords):
                report.error(location, "Target is 0 but x/y/width/height are not empty")
            continue
        if target != "1":
            report.error(location, f"Target must be 0 or 1, got {target!r}")
            continue
        try:
            x, y, w, h = (_number(v, n) for v, n in zip(coords, ("x", "y", "width", "height")))
            if w <= 0 or h <= 0:
                raise ValueError(f"width and height must be positive, got {w:g} x {h:g}")
            box = Box.from_xywh(x, y, w, h)
        except ValueError as exc:
            report.error(location, str(exc))
            continue
        if _check_box(report, box, image, location):
            _add(report, image, row["patientId"], box, row.get("class") or "Lung Opacity", location)
    return report


def write_rsna(out: Path, images: Sequence["ExportImage"]) -> Path:
    """RSNA CSV keyed by pseudonym: one row per box (Target=1), one empty Target=0 row per negative."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for img in images:
            boxes = img.boxes()
            if not boxes:
                writer.writerow([neutralise(img.ref), "", "", "", "", 0])
            for ann in boxes:
                writer.writerow([neutralise(img.ref), *(format_number(v) for v in ann.geometry.to_xywh()), 1])
    return out


PLAIN_CSV_COLUMNS = ("image", "x0", "y0", "x1", "y1", "label")


def read_csv(path: Path, resolve: Resolver) -> ImportReport:
    """Plain CSV ``image,x0,y0,x1,y1,label`` in image pixels, end exclusive; a row with all four
    coordinates empty marks an image without findings."""
    path = Path(path)
    report = ImportReport(path.name, "csv")
    rows, _ = _csv_rows(path, PLAIN_CSV_COLUMNS)
    for line, row in rows:
        report.rows += 1
        location = f"line {line}"
        image = _resolve(report, resolve, row["image"], location)
        if image is None:
            continue
        coords = [row[c] for c in ("x0", "y0", "x1", "y1")]
        if not any(coords):
            continue
        try:
            x0, y0, x1, y1 = (_number(v, n) for v, n in zip(coords, ("x0", "y0", "x1", "y1")))
            if not row["label"]:
                raise ValueError("label is empty")
            box = Box(x0, y0, x1, y1)
        except ValueError as exc:
            report.error(location, str(exc))
            continue
        if _check_box(report, box, image, location):
            _add(report, image, row["image"], box, row["label"], location)
    return report


POINT_COLUMNS = ("filename", "label", "x", "y")


def read_points(path: Path, resolve: Resolver) -> ImportReport:
    """Points CSV ``filename,label,x,y[,participant]`` (module docstring); a point outside the image
    (x not in [0, width), y not in [0, height)) is an error."""
    path = Path(path)
    report = ImportReport(path.name, "points")
    rows, _ = _csv_rows(path, POINT_COLUMNS)
    for line, row in rows:
        report.rows += 1
        location = f"line {line}"
        image = _resolve(report, resolve, row["filename"], location)
        if image is None:
            continue
        try:
            x, y = _number(row["x"], "x"), _number(row["y"], "y")
            if not row["label"]:
                raise ValueError("label is empty")
        except ValueError as exc:
            report.error(location, str(exc))
            continue
        if image.width and image.height and not (0 <= x < image.width and 0 <= y < image.height):
            report.error(location, f"point ({x:g}, {y:g}) lies outside the {image.width}x{image.height} image")
            continue
        _add(report, image, row["filename"], Point(x, y), row["label"], location,
             author=(row.get("participant") or "").strip() or None)
    return report


def write_csv(out: Path, images: Sequence["ExportImage"]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(PLAIN_CSV_COLUMNS)
        for img in images:
            boxes = img.boxes()
            if not boxes:
                writer.writerow([neutralise(img.ref), "", "", "", "", ""])
            for ann in boxes:
                b = ann.geometry
                writer.writerow([neutralise(img.ref), *(format_number(v) for v in (b.x0, b.y0, b.x1, b.y1)),
                                 neutralise(ann.label or "")])
    return out


def write_points(out: Path, images: Sequence["ExportImage"]) -> Path:
    """Points CSV ``filename,label,x,y,participant`` (the clinician study's layout, read back by
    :func:`read_points`): one row per point, its author as the participant."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([*POINT_COLUMNS, "participant"])
        for img in images:
            for ann in img.shapes():
                if isinstance(ann.geometry, Point):
                    writer.writerow([neutralise(img.file_name), neutralise(ann.label or ""), format_number(ann.geometry.x),
                                     format_number(ann.geometry.y), neutralise(ann.author or "")])
    return out


# --- YOLO --------------------------------------------------------------------------------------

def _yolo_class_names(path: Path, members: list[tuple[str, bytes]]) -> list[str] | None:
    """Class names from ``classes.txt`` / ``*.names`` inside the input, beside it, or one folder up."""
    for name, blob in members:
        if PurePosixPath(name).name in ("classes.txt", "obj.names") or name.endswith(".names"):
            return [l.strip() for l in blob.decode("utf-8-sig").splitlines() if l.strip()]
    folder = path if path.is_dir() else path.parent
    for candidate_dir in (folder, folder.parent):
        found = sorted(candidate_dir.glob("classes.txt")) + sorted(candidate_dir.glob("*.names"))
        if found:
            return [l.strip() for l in found[0].read_text(encoding="utf-8-sig").splitlines() if l.strip()]
    return None


def read_yolo(path: Path, resolve: Resolver) -> ImportReport:
    """YOLO ``<image stem>.txt`` files (one file, a folder or a zip): ``class cx cy w h`` normalised by
    the stored image size. Class names come from ``classes.txt`` or a ``*.names`` file; without one,
    the class index is the label."""
    path = Path(path)
    report = ImportReport(path.name, "yolo")
    members = _members(path, (".txt", ".names"))
    names = _yolo_class_names(path, members)
    label_files = [(n, b) for n, b in members if n.endswith(".txt") and PurePosixPath(n).name != "classes.txt"]
    if not label_files:
        raise AnnotationFormatError(f"{path.name}: no YOLO .txt files found")
    for name, blob in label_files:
        ref = PurePosixPath(name).stem
        image = _resolve(report, resolve, ref, name)
        if image is None:
            continue
        if not image.width or not image.height:
            report.error(name, f"image {ref!r} has no stored size; YOLO boxes cannot be converted")
            continue
        for line_no, line in enumerate(blob.decode("utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            report.rows += 1
            location = f"{name}: line {line_no}"
            parts = line.split()
            try:
                if len(parts) != 5:
                    raise ValueError(f"expected 5 fields 'class cx cy w h', got {len(parts)}")
                if not parts[0].isdigit():
                    raise ValueError(f"class {parts[0]!r} is not a non-negative integer")
                cls = int(parts[0])
                if names is not None and cls >= len(names):
                    raise ValueError(f"class {cls} has no name (only {len(names)} in the class list)")
                cx, cy, w, h = (_number(v, n) for v, n in zip(parts[1:], ("cx", "cy", "w", "h")))
                if w < 0 or h < 0:
                    raise ValueError(f"negative width or height ({w:g}, {h:g})")
                box = Box.from_yolo(cx, cy, w, h, image.width, image.height)
            except ValueError as exc:
                report.error(location, str(exc))
                continue
            if _check_box(report, box, image, location):
                _add(report, image, ref, box, names[cls] if names is not None else str(cls), location)
    return report


def write_yolo(out: Path, images: Sequence["ExportImage"]) -> Path:
    """``<pseudonym>.txt`` per image (empty for negatives) plus ``classes.txt`` (labels sorted by name),
    into a zip (``out`` ends .zip) or a folder. Needs each image's stored width and height."""
    labels = sorted({a.label or "" for img in images for a in img.boxes()})
    index = {name: i for i, name in enumerate(labels)}

    def members():
        yield "classes.txt", ("\n".join(labels) + "\n").encode()
        for img in images:
            if not img.width or not img.height:
                raise AnnotationFormatError(f"image {img.ref}: no stored width/height, cannot normalise YOLO boxes")
            lines = []
            for ann in img.boxes():
                values = ann.geometry.to_yolo(img.width, img.height)
                lines.append(" ".join([str(index[ann.label or ""]), *(repr(float(v)) for v in values)]))
            yield f"{img.ref}.txt", ("\n".join(lines) + ("\n" if lines else "")).encode()

    return _write_members(out, list(members()))


# --- masks -------------------------------------------------------------------------------------

def read_mask_array(blob: bytes, name: str, expected: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a mask image to ``(H, W)`` bool (non-zero = foreground); colour masks use any channel.

    ``expected`` (H, W): the image's size, checked on the header before any pixel is decoded, so a
    mask that claims 30,000 x 30,000 pixels is refused without allocating them."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as img:
                width, height = img.size
                if expected is not None and (height, width) != tuple(expected):
                    raise ValueError(f"mask is {width}x{height} but the image is {expected[1]}x{expected[0]}")
                arr = np.asarray(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"mask image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    if arr.ndim == 3:
        arr = arr[..., :3].any(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"unexpected mask shape {arr.shape}")
    return arr != 0


def read_masks(path: Path, resolve: Resolver, label: str | None = None) -> ImportReport:
    """Binary mask images (one file, a folder or a zip). Each mask is matched to its image by name,
    or by the leading token of its stem (``12-drusen-derived.png`` -> the image ``12-Input.tif``) when
    that is unique. Produces the mask itself and one derived box per 8-connected component."""
    path = Path(path)
    report = ImportReport(path.name, "mask")
    members = _members(path, MASK_SUFFIXES)
    if not members:
        raise AnnotationFormatError(f"{path.name}: no mask images found")
    label = label or "lesion"
    for name, blob in members:
        report.rows += 1
        ref = PurePosixPath(name).name
        image = _resolve(report, resolve, ref, name, fuzzy=True)
        if image is None:
            continue
        try:
            arr = read_mask_array(blob, name, (image.height, image.width) if image.width and image.height else None)
        except ValueError as exc:
            report.error(name, str(exc))
            continue
        if not arr.any():
            continue  # an empty mask says "no lesion": nothing to store
        _add(report, image, ref, Mask(arr), label, name)
        for k, box in enumerate(mask_to_boxes(arr), start=1):
            _add(report, image, ref, box, label, f"{name}: component {k}", derived=True)
    return report


READERS: dict[str, Callable[..., ImportReport]] = {
    "coco": read_coco, "voc": read_voc, "rsna": read_rsna, "yolo": read_yolo, "csv": read_csv, "mask": read_masks,
    "points": read_points,
}


def read_annotations(path: Path, fmt: str, resolve: Resolver, *, label: str | None = None,
                     skip_unknown_images: bool = False) -> ImportReport:
    """Validate every row of an annotation file; see the module docstring. ``label`` names mask labels.
    ``skip_unknown_images``: rows naming an image the resolver does not know are counted in
    ``report.unknown`` (reference -> rows) instead of being errors: a study file (RSNA's labels,
    the clinician study's points) usually covers more images than a cohort holds."""
    if fmt not in READERS:
        raise AnnotationFormatError(f"unknown annotation format {fmt!r}; choose one of {', '.join(IMPORT_FORMATS)}")
    report = read_masks(Path(path), resolve, label) if fmt == "mask" else READERS[fmt](Path(path), resolve)
    if skip_unknown_images:
        kept = []
        for problem in report.errors:
            ref = _unknown_ref(problem.problem)
            if ref is None:
                kept.append(problem)
            else:
                report.unknown[ref] = report.unknown.get(ref, 0) + 1
        report.errors = kept
    return report


def _unknown_ref(problem: str) -> str | None:
    """The reference of an :data:`UNKNOWN_IMAGE` problem, else None."""
    prefix, suffix = UNKNOWN_IMAGE.split("{ref!r}")
    if problem.startswith(prefix) and problem.endswith(suffix):
        import ast

        try:
            return str(ast.literal_eval(problem[len(prefix):len(problem) - len(suffix) or None]))
        except (ValueError, SyntaxError):
            return None
    return None


# --- export ------------------------------------------------------------------------------------

@dataclass
class ExportAnnotation:
    geometry: Geometry
    label: str | None
    author: str | None = None  # the annotator's user name (staff, not the patient): points' participant


@dataclass
class ExportImage:
    """An image as exports see it: pseudonymous ``ref`` only, never a patient name or ID."""

    ref: str
    extension: str
    width: int | None
    height: int | None
    annotations: list[ExportAnnotation] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return f"{self.ref}{self.extension}"

    def shapes(self) -> list[ExportAnnotation]:
        """Boxes, polygons and points in a stable order (kind, then top-left corner, then label)."""
        order = {"box": 0, "polygon": 1, "point": 2}
        kept = [a for a in self.annotations if getattr(a.geometry, "kind", None) in order]

        def key(a: ExportAnnotation):
            bounds = a.geometry if isinstance(a.geometry, Box) else a.geometry.bounds()
            return (order[a.geometry.kind], bounds.y0, bounds.x0, bounds.y1, bounds.x1, a.label or "")

        return sorted(kept, key=key)

    def polygons(self) -> list[ExportAnnotation]:
        """Polygon annotations in the order of :meth:`shapes` (COCO and VOC carry them)."""
        return [a for a in self.shapes() if a.geometry.kind == "polygon"]

    def boxes(self) -> list[ExportAnnotation]:
        """Box annotations in a stable order (RSNA, YOLO and CSV carry boxes only; VOC boxes and polygons)."""
        boxes = [a for a in self.annotations if isinstance(a.geometry, Box)]
        return sorted(boxes, key=lambda a: (a.geometry.y0, a.geometry.x0, a.geometry.y1, a.geometry.x1, a.label or ""))


WRITERS = {"coco": write_coco, "voc": write_voc, "rsna": write_rsna, "yolo": write_yolo, "csv": write_csv,
           "points": write_points}
# the annotation kinds each export format writes; the rest are left out (and reported: not_carried)
CARRIED_KINDS = {"coco": ("box", "polygon", "point"), "voc": ("box", "polygon"), "rsna": ("box",), "yolo": ("box",),
                 "csv": ("box",), "points": ("point",)}


def not_carried(fmt: str, images: Sequence[ExportImage]) -> dict[str, int]:
    """``{kind: count}`` of the live annotations that ``fmt`` does not write (empty when it writes
    them all), so an export can say what it left out instead of dropping it silently."""
    if fmt not in CARRIED_KINDS:
        raise AnnotationFormatError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    carried = CARRIED_KINDS[fmt]
    counts: dict[str, int] = {}
    for img in images:
        for a in img.annotations:
            kind = getattr(a.geometry, "kind", type(a.geometry).__name__.lower())
            if kind not in carried:
                counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def write_annotations(out: Path, fmt: str, images: Sequence[ExportImage]) -> Path:
    """Write ``images`` in ``fmt``; VOC and YOLO write a folder, or a zip when ``out`` ends with .zip."""
    if fmt not in WRITERS:
        raise AnnotationFormatError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return WRITERS[fmt](Path(out), images)


# --- offline resolver (files on disk, no database) ---------------------------------------------

@dataclass
class FileImage:
    key: str
    width: int | None
    height: int | None


def folder_resolver(images: dict[str, tuple[int, int]]) -> Resolver:
    """Resolver over ``{file name: (width, height)}`` matching by name, stem or unique leading token."""
    by_name = {Path(n).name: n for n in images}
    by_stem: dict[str, list[str]] = {}
    by_token: dict[str, list[str]] = {}
    for n in images:
        by_stem.setdefault(Path(n).stem, []).append(n)
        by_token.setdefault(leading_token(Path(n).stem), []).append(n)

    def resolve(ref: str, fuzzy: bool = False):
        name = PurePosixPath(ref.replace("\\", "/")).name
        candidates = [by_name[name]] if name in by_name else by_stem.get(Path(name).stem, [])
        if not candidates and fuzzy:
            candidates = by_token.get(leading_token(Path(name).stem), [])
        if len(candidates) > 1:
            raise LookupError(f"{ref!r} matches several images: {', '.join(sorted(candidates)[:5])}")
        if not candidates:
            return None
        w, h = images[candidates[0]]
        return FileImage(candidates[0], w, h)

    return resolve


def leading_token(stem: str) -> str:
    """Part of a file stem before the first '-', '_' or '.' (``12-Input`` -> ``12``)."""
    return re.split(r"[-_.]", stem, maxsplit=1)[0]


# --- DICOM SEG (highdicom) ---------------------------------------------------------------------

def write_dicom_seg(out: Path, source, masks: Sequence[tuple[str, np.ndarray]]) -> Path:
    """DICOM Segmentation (binary, one segment per label) referencing ``source``, a pydicom Dataset
    of the (already de-identified) single-frame image. ``masks``: ``(label, (rows, cols) bool)``;
    masks sharing a label are merged into one segment. Patient/study attributes come from ``source``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out = Path(out)
    # highdicom copies the patient / study modules, whose type-2 attributes must exist (empty is
    # valid); a de-identified source may have dropped them
    source = copy.deepcopy(source)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in source:
            setattr(source, keyword, "")
    rows, cols = int(source.Rows), int(source.Columns)
    if int(getattr(source, "NumberOfFrames", 1) or 1) != 1:
        raise AnnotationFormatError(f"{out.name}: DICOM SEG export supports single-frame images only")
    merged: dict[str, np.ndarray] = {}
    for label, mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (rows, cols):
            raise AnnotationFormatError(f"{out.name}: mask {mask.shape} does not match the image ({rows}, {cols})")
        name = label or "lesion"
        merged[name] = merged.get(name, np.zeros((rows, cols), bool)) | mask
    if not merged:
        raise AnnotationFormatError(f"{out.name}: no masks to write")
    names = sorted(merged)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, name in enumerate(names)
    ]
    pixels = np.stack([merged[n] for n in names], axis=-1)[None].astype(np.uint8)  # (1, rows, cols, segments)
    with warnings.catch_warnings():
        # the de-identified PatientName is a one-part pseudonym on purpose
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _segmentation(hd, source, pixels, descriptions)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


def _segmentation(hd, source, pixels, descriptions):
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="SoftCAM Review", manufacturer_model_name="SoftCAM Review",
        software_versions="0.1.0", device_serial_number="none",
    )
