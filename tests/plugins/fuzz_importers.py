"""Hostile-file corpus for every importer, run in its own process so its peak memory can be measured:

    python -m tests.plugins.fuzz_importers OUT_DIR

writes ``OUT_DIR/results.json``: ``rows``, one per (importer, file) with the outcome (``rejected``:
the importer's own error type or a per-file rejection; ``accepted``; ``crash``: any other
exception), the error type and message, and the database row counts before and after each import;
and ``peak_rss_bytes``, the process's peak resident memory.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, rows: int | None = None) -> bytes:
    """A grey PNG whose header says ``width`` x ``height`` (``rows`` of pixel data actually present)."""
    rows = height if rows is None else rows
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(rows)))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b""))


def _dicom(**attributes) -> bytes:
    import numpy as np

    from tests.plugins.imaging import make_dicom_bytes

    return make_dicom_bytes(np.zeros((8, 8), np.uint8), **attributes)


def _nested_dicom(depth: int) -> bytes:
    """A DICOM with ReferencedImageSequence items nested ``depth`` levels deep (undefined lengths,
    written byte by byte: pydicom itself would recurse to write it)."""
    data = _dicom()
    sequence = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1140) SQ, undefined length
    item, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    nested = (sequence + item) * depth + (item_end + sequence_end) * depth
    at = data.index(b"\x10\x00\x10\x00PN")  # before PatientName, the first (0010,xxxx) element
    return data[:at] + nested + data[at:]


def image_corpus() -> dict[str, bytes]:
    good = _dicom()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (16 * 1024**2))
    return {
        "empty.png": b"",
        "truncated.dcm": good[: len(good) // 2],
        "header-only.dcm": good[:300],
        "wrong-magic.dcm": b"GIF89a" + bytes(200),
        "text.png": "a text file, not an image\n".encode("utf-16"),
        "png-bomb.png": _png(30000, 30000, rows=4),
        "png-bad-header-crc.png": _png(8, 8)[:29] + b"\x00\x00\x00\x00" + _png(8, 8)[33:],
        "jpeg-truncated.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb\x00",
        "dicom-terabyte-header.dcm": _dicom(NumberOfFrames=100000, Rows=8, Columns=8).replace(
            b"\x28\x00\x10\x00US\x02\x00\x08\x00", b"\x28\x00\x10\x00US\x02\x00\xff\xff").replace(
            b"\x28\x00\x11\x00US\x02\x00\x08\x00", b"\x28\x00\x11\x00US\x02\x00\xff\xff"),
        "dicom-deep-nesting.dcm": _nested_dicom(20_000),
        "zip-bomb.zip": bomb.getvalue(),
    }


def annotation_corpus() -> list[tuple[str, str, bytes]]:
    """(format, file name, bytes) of hostile annotation files naming the cohort's image ``a.png``."""
    laughs = '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY a{i} "{"&a" + (str(i - 1) if i > 1 else "") + ";"}{"&a" + (str(i - 1) if i > 1 else "") + ";"}">'
        for i in range(1, 30)) + "]><annotation><filename>&a29;</filename></annotation>"
    masks = io.BytesIO()
    with zipfile.ZipFile(masks, "w") as zf:
        zf.writestr("a.png", _png(30000, 30000, rows=2))
    return [
        ("coco", "truncated.json", b'{"images": [{"id": 1, "file_name": "a.png", "width": 24, "he'),
        ("coco", "deep.json", b"[" * 100_000 + b"]" * 100_000),
        ("coco", "utf16.json", json.dumps({"images": []}).encode("utf-16")),
        ("coco", "latin1.json", '{"images": [{"id": 1, "file_name": "a\xe9.png"}]}'.encode("latin-1")),
        ("coco", "huge-numbers.json", json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 24, "height": 24}],
                                                   "annotations": [{"image_id": 1, "bbox": [1e309, 0, "x", -1]}],
                                                   "categories": []}).replace("Infinity", "1e999").encode()),
        ("voc", "laughs.xml", laughs.encode()),
        ("voc", "deep.xml", b"<annotation>" + b"<a>" * 50_000 + b"</a>" * 50_000 + b"</annotation>"),
        ("voc", "not-xml.xml", b"\x00\x01\x02 binary"),
        ("rsna", "nul.csv", b"patientId,x,y,width,height,Target\na.png,1\x00,2,3,4,1\n"),
        ("rsna", "long-line.csv", b"patientId,x,y,width,height,Target\n" + b"a" * 2_000_000 + b",1,1,1,1,1\n"),
        ("rsna", "no-header.csv", b"\xff\xfe garbage"),
        ("csv", "bad-encoding.csv", b"image,x0,y0,x1,y1,label\n\xff\xfe,1,1,2,2,x\n"),
        ("yolo", "garbage.txt", os.urandom(4096)),
        ("yolo", "huge.txt", b"0 1e308 1e308 1e308 1e308\n0 nan nan 0.1 0.1\n"),
        ("mask", "bomb.zip", masks.getvalue()),
        ("mask", "a.png", b"\x89PNG\r\n\x1a\n truncated"),
    ]


def checkpoint_corpus() -> dict[str, bytes]:
    import pickle

    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo PWNED > /tmp/softcam-fuzz-pwned",))

    good = io.BytesIO()
    torch.save({"state_dict": {}}, good)
    evil = io.BytesIO()
    torch.save({"x": Exploit()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    return {
        "empty.pt": b"",
        "random.pt": os.urandom(4096),
        "truncated.pt": good.getvalue()[: len(good.getvalue()) // 2],
        "no-header.pt": good.getvalue(),
        "pickle-exploit.pt": evil.getvalue(),
        "zip-not-torch.pt": _zip_with("data.pkl", b"not a pickle"),
    }


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(name, data)
    return buffer.getvalue()


def run(out_dir: Path) -> list[dict]:
    from sqlalchemy import func, select

    from annotations.formats import AnnotationFormatError
    from db import repository
    from db.schema import Annotation, Image
    from db.session import get_engine, session_scope, upgrade
    from softcam_core.models import CheckpointError, read_checkpoint

    engine = get_engine(f"sqlite:///{out_dir / 'fuzz.db'}")
    upgrade(engine)
    files = out_dir / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "a.png").write_bytes(_png(24, 24))
    with session_scope(engine) as session:
        repository.import_images(session, [files / "a.png"], "fuzz")

    def counts():
        with session_scope(engine, readonly=True) as session:
            return [session.scalar(select(func.count()).select_from(Image)),
                    session.scalar(select(func.count()).select_from(Annotation))]

    import resource

    rows = []

    def peak() -> int:
        """This program's peak resident memory so far, bytes: VmHWM of its own address space. Not
        ru_maxrss: Linux carries that over exec from the forking parent (a large pytest process)."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    for name, data in image_corpus().items():
        path = files / "images" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        before = counts()
        row = {"importer": "images", "file": name, "before": before}
        try:
            with session_scope(engine) as session:
                result = repository.import_images(session, [path], "fuzz")
            row.update(outcome="rejected" if result.rejected and not result.accepted else "accepted",
                       error_type="RejectedImage" if result.rejected else None,
                       message=result.rejected[0].reason if result.rejected else None)
        except Exception as exc:
            row.update(outcome="crash", error_type=type(exc).__name__, message=str(exc)[:300])
        row["after"] = counts()
        row["peak_rss_bytes"] = peak()
        rows.append(row)
    for fmt, name, data in annotation_corpus():
        path = files / "annotations" / fmt / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        before = counts()
        row = {"importer": f"annotations:{fmt}", "file": name, "before": before}
        try:
            with session_scope(engine) as session:
                repository.import_annotations(session, path, fmt, "fuzz", None, label="lesion")
            row.update(outcome="accepted", error_type=None, message=None)
        except (repository.AnnotationImportError, AnnotationFormatError) as exc:
            row.update(outcome="rejected", error_type=type(exc).__name__, message=str(exc)[:300])
        except Exception as exc:
            row.update(outcome="crash", error_type=type(exc).__name__, message=str(exc)[:300])
        row["after"] = counts()
        row["peak_rss_bytes"] = peak()
        rows.append(row)
    for name, data in checkpoint_corpus().items():
        path = files / "checkpoints" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        row = {"importer": "checkpoints", "file": name, "before": None, "after": None}
        try:
            read_checkpoint(path)
            row.update(outcome="accepted", error_type=None, message=None)
        except CheckpointError as exc:
            row.update(outcome="rejected", error_type=type(exc).__name__, message=str(exc)[:300])
        except Exception as exc:
            row.update(outcome="crash", error_type=type(exc).__name__, message=str(exc)[:300])
        row["peak_rss_bytes"] = peak()
        rows.append(row)
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "peak_rss_bytes": peak()}, indent=1))
    return rows


if __name__ == "__main__":
    run(Path(sys.argv[1]))
