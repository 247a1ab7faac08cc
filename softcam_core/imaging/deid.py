"""De-identification: DICOM PS3.15 Annex E basic profile (subset) and safe metadata.

Pseudonyms, date offsets and new UIDs are keyed HMAC-SHA256 digests of the original values, so the
same patient / UID always maps to the same pseudonym within one key (studies stay linked across
imports) while the original cannot be recovered without the key. The key is ``SOFTCAM_DEID_KEY`` if
set, else a random secret created once in ``SOFTCAM_HOME/deid.key``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import io
import warnings

from .errors import ImageLoadError, _one_line, is_decoder_failure, quiet_logs

# Attributes removed outright (PS3.15 Table E.1-1 actions X/Z/D for identifying data). PatientName
# and PatientID are replaced by a pseudonym instead; UIDs are remapped; dates shifted.
REMOVED_KEYWORDS: tuple[str, ...] = (
    "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "PatientTelecomInformation", "MilitaryRank", "BranchOfService", "Occupation", "EthnicGroup",
    "PatientReligiousPreference", "AdditionalPatientHistory", "PatientComments", "MedicalRecordLocator",
    "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientInsurancePlanCodeSequence",
    "CountryOfResidence", "RegionOfResidence", "MedicalAlerts", "Allergies", "SmokingStatus", "LastMenstrualDate",
    "SpecialNeeds", "PatientState", "PregnancyStatus", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence",
    "OperatorsName", "OperatorIdentificationSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "RequestingPhysician",
    "RequestingService", "ScheduledPerformingPhysicianName", "StationName", "DeviceSerialNumber", "DetectorID",
    "PlateID", "GantryID", "CassetteID", "StudyDescription", "SeriesDescription", "ImageComments", "StudyComments",
    "RequestedProcedureDescription", "RequestedProcedureID", "PerformedProcedureStepID",
    "PerformedProcedureStepDescription", "ScheduledProcedureStepID", "ScheduledProcedureStepDescription",
    "PerformedLocation", "PerformedStationName", "PerformedStationAETitle", "ScheduledStationName",
    "ScheduledStationAETitle", "RequestAttributesSequence", "ReferencedPatientSequence", "ContentCreatorName",
    "VerifyingObserverName", "PersonName", "ResponsiblePerson", "ResponsibleOrganization", "ProtocolName",
    "FrameComments", "AdmissionID", "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
    "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription", "VisitComments",
    "CurrentPatientLocation", "PatientInstitutionResidence", "InterpretationRecorder", "InterpretationTranscriber",
    "InterpretationAuthor", "InterpretationApproverSequence", "ResultsID", "DistributionName", "DistributionAddress",
    "OrderEnteredBy", "OrderEntererLocation", "OrderCallbackPhoneNumber", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "ReasonForStudy", "TextComments", "AcquisitionComments",
    "OriginalAttributesSequence", "ModifiedAttributesSequence", "DerivationDescription", "ReviewerName",
    "InstitutionDepartmentTypeCodeSequence", "InstanceCreatorUID",
)
# Kept only with the Retain Patient Characteristics option.
PATIENT_CHARACTERISTICS: tuple[str, ...] = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientSexNeutered")

DEID_METHOD = "SoftCAM Review: PS3.15 basic profile subset"  # LO: at most 64 characters
MAX_DATE_SHIFT_DAYS = 3650


def deid_key() -> bytes:
    """The pseudonymisation secret (``SOFTCAM_DEID_KEY`` or ``SOFTCAM_HOME/deid.key``, made on first use)."""
    from softcam_core.paths import secret_key

    return secret_key("deid.key", "SOFTCAM_DEID_KEY")


def _key_bytes(key: bytes | str | None) -> bytes:
    if key is None:
        return deid_key()
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _digest(key: bytes, purpose: str, value: str) -> str:
    return hmac.new(key, f"{purpose}\x00{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def pseudonym(value: str, key: bytes | str | None = None, prefix: str = "P") -> str:
    """Stable pseudonymous id of ``value`` under ``key``, e.g. ``P-3fa94c01be72``."""
    return f"{prefix}-{_digest(_key_bytes(key), 'id', str(value))[:12]}"


def remap_uid(uid: str, key: bytes | str | None = None) -> str:
    """Same UID in -> same new ``2.25.<128-bit int>`` UID out, for a given key."""
    return "2.25." + str(int(_digest(_key_bytes(key), "uid", str(uid).strip())[:32], 16))


def _patient_ref(ds) -> str:
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            return f"{keyword}={value}"
    return "unknown"


def date_shift_days(ds, key: bytes | str | None = None) -> int:
    """Days (1..3650) every date of this patient is moved back; fixed per patient and key."""
    return 1 + int(_digest(_key_bytes(key), "date", _patient_ref(ds))[:8], 16) % MAX_DATE_SHIFT_DAYS


def _shift_date(text: str, days: int) -> str | None:
    text = text.strip()
    if not text:
        return text
    if "-" in text:  # a date range (query syntax) is not expected in stored instances
        return None
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
    return (day - dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]


def _is_registered_uid(uid: str) -> bool:
    from pydicom.uid import UID_dictionary

    return uid in UID_dictionary


def _clean(dataset, key: bytes, days: int, patient_pseudonym: str, keep_characteristics: bool) -> None:
    removed = set(REMOVED_KEYWORDS) | (set() if keep_characteristics else set(PATIENT_CHARACTERISTICS))
    for tag in list(dataset.keys()):
        element = dataset[tag]
        group = tag.group
        if tag.is_private or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            del dataset[tag]  # private data, curves (50xx) and overlays (60xx) may carry identifiers or burned text
            continue
        keyword = element.keyword
        if keyword in ("PatientName", "PatientID"):
            element.value = patient_pseudonym
            continue
        if keyword in removed:
            del dataset[tag]
            continue
        vr = element.VR
        if vr == "SQ":
            for item in element.value or []:
                _clean(item, key, days, patient_pseudonym, keep_characteristics)
        elif vr == "PN":
            del dataset[tag]  # any other person name
        elif vr in ("DA", "DT"):
            values = element.value if element.VM > 1 else [element.value]
            shifted = [_shift_date(str(v), days) if v not in (None, "") else v for v in values]
            if any(v is None for v in shifted):
                del dataset[tag]
            else:
                element.value = shifted if element.VM > 1 else shifted[0]
        elif vr == "UI" and element.value not in (None, ""):
            values = element.value if element.VM > 1 else [element.value]
            new = [str(v) if _is_registered_uid(str(v)) else remap_uid(str(v), key) for v in values]
            element.value = new if element.VM > 1 else new[0]


def deidentify(ds, *, key: bytes | str | None = None, keep_patient_characteristics: bool = False):
    """Return a de-identified copy of a pydicom Dataset (the input is not modified).

    Basic profile subset: patient name/ID -> pseudonym; birth date/time, other IDs and names,
    addresses, accession, study ID, institution, all physicians/operators and any other person name,
    station, device serial, detector/plate IDs, descriptions and comments removed; private tags and
    overlay (60xx) / curve (50xx) groups removed; sex/age/size/weight removed unless
    ``keep_patient_characteristics``; all dates moved back by a per-patient offset; all instance UIDs
    remapped (registered UIDs such as SOP classes kept). Sets PatientIdentityRemoved=YES,
    DeidentificationMethod and its code sequence. Pixel data are untouched: check
    ``BurnedInAnnotation`` (kept) for text burned into the image.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    secret = _key_bytes(key)
    out = copy.deepcopy(ds)
    days = date_shift_days(ds, secret)
    patient_pseudonym = pseudonym(_patient_ref(ds), secret)
    if "PatientName" not in out:
        out.PatientName = patient_pseudonym
    if "PatientID" not in out:
        out.PatientID = patient_pseudonym
    _clean(out, secret, days, patient_pseudonym, keep_patient_characteristics)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for keyword in ("MediaStorageSOPInstanceUID",):
            if meta.get(keyword):
                setattr(meta, keyword, remap_uid(str(meta.get(keyword)), secret))
        if "SourceApplicationEntityTitle" in meta:
            del meta.SourceApplicationEntityTitle
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEID_METHOD
    codes = [("113100", "Basic Application Confidentiality Profile"),
             ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")]
    if keep_patient_characteristics:
        codes.append(("113108", "Retain Patient Characteristics Option"))
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(items)
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    return out


def safe_metadata(ds, key: bytes | str | None = None) -> dict:
    """Fields of a DICOM dataset that are safe to show, store and export (no names, no real IDs, no dates).

    Ids are pseudonyms (same key -> same value), so images of one patient/study can still be grouped.
    """
    secret = _key_bytes(key)

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value in (None, ""):
            return None
        return " ".join(str(value).split())[:64]

    meta: dict = {"format": "DICOM"}
    for field, keyword in (
        ("dicom_modality", "Modality"), ("body_part", "BodyPartExamined"), ("view_position", "ViewPosition"),
        ("laterality", "ImageLaterality"), ("photometric", "PhotometricInterpretation"),
        ("manufacturer", "Manufacturer"), ("model", "ManufacturerModelName"),
    ):
        value = text(keyword)
        if value is not None:
            meta[field] = value
    if "laterality" not in meta and text("Laterality"):
        meta["laterality"] = text("Laterality")
    for field, keyword in (("rows", "Rows"), ("columns", "Columns"), ("frames", "NumberOfFrames"), ("bits_stored", "BitsStored")):
        try:
            meta[field] = int(ds.get(keyword)) if ds.get(keyword) not in (None, "") else (1 if field == "frames" else None)
        except (TypeError, ValueError):
            meta[field] = None
    try:
        ts = ds.file_meta.TransferSyntaxUID
        meta["transfer_syntax"] = ts.name
    except Exception:
        pass
    try:
        meta["sop_class"] = ds.SOPClassUID.name
    except Exception:
        pass
    # A file we de-identified already carries the pseudonyms: report them as they are, so the
    # original and its stored de-identified copy give the same ids.
    ours = str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and ds.get("DeidentificationMethod") == DEID_METHOD
    meta["pseudo_patient_id"] = str(ds.PatientID) if ours and ds.get("PatientID") else pseudonym(_patient_ref(ds), secret)
    for field, keyword in (("pseudo_study_uid", "StudyInstanceUID"), ("pseudo_series_uid", "SeriesInstanceUID"), ("pseudo_sop_uid", "SOPInstanceUID")):
        if ds.get(keyword):
            meta[field] = str(ds.get(keyword)) if ours else remap_uid(str(ds.get(keyword)), secret)
    meta["burned_in_annotation"] = str(ds.get("BurnedInAnnotation", "") or "").upper() or None
    return {k: v for k, v in meta.items() if v is not None}


# PNG chunks that carry only rendering information; everything else ancillary (tEXt, zTXt, iTXt,
# eXIf, tIME, private chunks) may hold names, dates or device ids and is dropped.
_PNG_KEEP = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs",
             b"bKGD", b"acTL", b"fcTL", b"fdAT"}


def _strip_png(data: bytes, name: str) -> bytes:
    import struct

    out, pos = [data[:8]], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ImageLoadError(name, "truncated PNG chunk")
        if kind in _PNG_KEEP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(out)


def _strip_jpeg(data: bytes, name: str) -> bytes:
    """Drop APP1..APP13, APP15 (EXIF, XMP, maker notes, ...) and COM; keep APP0 (JFIF), APP2 ICC
    profiles and APP14 (Adobe colour transform), which decoding needs."""
    from .jpeg import SOS, JpegStructureError, segments

    out = [b"\xff\xd8"]
    try:
        for segment in segments(data):
            marker, pos = segment.marker, segment.start
            if marker == SOS:  # start of scan: the rest is entropy-coded data, kept byte for byte
                out.append(data[pos:])
                return b"".join(out)
            icc = marker == 0xE2 and data[pos + 4 : pos + 16] == b"ICC_PROFILE\x00"  # colour, not identity
            if icc or not (0xE1 <= marker <= 0xED or marker in (0xEF, 0xFE)):
                out.append(data[pos:segment.end])
    except JpegStructureError as exc:
        raise ImageLoadError(name, str(exc)) from None
    raise AssertionError("segments() ends at SOS or raises")  # pragma: no cover


def _rewrite_tiff(data: bytes, name: str) -> bytes:
    """Re-write every page's pixels losslessly without descriptive tags (Artist, DateTime, HostComputer...)."""
    import tifffile

    from .source import max_pixels_default

    cap = max_pixels_default()
    buffer = io.BytesIO()
    with tifffile.TiffFile(io.BytesIO(data)) as tif, tifffile.TiffWriter(buffer) as writer:
        for page in tif.pages:
            if int(page.imagewidth) * int(page.imagelength) * int(page.imagedepth or 1) > cap or int(page.samplesperpixel or 1) > 4:
                raise ImageLoadError(name, f"TIFF page too large or unsupported ({page.imagewidth}x{page.imagelength})")
            arr = page.asarray()
            photometric = page.photometric
            kwargs = {"colormap": page.colormap} if page.colormap is not None else {}
            writer.write(arr, photometric=photometric, planarconfig=page.planarconfig, **kwargs)
    return buffer.getvalue()


def deidentified_bytes(source, *, name: str | None = None, key: bytes | str | None = None,
                       keep_patient_characteristics: bool = False) -> bytes:
    """The bytes to store for an imported file, without identifying metadata.

    DICOM: :func:`deidentify` then re-encoded in the same transfer syntax (pixel data untouched).
    PNG: text/EXIF/time chunks dropped. JPEG: EXIF/XMP/comment segments dropped (scan data kept
    byte for byte). TIFF: pages re-written losslessly without descriptive tags. Unreadable input
    raises :class:`ImageLoadError`. The result decodes to the same pixels as the input.
    """
    from .raster import sniff
    from .source import read_source

    data, label = read_source(source, name)
    kind = sniff(data)
    try:
        with warnings.catch_warnings(), quiet_logs("pydicom", "tifffile"):
            warnings.simplefilter("ignore")
            return _deidentified_bytes(data, label, kind, key, keep_patient_characteristics)
    except ImageLoadError:
        raise
    except BaseException as exc:
        if not is_decoder_failure(exc):
            raise
        raise ImageLoadError(label, f"cannot write a de-identified copy ({_one_line(exc, 150)})") from None


def _deidentified_bytes(data: bytes, label: str, kind: str | None, key, keep_patient_characteristics: bool) -> bytes:
    import pydicom

    from .dicom import read_dataset
    from .raster import describe_unknown

    if kind == "png":
        return _strip_png(data, label)
    if kind == "jpeg":
        return _strip_jpeg(data, label)
    if kind == "tiff":
        return _rewrite_tiff(data, label)
    if kind != "dicom":
        raise ImageLoadError(label, describe_unknown(data))
    ds = read_dataset(data, label)
    clean = deidentify(ds, key=key, keep_patient_characteristics=keep_patient_characteristics)
    meta = clean.file_meta
    if "SOPClassUID" in clean and "MediaStorageSOPClassUID" not in meta:
        meta.MediaStorageSOPClassUID = clean.SOPClassUID
    if "SOPInstanceUID" in clean:
        meta.MediaStorageSOPInstanceUID = clean.SOPInstanceUID
    buffer = io.BytesIO()
    try:  # a proper Part 10 file (preamble + meta) even when the import lacked them
        pydicom.dcmwrite(buffer, clean, enforce_file_format=True)
    except (ValueError, AttributeError, KeyError):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, clean, enforce_file_format=False)
    return buffer.getvalue()
