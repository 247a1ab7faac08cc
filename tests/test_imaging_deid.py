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
    assert not clean.get("PatientSex") and not clean.get("PatientBirthDate")  # Table E.1-1: Z (emptied)
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
    assert ca.AcquisitionDateTime == ca.StudyDate  # a date-time keeps only its shifted date: times of day go
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


def test_default_key_lives_in_the_key_folder_apart_from_the_data(_isolated_home, tmp_path, monkeypatch):
    from softcam_core.paths import key_dir

    ds = _rich_dataset()
    first = deidentify(ds)
    folder = key_dir()
    assert (folder / "deid.key").is_file() and not (_isolated_home / "deid.key").exists()
    assert _isolated_home not in folder.parents
    assert oct((folder / "deid.key").stat().st_mode & 0o777) == "0o600"
    assert len((folder / "deid.key").read_text().strip()) == 64
    assert deidentify(ds).PatientID == first.PatientID
    # a key an earlier version kept beside the data moves to the key folder and keeps its pseudonyms
    monkeypatch.setenv("SOFTCAM_KEY_DIR", str(tmp_path / "new-keys"))
    (_isolated_home / "deid.key").write_text("ab" * 32)
    moved = deidentify(ds)
    assert moved.PatientID == deidentify(ds, key=("ab" * 32).encode()).PatientID
    assert (tmp_path / "new-keys" / "deid.key").read_text() == "ab" * 32 and not (_isolated_home / "deid.key").exists()
    # a key folder inside the data folder would travel with every copy of it: refused
    monkeypatch.setenv("SOFTCAM_KEY_DIR", str(_isolated_home / "keys"))
    with pytest.raises(RuntimeError, match="inside the data folder"):
        key_dir()


def test_default_key_folder_is_per_data_folder_under_the_user_config(_isolated_home, tmp_path, monkeypatch):
    from softcam_core.paths import key_dir

    monkeypatch.delenv("SOFTCAM_KEY_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    first = key_dir()
    assert first.parent == tmp_path / "config" / "softcam-review" / "keys"
    assert oct(first.stat().st_mode & 0o777) == "0o700"
    monkeypatch.setenv("SOFTCAM_HOME", str(tmp_path / "other-home"))
    assert key_dir() != first


# ---------------------------------------------------------------------------------------------
# the whole of Table E.1-1


def _vr_of(rule) -> str:
    """The VR to give the attribute of a table row (pydicom's dictionary; by name for attributes newer
    than it)."""
    from pydicom.datadict import dictionary_VR

    tag = _concrete_tag(rule.tag)
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        name = rule.name.lower()
        for word, vr in (("sequence", "SQ"), ("datetime", "DT"), ("uid", "UI"), ("date", "DA"), ("time", "TM")):
            if name.endswith(word):
                return vr
        return "LO"


def _concrete_tag(text: str) -> int:
    """``(60xx,3000)`` -> 0x60023000 (a masked row tested on group 6002 / 5002, not the first one)."""
    digits = text.strip("()").replace(",", "")
    value = int(digits.replace("x", "0"), 16)
    return value | (0x00020000 if "x" in digits[:4] else 0)


def _token(vr: str, index: int):
    """A value for ``vr`` that appears nowhere else, and its bytes as written (None: numeric)."""
    if vr == "UI":
        return f"1.2.826.0.1.3680043.10.5{index:04d}.77", None
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 31000 + index, None
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return f"TK{index:04d}".encode(), None
    if vr == "DA":
        return "19{:02d}{:02d}{:02d}".format(10 + index % 80, 1 + index % 12, 1 + index % 28), None
    if vr == "DT":
        return "19{:02d}0102030405".format(10 + index % 80), None
    if vr == "TM":
        return "{:02d}{:02d}17".format(index % 24, index % 60), None
    if vr == "AS":
        return f"{index % 999:03d}Y", None
    if vr == "CS":
        return f"TK{index:04d}", None
    if vr == "DS":
        return f"7{index:04d}.5", None
    if vr == "IS":
        return str(70000 + index), None
    if vr == "PN":
        return f"Token^Person{index:04d}", None
    if vr == "AE":
        return f"AETK{index:04d}", None
    return f"TOKEN-{index:04d}-SECRET", None


def _dataset_with(rule, index):
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    tag, vr = _concrete_tag(rule.tag), _vr_of(rule)
    if vr == "SQ":
        item = Dataset()
        item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.10.6{index:04d}.1"
        item.CodeMeaning = f"TOKEN-{index:04d}-NESTED"
        value = Sequence([item])
    else:
        value = _token(vr, index)[0]
    (ds.file_meta if tag >> 16 == 2 else ds).add(DataElement(tag, vr, value))
    return ds, tag, vr, value


def _written(ds) -> bytes:
    """The dataset's bytes as a file holds them, file meta included (command elements too)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    if getattr(ds, "file_meta", None) is not None:
        write_file_meta_info(buffer, ds.file_meta, enforce_standard=False)
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("dates", ["remove", "shift"])
def test_every_attribute_of_table_e1_1_gets_its_action(dates):
    """One dataset per table row, its attribute set to a value found nowhere else; after
    de-identification the row's action (resolved as RESOLVED_ACTION says) holds."""
    from softcam_core.imaging.deid import RESOLVED_ACTION, TABLE_EDITION, profile_table

    rules = profile_table()
    assert TABLE_EDITION == "2026c" and len(rules) >= 650
    checked = {}
    for index, rule in enumerate(rules):
        ds, tag, vr, value = _dataset_with(rule, index)
        clean = deidentify(ds, key=KEY, dates=dates)
        if tag >> 16 == 2:  # file meta: MediaStorageSOPInstanceUID, remapped like the instance it names
            assert rule.action == "U" and clean.file_meta[tag].value == remap_uid(value, KEY), rule
            checked[rule.action] = checked.get(rule.action, 0) + 1
            continue
        action = RESOLVED_ACTION[rule.action]
        where = (rule.tag, rule.name, rule.action, vr)
        token_text = str(value) if vr != "SQ" else f"TOKEN-{index:04d}-NESTED"
        if vr not in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "SQ"):
            assert token_text.encode() not in _written(clean) or (action == "U*"), where
        if rule.keyword in ("PatientName", "PatientID"):
            assert clean[tag].value == clean.PatientID and clean.PatientID.startswith("P-"), where
        elif dates == "shift" and vr in ("DA", "DT") and rule.keyword != "PatientBirthDate":
            shifted = clean[tag].value
            assert shifted and len(shifted) == 8 and shifted != str(value)[:8], where  # moved back, date only
        elif action == "X":
            assert tag not in clean, where
        elif action == "Z":
            assert tag in clean and not clean[tag].value, where
        elif action == "D":
            assert tag in clean, where
            if vr == "UI":
                assert clean[tag].value == remap_uid(value, KEY), where
            elif vr == "SQ":
                assert len(clean[tag].value) == 0, where
            else:
                assert clean[tag].value not in (None, "", b"") and clean[tag].value != value, where
        elif action == "U":
            if vr == "UI":
                assert clean[tag].value == remap_uid(value, KEY), where
            else:
                assert tag in clean and clean[tag].value != value, where
        elif action == "U*":  # kept, its references remapped, the same way as the instance they name
            nested = clean[tag].value[0]
            assert nested.ReferencedSOPInstanceUID == remap_uid(value[0].ReferencedSOPInstanceUID, KEY), where
        else:
            raise AssertionError(f"no check for {action}")
        checked[rule.action] = checked.get(rule.action, 0) + 1
    assert set(checked) == set(RESOLVED_ACTION), checked


def test_table_matches_the_maintained_profile():
    """The CSV is what tools/make_deid_table.py makes from dicom-anonymizer's copy of the standard."""
    pytest.importorskip("dicomanonymizer", reason="dicom-anonymizer (requirements-test.txt) regenerates the table")
    import importlib.util
    from pathlib import Path

    from softcam_core.imaging.deid import TABLE_EDITION, TABLE_PATH

    path = Path(__file__).resolve().parents[1] / "tools" / "make_deid_table.py"
    spec = importlib.util.spec_from_file_location("make_deid_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EDITION == TABLE_EDITION
    assert TABLE_PATH.read_text() == module.render()


# the leaks a check found in the subset this replaced, and the kinds of element no table row names
LEAKS = {
    "ImagingServiceRequestComments": "LT", "RequestedProcedureComments": "LT", "ClinicalTrialSubjectID": "LO",
    "ClinicalTrialSponsorName": "LO", "ClinicalTrialSiteName": "LO", "AcquisitionDeviceProcessingDescription": "LO",
    "StudyTime": "TM", "AcquisitionTime": "TM", "ReasonForTheRequestedProcedure": "LO",
    "CommentsOnThePerformedProcedureStep": "ST",
}


def test_the_known_leaks_and_unnamed_elements_are_gone():
    ds = _rich_dataset()
    for index, (keyword, vr) in enumerate(LEAKS.items()):
        value = f"LEAK{index:02d}XYZ" if vr != "TM" else f"1{index % 10}3117"
        setattr(ds, keyword, value)
    report = Dataset()
    report.ValueType, report.TextValue = "TEXT", "Findings for LEAKREPORT Doe"
    ds.ContentSequence = Sequence([report])
    ds.file_meta.SendingApplicationEntityTitle = "LEAKSENDER"
    ds.file_meta.SourceApplicationEntityTitle = "LEAKSOURCE"
    ds.add_new(0x00280005, "US", 4242)  # ImageDimensions: retired
    ds.add_new(0x00091001, "UN", b"LEAKUNKNOWN!")  # private, unknown content
    ds.add_new(0x00190010, "LO", "ACME")
    ds.add_new(0x00191002, "UN", b"LEAKPRIVATEUN")
    ds.add_new(0x60020022, "LO", "LEAKOVERLAYDESC")  # overlay description, a row the table does not name
    originals = {keyword: str(ds.get(keyword)) for keyword in LEAKS}
    written = _written(deidentify(ds, key=KEY))
    for keyword, value in originals.items():
        assert value.encode() not in written, keyword
    for token in (b"LEAKREPORT", b"LEAKSENDER", b"LEAKSOURCE", b"LEAKUNKNOWN", b"LEAKPRIVATEUN", b"LEAKOVERLAYDESC"):
        assert token not in written, token
    clean = deidentify(ds, key=KEY)
    assert 0x00280005 not in clean and not clean.ContentSequence


def test_dates_removed_option():
    ds = _rich_dataset()
    ds.ContentDate, ds.InstanceCreationDate = "20200110", "20200110"
    clean = deidentify(ds, key=KEY, dates="remove")
    assert b"2020" not in _written(clean).replace(str(clean.SOPInstanceUID).encode(), b"")
    assert not clean.get("StudyDate") and "SeriesDate" not in clean and "AcquisitionDateTime" not in clean
    assert clean.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in clean.DeidentificationMethodCodeSequence] == ["113100"]
    with pytest.raises(ValueError, match="dates"):
        deidentify(ds, key=KEY, dates="keep")


def test_audit_names_every_element_and_never_its_value():
    from softcam_core.imaging.deid import audit

    ds = _rich_dataset()
    ds.ClinicalTrialSponsorName = "Sponsor LEAK"
    rows = audit(ds)
    by_path = {row.path: row for row in rows}
    assert by_path["PatientName"].action == "replace" and "Z" in by_path["PatientName"].reason
    assert by_path["ClinicalTrialSponsorName"].action == "replace"
    assert by_path["InstitutionName"].action == "remove" and "X/Z/D" in by_path["InstitutionName"].reason
    assert by_path["ReferencedImageSequence"].action == "walk"
    assert by_path["ReferencedImageSequence[0].PatientName"].action == "replace"
    assert by_path["ReferencedImageSequence[0].ReferencedSOPInstanceUID"].action == "remap"
    assert by_path["StudyDate"].action == "shift" and audit(ds, dates="remove")[0] is not None
    assert {row.path for row in rows if row.action == "remove" and row.reason == "private attribute"} >= {"(0009,1010)"}
    assert "Sponsor LEAK" not in repr(rows) and "Doe" not in repr(rows)


def test_cli_deid_check_prints_what_happens_to_each_attribute(tmp_path, capsys):
    from softcam_core.cli import main as cli_main

    path = tmp_path / "Doe_John_19450212.dcm"
    ds = _rich_dataset()
    ds.ClinicalTrialSiteName = "Site LEAK"
    ds.save_as(path)
    assert cli_main(["deid", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ClinicalTrialSiteName" in out and "Table E.1-1 Z" in out and "2026c" in out
    assert "Site LEAK" not in out and "Archibald" not in out
    assert cli_main(["deid", "check", str(tmp_path / "missing.dcm")]) == 2
    assert "missing.dcm" in capsys.readouterr().err


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
