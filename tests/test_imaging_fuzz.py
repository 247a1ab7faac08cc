"""Fuzz: mutated real files (flipped, truncated, spliced, inserted, deleted bytes) never raise anything
but ImageLoadError from load_image / deidentified_bytes, and what loads is a valid image."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from softcam_core.imaging import ImageLoadError, deidentified_bytes, load_image, preprocess
from tests.conftest import REAL_DATA
from tests.plugins.imaging import make_dicom_bytes

PYDICOM_SEEDS = ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd_jpeg.dcm",
                 "examples_palette.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "693_J2KI.dcm")
REAL_SEEDS = ("fundus_kaggle_dr/images/26127_right.png", "oct_bonn_drusen/bscans/7-Input.tif",
              "cxr_tbx11k_nih/nih/00000001_000.png", "cxr_rsna_png/images/719bb18b-a428-4fd8-9338-46f1187ffa5c.png")
FUZZ_MAX_PIXELS = 2_000_000  # keeps each example fast; the cap itself is part of what is fuzzed


@functools.lru_cache(maxsize=1)
def _seeds() -> tuple[bytes, ...]:
    from pydicom.data import get_testdata_file
    import glob

    seeds = []
    for name in PYDICOM_SEEDS:
        path = get_testdata_file(name, download=False)
        if path:
            seeds.append(Path(path).read_bytes())
    cr = sorted(glob.glob(str(Path(get_testdata_file("CT_small.dcm", download=False)).parent / "dicomdirtests/77654033/CR1/*")))
    seeds += [Path(p).read_bytes() for p in cr]
    if REAL_DATA.is_dir():
        seeds += [(REAL_DATA / rel).read_bytes() for rel in REAL_SEEDS if (REAL_DATA / rel).exists()]
        # a real IDRiD photo re-encoded small, so whole-file mutations of a JPEG decode quickly
        photo = Image.open(REAL_DATA / "fundus_idrid/images/0437.jpg")
        photo.draft("RGB", (536, 356))
        buf = io.BytesIO()
        photo.convert("RGB").save(buf, format="JPEG", quality=80)
        seeds.append(buf.getvalue())
    # 16-bit grey PNG and a multi-page TIFF (formats the real folders lack)
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(buf, format="PNG")
    seeds.append(buf.getvalue())
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.arange(3 * 32 * 40, dtype=np.uint16).reshape(3, 32, 40), photometric="minisblack")
    seeds.append(buf.getvalue())
    seeds.append(make_dicom_bytes(np.arange(48 * 40, dtype=np.uint16).reshape(48, 40), WindowCenter=900, WindowWidth=1000))
    return tuple(seeds)


@st.composite
def mutated(draw) -> bytes:
    seeds = _seeds()
    data = bytearray(seeds[draw(st.integers(0, len(seeds) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        # half the edits hit the first 2 KB, where headers live
        pos = draw(st.one_of(st.integers(0, max(0, min(n, 2048) - 1)), st.integers(0, max(0, n - 1))))
        op = draw(st.sampled_from(("flip", "byte", "truncate", "splice", "insert", "delete", "int")))
        if n == 0:
            break
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255)))))
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = seeds[draw(st.integers(0, len(seeds) - 1))]
            start = draw(st.integers(0, max(0, len(other) - 1)))
            data[pos:pos] = other[start : start + draw(st.integers(1, 512))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        else:  # overwrite with a large/negative 16- or 32-bit integer, e.g. a length or a dimension
            value = draw(st.sampled_from((0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0x8000, 0, 1, 65535 * 2)))
            data[pos : pos + 4] = (value & 0xFFFFFFFF).to_bytes(4, draw(st.sampled_from(("little", "big"))))
    return bytes(data)


def _check(data: bytes) -> None:
    try:
        image = load_image(data, name="fuzz.bin", max_pixels=FUZZ_MAX_PIXELS)
    except ImageLoadError as error:
        message = str(error)
        assert message.startswith("fuzz.bin: ") and "\n" not in message and len(message) < 500
    else:
        assert image.pixels.dtype == np.uint8
        assert image.pixels.ndim == 2 or (image.pixels.ndim == 3 and image.pixels.shape[2] == 3)
        assert image.modality in ("fundus", "oct", "cxr", "other")
        x, _ = preprocess(image, 16)
        assert x.shape == (3, 16, 16) and bool(x.isfinite().all())
    try:
        deidentified_bytes(data, name="fuzz.bin")
    except ImageLoadError as error:
        assert str(error).startswith("fuzz.bin: ") and "\n" not in str(error)


def test_seeds_load():
    assert len(_seeds()) >= 15
    for seed in _seeds():
        _check(seed)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(mutated())
def test_fuzz_only_image_load_error_escapes(data):
    _check(data)


@pytest.mark.slow
@settings(max_examples=6000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(mutated())
def test_fuzz_only_image_load_error_escapes_long(data):
    _check(data)
