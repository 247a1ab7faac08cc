"""softcam_core.imaging: decoding PNG/JPEG/TIFF/DICOM, windowing, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from softcam_core.imaging import ImageLoadError, MedicalImage, Window, load_image, sniff, window
from tests.plugins.imaging import cr_monochrome1_path, make_dicom_bytes, pydicom_file


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


# --- window(): DICOM PS3.3 C.11.2.1.2 pinned on hand-computed values -------------------------------


def test_window_linear_hand_computed():
    # c=40, w=400: ramp from c-0.5-(w-1)/2 = -160 (exclusive) to c-0.5+(w-1)/2 = 239
    x = np.array([-1000, -160, 0, 39.5, 100, 239, 240], dtype=np.float32)
    # 0 -> ((0 - 39.5)/399 + 0.5)*255 = 102.26; 39.5 -> 127.5 -> 128 (half to even); 100 -> 166.17
    assert window(x, 40, 400).tolist() == [0, 0, 102, 128, 166, 255, 255]
    assert window(x, 40, 400, invert=True).tolist() == [255, 255, 153, 127, 89, 0, 0]
    assert window(x, 40, 400).dtype == np.uint8


def test_window_width_one_is_a_threshold_at_c_minus_half():
    x = np.array([-0.6, -0.5, -0.4, 3.0])
    assert window(x, 0, 1).tolist() == [0, 0, 255, 255]


def test_window_linear_exact_and_sigmoid():
    x = np.array([-5.0, 0.0, 1.0, 5.0, 6.0])
    # LINEAR_EXACT c=0, w=10: ((x - 0)/10 + 0.5)*255 -> 0, 127.5->128, 153, 255 (x <= c + w/2), 255
    assert window(x, 0, 10, function="LINEAR_EXACT").tolist() == [0, 128, 153, 255, 255]
    # SIGMOID c=0, w=4: 255/(1+exp(-x)) -> 1.71, 127.5, 186.4, 253.3, 254.4
    assert window(x, 0, 4, function="SIGMOID").tolist() == [2, 128, 186, 253, 254]


@pytest.mark.parametrize("width, function", [(0.5, "LINEAR"), (0, "LINEAR_EXACT"), (-1, "SIGMOID")])
def test_window_rejects_invalid_width(width, function):
    with pytest.raises(ValueError):
        window(np.zeros(3), 0, width, function=function)


# --- raster formats --------------------------------------------------------------------------------


def test_png_grey_and_rgb_roundtrip():
    grey = np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    img = load_image(_png(grey), name="g.png")
    assert isinstance(img, MedicalImage) and img.pixels.dtype == np.uint8
    np.testing.assert_array_equal(img.pixels, grey)
    assert img.raw is None and img.name == "g.png"
    rgb = np.dstack([grey, 255 - grey, np.full_like(grey, 7)])
    img = load_image(_png(rgb), name="c.png")
    np.testing.assert_array_equal(img.pixels, rgb)


def test_rgb_file_with_grey_content_becomes_grey():
    grey = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    img = load_image(_png(np.dstack([grey] * 3)), name="x.png")
    assert img.pixels.shape == (32, 32) and img.flags["grey_stored_as_rgb"]
    np.testing.assert_array_equal(img.pixels, grey)
    marked = np.dstack([grey] * 3)
    marked[5:8, 5:8] = (255, 0, 0)  # a small red marker keeps the image in colour
    assert load_image(_png(marked), name="m.png").pixels.shape == (32, 32, 3)


def test_png_16bit_grey_keeps_raw_and_auto_windows():
    arr = (np.linspace(0, 4095, 40 * 30).reshape(30, 40)).astype(np.uint16)  # 12-bit data in 16-bit PNG
    img = load_image(_png(arr), name="xr16.png")
    np.testing.assert_array_equal(img.raw, arr.astype(np.float32))
    assert img.windows[0].name == "auto" and img.pixels.dtype == np.uint8
    assert img.pixels.min() == 0 and img.pixels.max() == 255
    assert np.all(np.diff(img.pixels.astype(int), axis=1) >= 0)  # monotone ramp stays monotone


def test_jpeg_loads_and_modality_is_inferred_for_fundus(tmp_path):
    from tests.plugins.imaging import synthetic_fundus

    photo = synthetic_fundus(120, 160, 80, 60, 55)
    path = tmp_path / "eye.jpg"
    Image.fromarray(photo).save(path, quality=90)
    img = load_image(path)
    assert img.modality == "fundus" and img.pixels.shape == (120, 160, 3) and img.name == "eye.jpg"


def test_tiff_16bit_rgb_and_multipage(tmp_path):
    import tifffile

    rgb16 = (np.random.default_rng(0).integers(0, 65535, (20, 30, 3))).astype(np.uint16)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb")
    img = load_image(path)
    np.testing.assert_array_equal(img.pixels, np.rint(rgb16 / 257.0).astype(np.uint8))

    pages = [np.full((10, 12), v, np.uint8) for v in (10, 120, 240)]
    multi = tmp_path / "stack.tif"
    with tifffile.TiffWriter(multi) as tw:
        for p in pages:
            tw.write(p)
    assert load_image(multi, frame=2).pixels[0, 0] == 240
    assert load_image(multi).pixels[0, 0] == 10
    with pytest.raises(ImageLoadError, match=r"^stack\.tif: frame 3 out of range \(file has 3 pages\)$"):
        load_image(multi, frame=3)


def test_grey_landscape_is_oct_and_square_is_cxr():
    assert load_image(_png(np.full((50, 80), 40, np.uint8))).modality == "oct"
    assert load_image(_png(np.full((64, 64), 120, np.uint8))).modality == "cxr"
    assert load_image(_png(np.full((64, 64), 120, np.uint8)), modality="other").modality == "other"


# --- DICOM -----------------------------------------------------------------------------------------


def test_cr_monochrome1_rescale_and_window():
    import pydicom

    path = cr_monochrome1_path()
    ds = pydicom.dcmread(path)
    img = load_image(path)
    stored = ds.pixel_array.astype(np.float64)
    expected_raw = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(img.raw, expected_raw, rtol=1e-6)
    assert img.flags["monochrome1"] and img.modality == "cxr"
    first = img.windows[0]
    assert (first.center, first.width) == (float(ds.WindowCenter), float(ds.WindowWidth))
    # MONOCHROME1: high values are dark -> display = 255 - window
    np.testing.assert_array_equal(img.pixels, 255 - window(expected_raw, first.center, first.width))
    assert img.spacing == (0.1, 0.1) and img.spacing_source == "ImagerPixelSpacing"
    assert "Doe" not in repr(img.metadata) and str(ds.PatientID) not in repr(img.metadata)


def test_dicom_windows_named_from_explanation_and_presets():
    arr = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10
    data = make_dicom_bytes(arr, WindowCenter=[500, 300], WindowWidth=[1000, 200],
                            WindowCenterWidthExplanation=["NORMAL", "HARD"], RescaleSlope=2, RescaleIntercept=-100,
                            PixelSpacing=[0.2, 0.3], ImagerPixelSpacing=[0.25, 0.25])
    img = load_image(data, name="w.dcm")
    names = [w.name for w in img.windows]
    assert names[:2] == ["NORMAL", "HARD"] and "auto" in names
    np.testing.assert_allclose(img.raw, arr * 2.0 - 100)
    np.testing.assert_array_equal(img.pixels, window(arr * 2.0 - 100, 500, 1000))
    np.testing.assert_array_equal(img.rewindow(img.windows[1]), window(arr * 2.0 - 100, 300, 200))
    assert img.spacing == (0.2, 0.3) and img.spacing_source == "PixelSpacing"


def test_dicom_without_window_gets_auto_window_and_ct_gets_hu_presets():
    arr = (np.arange(400, dtype=np.uint16).reshape(20, 20))
    img = load_image(make_dicom_bytes(arr), name="a.dcm")
    assert img.windows[0].name == "auto"
    assert img.pixels.min() == 0 and img.pixels.max() == 255
    ct = load_image(pydicom_file("CT_small.dcm"))
    assert {"lung", "mediastinum", "bone"} <= {w.name for w in ct.windows}


def test_dicom_modality_inference():
    arr = np.zeros((8, 8), np.uint8)
    assert load_image(make_dicom_bytes(arr, Modality="CR")).modality == "cxr"
    assert load_image(make_dicom_bytes(arr, Modality="SC", BodyPartExamined="CHEST")).modality == "cxr"
    assert load_image(make_dicom_bytes(arr, Modality="SC", BodyPartExamined="HAND")).modality == "other"
    assert load_image(make_dicom_bytes(arr, Modality="OPT")).modality == "oct"


def test_dicom_multiframe_picks_frame():
    frames = np.stack([np.full((6, 7), v, np.uint8) for v in (10, 20, 30)])
    data = make_dicom_bytes(frames[0], NumberOfFrames=3, Rows=6, Columns=7)
    # replace pixel data with all three frames
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = frames.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    img = load_image(buf.getvalue(), name="mf.dcm", frame=2)
    assert img.raw[0, 0] == 30
    with pytest.raises(ImageLoadError, match=r"^mf\.dcm: frame 5 out of range \(file has 3 frames\)$"):
        load_image(buf.getvalue(), name="mf.dcm", frame=5)


def test_burned_in_annotation_flag():
    img = load_image(make_dicom_bytes(np.zeros((4, 4), np.uint8), BurnedInAnnotation="YES"))
    assert img.flags["burned_in_annotation"] is True


@pytest.mark.parametrize(
    "name, shape",
    [("JPGExtended.dcm", (1024, 256)),  # 12-bit JPEG extended (process 4)
     ("MR_small_RLE.dcm", (64, 64)), ("MR_small_jp2klossless.dcm", (64, 64)),
     ("MR_small_jpeg_ls_lossless.dcm", (64, 64)), ("693_J2KI.dcm", (512, 512)),
     ("SC_rgb_jpeg_dcmtk.dcm", (100, 100, 3)), ("SC_rgb_rle.dcm", (100, 100, 3)),
     ("examples_palette.dcm", (350, 800, 3))],
)
def test_compressed_transfer_syntaxes_decode(name, shape):
    img = load_image(pydicom_file(name))
    assert img.pixels.shape == shape and img.pixels.dtype == np.uint8
    assert img.pixels.std() > 1  # real content, not a blank frame


def test_compressed_variants_match_uncompressed_mr():
    reference = load_image(pydicom_file("MR_small.dcm"))
    for variant in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(load_image(pydicom_file(variant)).raw, reference.raw)


def test_12bit_jpeg_with_nonconformant_scan_header_is_repaired_like_ijg_viewers():
    # JPEG-lossy.dcm: 12-bit JPEG extended whose sequential scan says Se=0; pylibjpeg refuses it,
    # IJG-based viewers only warn. After repair it matches JPGExtended.dcm (same image) exactly.
    lossy = load_image(pydicom_file("JPEG-lossy.dcm"))
    assert lossy.flags["jpeg_scan_header_repaired"] and lossy.flags["lossy_compressed"]
    np.testing.assert_array_equal(lossy.raw, load_image(pydicom_file("JPGExtended.dcm")).raw)


def test_corrupt_jpeg_stream_names_the_transfer_syntax():
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(pydicom_file("JPGExtended.dcm"))
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([stream[:2] + bytes(200) + stream[-2:]])  # SOI, garbage, EOI
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageLoadError, match=r"^cut\.dcm: cannot decode pixel data \(transfer syntax JPEG Extended"):
        load_image(buf.getvalue(), name="cut.dcm")


def test_unsupported_transfer_syntax_is_named():
    data = make_dicom_bytes(np.zeros((4, 4), np.uint8))
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 20])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageLoadError, match=r"^v\.dcm: unsupported transfer syntax MPEG2"):
        load_image(buf.getvalue(), name="v.dcm")


# --- bad input ------------------------------------------------------------------------------------


def _one_line_error(source, name="bad.png", **kw) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, name=name, **kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name}: ")
    assert isinstance(info.value, ValueError)
    return message


def test_bad_inputs_give_one_line_errors(tmp_path):
    png = _png(np.zeros((16, 16), np.uint8))
    assert "empty file" in _one_line_error(b"")
    assert "corrupt or truncated PNG" in _one_line_error(png[: len(png) // 2])
    flipped = bytearray(png)
    flipped[png.index(b"IDAT") + 8] ^= 0xFF  # CRC no longer matches
    assert "corrupt or truncated PNG" in _one_line_error(bytes(flipped))
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(jpeg, format="JPEG")
    assert "corrupt or truncated JPEG" in _one_line_error(jpeg.getvalue()[:40], name="x.jpg")
    assert "text file" in _one_line_error(b"patient,label\n1,2\n", name="x.png")
    assert "PDF" in _one_line_error(b"%PDF-1.4 ...", name="scan.jpg")
    assert "file not found" in _one_line_error(tmp_path / "missing.png", name="missing.png")
    no_pixels = make_dicom_bytes(np.zeros((4, 4), np.uint8))
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(no_pixels))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    assert "no pixel data" in _one_line_error(buf.getvalue(), name="np.dcm")
    assert "no pixel data" in _one_line_error(pydicom_file("rtplan.dcm"), name="rtplan.dcm")


def test_wrong_extension_is_decided_by_content(tmp_path):
    path = tmp_path / "really_a_png.dcm"
    path.write_bytes(_png(np.full((8, 8), 9, np.uint8)))
    assert load_image(path).pixels[0, 0] == 9
    dcm = tmp_path / "really_dicom.jpg"
    dcm.write_bytes(make_dicom_bytes(np.full((8, 8), 3, np.uint8)))
    assert load_image(dcm).metadata["format"] == "DICOM"


def test_decompression_bomb_is_refused_before_decoding():
    # a valid 20000 x 20000 PNG (400 MP) compresses to a few hundred KB
    import zlib, struct

    width = height = 20000
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(64)))  # only the first rows
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    message = _one_line_error(png, name="bomb.png")
    assert "too large" in message and "20000x20000" in message
    small = _png(np.zeros((100, 100), np.uint8))
    assert "too large" in _one_line_error(small, name="s.png", max_pixels=5000)
    dicom = make_dicom_bytes(np.zeros((100, 100), np.uint8))
    assert "too large" in _one_line_error(dicom, name="s.dcm", max_pixels=5000)
    # a header that claims 60,000 frames of 4096 x 4096 (a terabyte) is refused before any decoding,
    # though its pixel data hold only one small frame
    cine = make_dicom_bytes(np.zeros((4, 4), np.uint8), NumberOfFrames=60000)
    cine = cine.replace(b"\x28\x00\x10\x00US\x02\x00\x04\x00", b"\x28\x00\x10\x00US\x02\x00\x00\x10")  # Rows 4096
    cine = cine.replace(b"\x28\x00\x11\x00US\x02\x00\x04\x00", b"\x28\x00\x11\x00US\x02\x00\x00\x10")  # Columns 4096
    message = _one_line_error(cine, name="cine.dcm")
    assert "too large" in message and "60000 frames" in message and "before decoding" in message


def test_sniff():
    assert sniff(_png(np.zeros((2, 2), np.uint8))) == "png"
    assert sniff(make_dicom_bytes(np.zeros((2, 2), np.uint8))) == "dicom"
    assert sniff(b"hello") is None


def test_window_dataclass_defaults():
    assert Window(1.0, 2.0, "x").function == "LINEAR"


def test_modality_lut_sequence_and_voi_lut_sequence():
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.array([[0, 1], [2, 3]], np.uint16)
    data = make_dicom_bytes(stored)
    ds = pydicom.dcmread(io.BytesIO(data))
    modality_lut = Dataset()
    modality_lut.LUTDescriptor = [4, 0, 16]  # 4 entries, first stored value 0, 16-bit output
    modality_lut.ModalityLUTType = "US"
    modality_lut.add_new(0x00283006, "US", [100, 200, 300, 400])  # LUTData (VR US or OW)
    ds.ModalityLUTSequence = Sequence([modality_lut])
    voi = Dataset()
    voi.LUTDescriptor = [301, 100, 16]  # input 100..400, 16-bit words holding 12-bit values
    voi.LUTExplanation = "SOFT LUT"
    voi.add_new(0x00283006, "US", [int(round(v)) for v in np.linspace(4095, 0, 301)])  # an inverting LUT
    ds.VOILUTSequence = Sequence([voi])
    buf = io.BytesIO()
    ds.save_as(buf)
    img = load_image(buf.getvalue(), name="lut.dcm")
    np.testing.assert_array_equal(img.raw, [[100, 200], [300, 400]])
    expected = np.array(voi.LUTData)[np.array([[0, 100], [200, 300]])]  # 4095, 2730, 1365, 0
    np.testing.assert_array_equal(img.pixels, np.rint(expected * 255 / 4095).astype(np.uint8))
    assert img.pixels.tolist() == [[255, 170], [85, 0]]
    assert img.flags["voi_lut"] == "SOFT LUT"


def test_rust_decoder_panic_becomes_image_load_error():
    # pylibjpeg-rle panics (a BaseException) on a replicate run overflowing its segment
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(pydicom_file("MR_small_RLE.dcm"))
    stream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    stream[64] = 0x81  # first header byte of segment 1: "repeat the next byte 128 times"
    ds.PixelData = encapsulate([bytes(stream)])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageLoadError, match=r"^rle\.dcm: cannot decode pixel data \(transfer syntax RLE Lossless"):
        load_image(buf.getvalue(), name="rle.dcm")


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_cxr_presets_follow_displayed_brightness(photometric):
    raw = np.arange(1000, dtype=np.uint16).reshape(25, 40)
    img = load_image(make_dicom_bytes(raw, Modality="DX", PhotometricInterpretation=photometric), name="cxr.dcm")
    presets = {w.name: w for w in img.windows}
    assert {"lung", "mediastinum", "bone"} <= set(presets)
    lung = img.rewindow(presets["lung"])
    bone = img.rewindow(presets["bone"])
    shown = img.pixels.astype(int)
    dark, bright = shown <= np.percentile(shown, 20), shown >= np.percentile(shown, 80)
    # lung window spreads the dark pixels and saturates the bright ones; bone the other way round
    assert lung[dark].std() > bone[dark].std() and (lung[bright] == 255).all()
    assert bone[bright].std() > lung[bright].std() and (bone[dark] == 0).all()


def test_enhanced_multiframe_oct_uses_functional_groups():
    # an OPT-like enhanced multi-frame object: spacing, rescale and window live in functional groups
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    frames = np.stack([np.full((6, 10), v, np.uint16) for v in (100, 200)])
    frames[1, 0, 0] = 0
    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(frames[0], Modality="OPT", BodyPartExamined="EYE")))
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    measures, transform, voi = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [0.0039, 0.0114]
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -10, "US"
    voi.WindowCenter, voi.WindowWidth, voi.WindowCenterWidthExplanation = 300, 200, "RETINA"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = [Dataset(), Dataset()]
    second = Dataset()
    second.PixelSpacing = [0.005, 0.012]
    per_frame[1].PixelMeasuresSequence = Sequence([second])  # frame 1 overrides the shared spacing
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    buf = io.BytesIO()
    ds.save_as(buf)
    first = load_image(buf.getvalue(), name="oct.dcm", frame=0)
    assert first.modality == "oct" and first.spacing == (0.0039, 0.0114) and first.spacing_source == "PixelSpacing"
    assert first.raw[0, 0] == 190.0 and first.windows[0].name == "RETINA"
    np.testing.assert_array_equal(first.pixels, window(first.raw, 300, 200))
    other = load_image(buf.getvalue(), name="oct.dcm", frame=1)
    assert other.spacing == (0.005, 0.012) and other.raw[0, 1] == 390.0 and other.raw[0, 0] == -10.0


def test_tiff_variants(tmp_path):
    import tifffile

    ramp16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", ramp16, photometric="minisblack", compression="zlib")
    img = load_image(tmp_path / "g16.tif")
    np.testing.assert_array_equal(img.raw, ramp16)
    assert img.flags["high_bit_depth"] and img.pixels.max() == 255 and img.pixels.min() == 0

    floats = np.linspace(-1.0, 1.0, 200, dtype=np.float32).reshape(10, 20)
    tifffile.imwrite(tmp_path / "f.tif", floats)
    assert load_image(tmp_path / "f.tif").raw.dtype == np.float32

    white_is_zero = np.full((8, 8), 10, np.uint8)
    tifffile.imwrite(tmp_path / "mw.tif", white_is_zero, photometric="miniswhite")
    assert load_image(tmp_path / "mw.tif").pixels[0, 0] == 245

    palette = np.zeros((3, 256), np.uint16)
    palette[0, 1] = 65535  # index 1 -> red
    indices = np.ones((6, 6), np.uint8)
    tifffile.imwrite(tmp_path / "pal.tif", indices, photometric="palette", colormap=palette)
    assert load_image(tmp_path / "pal.tif").pixels[0, 0].tolist() == [255, 0, 0]


def test_jpeg_segments_walk_the_marker_structure_by_hand():
    from softcam_core.imaging.jpeg import JpegStructureError, segments

    # SOI, APP0 (length 4), fill byte, RST0 (standalone), SOF0 (length 11: 8 bit, 3 x 5 px), SOS, scan data
    data = (b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff" + b"\xff\xd0"
            + b"\xff\xc0\x00\x0b\x08\x00\x03\x00\x05\x01\x01\x11\x00" + b"\xff\xda\x00\x04\x01\x00" + b"\x12\x34")
    found = [(s.marker, s.start, s.end) for s in segments(data)]
    assert found == [(0xE0, 2, 8), (0xD0, 9, 11), (0xC0, 11, 24), (0xDA, 24, 30)]
    assert [s.is_frame_header for s in segments(data)] == [False, False, True, False]
    from softcam_core.imaging.raster import peek_size

    assert peek_size(data, "jpeg") == (5, 3)
    for broken, reason in ((data[:20], "truncated"), (data[:8] + b"\x00" + data[8:], "corrupt"),
                           (data[:24], "without image scan")):
        with pytest.raises(JpegStructureError, match=reason):
            list(segments(broken))
        assert peek_size(broken, "jpeg") in (None, (5, 3))
