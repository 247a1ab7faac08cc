"""The JPEG marker structure (ITU-T T.81 B.1), walked once for every reader that needs it.

``segments(data)`` yields each marker segment from the first after SOI up to and including the
start-of-scan (SOS) header; the entropy-coded data follows ``end`` of the SOS segment. Standalone
markers (TEM, RST0-7, SOI, EOI) have no length; fill bytes (0xFF 0xFF) are skipped. Used by the
size check before decoding (:func:`softcam_core.imaging.raster.peek_size`), the de-identifying copy
(APPn / COM segments dropped) and the DICOM repair of bad sequential scan headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

SOS = 0xDA
STANDALONE = frozenset({0x01, 0xD8, 0xD9, *range(0xD0, 0xD8)})


class JpegStructureError(ValueError):
    """The bytes do not follow the JPEG marker structure (message: what is wrong, one line)."""


@dataclass(frozen=True)
class Segment:
    """One marker segment: ``marker`` (the byte after 0xFF), ``start`` (offset of the 0xFF) and ``end``
    (offset just after it; for SOS, after its header)."""

    marker: int
    start: int
    end: int

    @property
    def is_frame_header(self) -> bool:
        """SOF0-SOF15 (not DHT 0xC4, JPG 0xC8, DAC 0xCC): its payload holds the image size."""
        return 0xC0 <= self.marker <= 0xCF and self.marker not in (0xC4, 0xC8, 0xCC)


def segments(data: bytes | bytearray, start: int = 2) -> Iterator[Segment]:
    """The segments of ``data`` from offset ``start`` (just after SOI) through SOS.

    Raises:
        JpegStructureError: a byte where a marker should be, a segment running past the end, or no
            start of scan.
    """
    pos = start
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            raise JpegStructureError("corrupt JPEG marker structure")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            yield Segment(marker, pos, pos + 2)
            pos += 2
            continue
        if pos + 4 > len(data):
            raise JpegStructureError("truncated JPEG segment")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise JpegStructureError("truncated JPEG segment")
        yield Segment(marker, pos, end)
        if marker == SOS:
            return
        pos = end
    raise JpegStructureError("JPEG without image scan")
