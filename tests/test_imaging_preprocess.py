"""preprocess / Geometry: the one path from MedicalImage to model input, and back for display."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softcam_core.imaging import Geometry, MedicalImage, detect_fundus_circle, preprocess
from tests.plugins.imaging import synthetic_fundus

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _image(pixels, modality):
    return MedicalImage(pixels=pixels, modality=modality, name="t.png")


def _disc_mask(h, w, cx, cy, r):
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.hypot(xx - cx, yy - cy) <= r


def test_letterbox_pads_never_crops_and_keeps_aspect():
    h, w = 50, 100  # OCT-like landscape B-scan
    pixels = np.full((h, w), 200, np.uint8)
    x, geometry = preprocess(_image(pixels, "oct"), 40, **IDENTITY)
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    assert (geometry.x0, geometry.y0, geometry.side, geometry.method) == (0, -25, 100, "letterbox")
    # rows 0..9 and 30..39 are padding (0), rows 10..29 the image (200/255); all three channels equal
    band = x[0].numpy()
    assert np.allclose(band[:9], 0) and np.allclose(band[31:], 0) and np.allclose(band[11:29], 200 / 255)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # the whole image width is kept: the first and last columns are image pixels
    assert band[20, 0] == pytest.approx(200 / 255) and band[20, -1] == pytest.approx(200 / 255)


def test_normalisation_per_channel():
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 0, 51
    x, _ = preprocess(_image(pixels, "other"), 8, mean=(0.5, 0.0, 0.2), std=(0.5, 1.0, 0.1))
    assert torch.allclose(x[:, 4, 4], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("shape, modality", [((60, 90), "oct"), ((90, 60), "cxr"), ((64, 64), "cxr")])
def test_mask_on_original_lands_on_same_input_pixels(shape, modality):
    h, w = shape
    mask = np.zeros(shape, bool)
    mask[10:30, 20:45] = True
    mask |= _disc_mask(h, w, w * 0.6, h * 0.7, 9)
    # an image whose bright pixels are exactly the mask: after preprocessing, the bright input pixels
    # must be exactly the mapped mask
    x, geometry = preprocess(_image(mask.astype(np.uint8) * 255, modality), 32, **IDENTITY)
    bright = x[0].numpy() >= 0.5
    mapped = geometry.mask_to_input(mask)
    np.testing.assert_array_equal(bright, mapped)
    assert mapped.sum() > 0


def test_boxes_map_with_the_pixels():
    h, w = 60, 120
    geometry_image = np.zeros((h, w), np.uint8)
    geometry_image[20:40, 30:90] = 255  # box (30, 20, 90, 40) exclusive end
    x, geometry = preprocess(_image(geometry_image, "oct"), 60, **IDENTITY)
    # side 120 -> scale 0.5, y offset -30: box -> (15, 25, 45, 35)
    np.testing.assert_allclose(geometry.boxes_to_input([[30, 20, 90, 40]]), [[15, 25, 45, 35]])
    lit = np.argwhere(x[0].numpy() > 0.5)
    assert lit[:, 0].min() == 25 and lit[:, 0].max() == 34 and lit[:, 1].min() == 15 and lit[:, 1].max() == 44
    np.testing.assert_allclose(geometry.boxes_to_image(geometry.boxes_to_input([[30, 20, 90, 40]])), [[30, 20, 90, 40]])


def test_fundus_crop_to_circle_and_masks_follow():
    h, w, cx, cy, r = 150, 220, 118.0, 77.0, 70.0
    photo = synthetic_fundus(h, w, cx, cy, r)
    found = detect_fundus_circle(photo)
    assert found is not None
    assert abs(found[0] - cx) < 2 and abs(found[1] - cy) < 2 and abs(found[2] - r) < 2
    image = _image(photo, "fundus")
    x, geometry = preprocess(image, 64, **IDENTITY)
    assert geometry.method == "fundus_crop" and abs(geometry.side - 140) <= 3
    # the disc fills the input: its centre maps to the input centre
    centre = geometry.points_to_input([[cx, cy]])[0]
    assert np.allclose(centre, [32, 32], atol=1.5)
    lesion = _disc_mask(h, w, 100, 60, 8)
    marked = photo.copy()
    marked[lesion] = 255
    marked[~lesion] = 0
    # pixels painted on the photo go through the photo's geometry exactly as the mask does
    resampled = geometry.resample(marked[..., 0]) / 255.0 >= 0.5
    np.testing.assert_array_equal(resampled, geometry.mask_to_input(lesion))


def test_fundus_clipped_top_and_bottom_like_idrid():
    h, w, cx, cy, r = 140, 210, 105.0, 70.0, 84.0  # disc taller than the photo
    found = detect_fundus_circle(synthetic_fundus(h, w, cx, cy, r))
    assert found is not None and abs(found[2] - r) < 2.5 and abs(found[1] - cy) < 2.5
    _, geometry = preprocess(_image(synthetic_fundus(h, w, cx, cy, r), "fundus"), 32, **IDENTITY)
    assert geometry.y0 < 0  # the square extends above the photo: padded, not squeezed


def test_fundus_without_circle_falls_back_to_letterbox():
    flat = np.full((40, 60, 3), 120, np.uint8)
    _, geometry = preprocess(_image(flat, "fundus"), 16, **IDENTITY)
    assert geometry.method == "letterbox" and detect_fundus_circle(flat) is None


def test_map_to_image_back_projects():
    geometry = Geometry(height=50, width=100, x0=0, y0=-25, side=100, size=20, method="letterbox")
    saliency = np.zeros((20, 20), np.float32)
    saliency[5:15, 10:20] = 1.0  # right half of the image band
    back = geometry.map_to_image(saliency)
    assert back.shape == (50, 100) and back.dtype == np.float32
    assert back[25, 75] == pytest.approx(1.0) and back[25, 25] == pytest.approx(0.0)
    # round trip of a smooth map through resample is close to identity
    smooth = np.outer(np.linspace(0, 1, 50), np.linspace(0, 1, 100)).astype(np.float32)
    g = Geometry(height=50, width=100, x0=0, y0=-25, side=100, size=100, method="letterbox")
    np.testing.assert_allclose(g.map_to_image(g.resample(smooth)), smooth, atol=1e-6)


def test_bad_arguments():
    image = _image(np.zeros((8, 8), np.uint8), "cxr")
    with pytest.raises(ValueError):
        preprocess(image, 0, **IDENTITY)
    with pytest.raises(ValueError):
        preprocess(image, 8, mean=(0, 0), std=(1, 1))
    with pytest.raises(ValueError):
        preprocess(image, 8, mean=0.5, std=0.0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(h=st.integers(4, 90), w=st.integers(4, 90), size=st.integers(4, 48), data=st.data())
def test_property_painted_mask_equals_mapped_mask_and_box(h, w, size, data):
    modality = data.draw(st.sampled_from(["oct", "cxr", "other"]))
    x0 = data.draw(st.integers(0, w - 1))
    y0 = data.draw(st.integers(0, h - 1))
    x1 = data.draw(st.integers(x0 + 1, w))
    y1 = data.draw(st.integers(y0 + 1, h))
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    x, geometry = preprocess(_image(mask.astype(np.uint8) * 255, modality), size, **IDENTITY)
    mapped = geometry.mask_to_input(mask)
    np.testing.assert_array_equal(x[0].numpy() >= 0.5, mapped)
    bx0, by0, bx1, by1 = geometry.boxes_to_input([[x0, y0, x1, y1]])[0]
    lit = np.argwhere(mapped)
    if lit.size:  # every mapped mask pixel lies within the mapped box (pixel-edge coordinates)
        assert lit[:, 1].min() >= np.floor(bx0) and lit[:, 1].max() + 1 <= np.ceil(bx1)
        assert lit[:, 0].min() >= np.floor(by0) and lit[:, 0].max() + 1 <= np.ceil(by1)
    back = geometry.map_to_image(x[0].numpy())
    assert back.shape == (h, w)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from softcam_core.imaging import load_image

    photo = np.zeros((20, 40, 3), np.uint8)
    photo[:, :10] = (255, 0, 0)  # red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(photo).save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path, modality="other")
    assert image.pixels.shape == (40, 20, 3) and image.flags["exif_orientation_applied"] == 6
    assert image.pixels[:10, :, 0].mean() > 200 and image.pixels[-10:, :, 0].mean() < 50  # left band -> top
