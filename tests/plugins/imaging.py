"""Imaging fixtures other areas may reuse: pydicom's bundled files and synthetic DICOM/PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest


def pydicom_file(name: str) -> str:
    """Path of a DICOM file bundled with pydicom (offline); skips the test when it is missing."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled with this pydicom")
    return str(path)


def cr_monochrome1_path() -> str:
    """A real CR radiograph (MONOCHROME1, 12-bit, rescale slope/intercept, window, patient name)."""
    from pydicom.data import get_testdata_files

    files = sorted(p for p in get_testdata_files("dicomdirtests/77654033/CR1/*"))
    if not files:
        pytest.skip("pydicom dicomdirtests CR files not bundled")
    return str(files[0])


def make_dicom_bytes(pixels: np.ndarray, **attributes) -> bytes:
    """A DICOM file (explicit VR little endian) holding ``pixels`` (uint8/uint16 (H, W) or uint8 (H, W, 3)).

    Defaults describe a derived secondary-capture chest radiograph with a fake patient
    (``PatientName="Test^Patient"``, ``PatientID="ID-12345"``) so de-identification can be checked;
    ``attributes`` (DICOM keywords) override or extend them.
    """
    from pydicom.dataset import FileMetaDataset, FileDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "ID-12345"
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = "20200315"
    ds.Rows, ds.Columns = pixels.shape[:2]
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def synthetic_fundus(height: int, width: int, cx: float, cy: float, r: float, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 photo: an orange disc (retina) with vignetting on a black surround, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    d = np.hypot(xx - cx, yy - cy) / r
    inside = d <= 1.0
    shade = np.clip(1.0 - 0.5 * d**2, 0, 1)
    img = np.zeros((height, width, 3), np.float32)
    for c, level in enumerate((200.0, 90.0, 40.0)):
        img[..., c] = np.where(inside, level * shade, 0.0)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def dicom_bytes_factory():
    """``make_dicom_bytes(pixels, **attributes) -> bytes`` (see tests/plugins/imaging.py)."""
    return make_dicom_bytes


@pytest.fixture
def cxr_dicom_bytes() -> bytes:
    """A 64x64 16-bit DX chest DICOM with a fake patient name/ID and a lung window."""
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = (xx * 40 + yy * 10).astype(np.uint16)
    return make_dicom_bytes(pixels, WindowCenter=1500, WindowWidth=2000, WindowCenterWidthExplanation="LUNG",
                            ImagerPixelSpacing=[0.5, 0.5])
