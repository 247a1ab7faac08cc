"""De-identification (PS3.15 basic profile subset) and safe metadata."""

from __future__ import annotations

import glob
import io
import os
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from softcam_core.imaging import ImageLoadError, deidentified_bytes, deidentify, load_image, remap_uid
from tests.plugins.imaging import cr_monochrome1_path, make_dicom_bytes

KEY = b"test-key"


def _rich_dataset() -> Dataset:
    """The real CR radiograph plus every kind of identifier the profile must remove."""
    ds = pydicom.dcmread(cr_monochrome1_path())
    ds.PatientBirthDate = "19450212"
    ds.OtherPatientIDs = "OTHERID-777"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.InstitutionAddress = "1 Hospital Road, Springfield"
    ds.ReferringPhysicianName = "Kildare^James"
    ds.PerformingPhysicianName = "Casey^Ben"
    ds.OperatorsName = "Tech^Terry"
    ds.StationName = "XRAYROOM42"
    ds.DeviceSerialNumber = "SN-998877"
    ds.AccessionNumber = "ACC-123456"
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDateTime = "20200110", "20200110", "20200110083000"
    item = Dataset()
    item.PatientName = "Nested^Name"
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([item])
    ds.add_new(0x00091010, "LO", "PRIVATE-SECRET-VALUE")  # needs a creator to be a proper private tag
    ds.add_new(0x00090010, "LO", "ACME CORP")
    ds.add_new(0x60000010, "US", 16)  # overlay rows
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 8)
    ds.add_new(0x50000005, "US", 2)  # curve dimensions
    ds.BurnedInAnnotation = "YES"
    return ds


IDENTIFIERS = ("Doe", "Archibald", "77654033", "OTHERID-777", "Elsewhere", "Springfield", "Kildare", "Casey",
               "Terry", "XRAYROOM42", "SN-998877", "ACC-123456", "Nested", "PRIVATE-SECRET-VALUE", "19450212")


def test_basic_profile_removes_identifiers():
    original = _rich_dataset()
    before = original.to_json()
    clean = deidentify(original, key=KEY)
    assert original.to_json() == before  # input untouched
    buffer = io.BytesIO()
    clean.save_as(buffer)
    written = buffer.getvalue()
    text = clean.to_json()
    for secret in IDENTIFIERS:
        assert secret.encode() not in written and secret not in text, secret
    assert clean.PatientIdentityRemoved == "YES" and clean.DeidentificationMethod
    assert [c.CodeValue for c in clean.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert str(clean.PatientName) == clean.PatientID and clean.PatientID.startswith("P-")
    assert not any(tag.is_private for tag in clean.keys())
    assert not any(0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF for tag in clean.keys())
    assert "PatientSex" not in clean and "PatientBirthDate" not in clean
    assert clean.BurnedInAnnotation == "YES"
    assert clean.SOPClassUID == original.SOPClassUID  # registered UIDs kept
    assert clean.PixelData == original.PixelData


def test_dates_shift_consistently_and_uids_remap_consistently():
    a = _rich_dataset()
    b = _rich_dataset()
    b.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    b.StudyDate = "20200120"  # same patient, 10 days later
    ca, cb = deidentify(a, key=KEY), deidentify(b, key=KEY)
    assert ca.StudyDate != a.StudyDate
    from datetime import date

    def day(text):
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    assert (day(cb.StudyDate) - day(ca.StudyDate)).days == 10  # interval kept
    assert (day(a.StudyDate) - day(ca.StudyDate)).days == (day(b.StudyDate) - day(cb.StudyDate)).days
    assert ca.AcquisitionDateTime[8:] == "083000" and ca.AcquisitionDateTime[:8] == ca.StudyDate
    # same study UID -> same new UID; the nested reference follows its instance
    assert ca.StudyInstanceUID == cb.StudyInstanceUID != a.StudyInstanceUID
    assert ca.StudyInstanceUID == remap_uid(a.StudyInstanceUID, KEY)
    assert ca.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ca.SOPInstanceUID
    assert ca.SOPInstanceUID != cb.SOPInstanceUID
    assert ca.file_meta.MediaStorageSOPInstanceUID == ca.SOPInstanceUID
    # another key gives other pseudonyms
    other = deidentify(a, key=b"another key")
    assert other.StudyInstanceUID != ca.StudyInstanceUID and other.PatientID != ca.PatientID


def test_keep_patient_characteristics_option():
    ds = _rich_dataset()
    ds.PatientSex, ds.PatientAge = "F", "075Y"
    kept = deidentify(ds, key=KEY, keep_patient_characteristics=True)
    assert (kept.PatientSex, kept.PatientAge) == ("F", "075Y")
    assert "113108" in [c.CodeValue for c in kept.DeidentificationMethodCodeSequence]


def test_default_key_lives_in_softcam_home(_isolated_home):
    ds = _rich_dataset()
    first = deidentify(ds)
    assert (_isolated_home / "deid.key").exists()
    assert oct((_isolated_home / "deid.key").stat().st_mode & 0o777) == "0o600"
    assert deidentify(ds).PatientID == first.PatientID


def _fixture_files():
    from pydicom.data import get_testdata_file

    root = os.path.dirname(get_testdata_file("CT_small.dcm", download=False))
    return sorted(glob.glob(os.path.join(root, "*.dcm")) + glob.glob(os.path.join(root, "dicomdirtests/77654033/CR*/*")))


def _identifiers(ds) -> set[str]:
    values = set()
    # person names and ids (institution / station strings may legitimately equal the kept Manufacturer)
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "ReferringPhysicianName",
                    "OperatorsName", "PerformingPhysicianName", "AccessionNumber"):
        raw = str(ds.get(keyword, "") or "")
        for part in raw.replace("^", " ").replace("=", " ").split():
            if len(part) >= 5:
                values.add(part)
    return values


def test_no_name_or_id_from_pydicom_fixtures_survives(tmp_path):
    checked = 0
    for path in _fixture_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # some fixtures are deliberately malformed
                ds = pydicom.dcmread(path, force=True)
                secrets = _identifiers(ds)
        except Exception:
            continue
        if not secrets:
            continue
        try:
            stored = deidentified_bytes(path, key=KEY)
        except ImageLoadError:
            continue
        for secret in secrets:  # the whole written file, pixel data included
            assert secret.encode() not in stored, (path, secret)
        try:
            image = load_image(path)
        except ImageLoadError:
            continue
        shown = repr(image.metadata) + repr(image.flags) + image.name
        for secret in secrets:
            assert secret not in shown, (path, secret)
        checked += 1
    assert checked >= 20


def test_metadata_of_original_and_stored_copy_agree(_isolated_home):
    data = make_dicom_bytes(np.zeros((8, 8), np.uint8))
    original = load_image(data)
    stored = load_image(deidentified_bytes(data))
    for field in ("pseudo_patient_id", "pseudo_study_uid", "pseudo_series_uid", "pseudo_sop_uid"):
        assert original.metadata[field] == stored.metadata[field]
    assert "Test" not in repr(original.metadata) and "ID-12345" not in repr(original.metadata)


def test_deidentified_bytes_strips_photo_metadata(tmp_path):
    from PIL import PngImagePlugin

    pixels = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "Smith^John")
    info.add_itxt("Comment", "DOB 1950-01-01")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    png = buf.getvalue()
    assert b"Smith" in png
    clean = deidentified_bytes(png, name="p.png")
    assert b"Smith" not in clean and b"1950" not in clean
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(clean))), pixels)

    exif = Image.Exif()
    exif[0x013B] = "Dr Artist Smith"  # Artist
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    jpeg = buf.getvalue()
    jpeg = jpeg[:2] + b"\xff\xfe\x00\x0eJohn Smith!!" + jpeg[2:]  # a COM segment (length counts itself)
    assert b"Smith" in jpeg
    clean = deidentified_bytes(jpeg, name="p.jpg")
    assert b"Smith" not in clean
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(clean))), np.asarray(Image.open(io.BytesIO(jpeg))))

    import tifffile

    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, pixels[..., 0], description="Patient Smith^John", metadata=None)
    assert b"Smith" in path.read_bytes()
    clean = deidentified_bytes(path)
    assert b"Smith" not in clean
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(clean)), pixels[..., 0])


def test_deidentified_bytes_rejects_non_images():
    with pytest.raises(ImageLoadError, match=r"^notes\.txt: .*text file"):
        deidentified_bytes(b"hello world\n", name="notes.txt")
