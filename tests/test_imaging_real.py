"""Real public images (../shared/data/real): every folder loads; boxes and masks line up with pixels."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from softcam_core.imaging import detect_fundus_circle, load_image, preprocess

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
IDRID_DEFAULT = ("0001.jpg", "0437.jpg")  # two in the default run; all 24 under -m slow


def test_every_folder_loads_with_expected_shape_and_modality(real_data):
    expected = {
        "cxr_rsna_png/images": ("*.png", (1024, 1024), "cxr"),
        "cxr_tbx11k_nih": ("**/*.png", (512, 512), "cxr"),
        "fundus_kaggle_dr/images": ("*.png", (512, 512, 3), "fundus"),
        "oct_bonn_drusen/bscans": ("*.tif", (496, 512), "oct"),
    }
    for folder, (pattern, shape, modality) in expected.items():
        files = sorted((real_data / folder).glob(pattern))
        assert files, folder
        for path in files:
            image = load_image(path)
            assert image.pixels.shape == shape, path
            assert image.modality == modality, path
            assert image.pixels.dtype == np.uint8 and image.pixels.std() > 5, path


@pytest.mark.parametrize("name", IDRID_DEFAULT)
def test_idrid_fundus_circle_and_yolo_boxes(real_data, name):
    _check_idrid(real_data, name)


@pytest.mark.slow
def test_all_idrid_images(real_data):
    for path in sorted((real_data / "fundus_idrid/images").glob("*.jpg")):
        _check_idrid(real_data, path.name)


def _check_idrid(real_data, name):
    path = real_data / "fundus_idrid/images" / name
    image = load_image(path)
    h, w = image.pixels.shape[:2]
    assert (h, w) == (2848, 4288) and image.modality == "fundus"
    cx, cy, r = detect_fundus_circle(image.pixels)
    # centred near the middle; IDRiD's disc is taller than the photo (clipped top and bottom)
    assert abs(cx - w / 2) < 0.08 * w and abs(cy - h / 2) < 0.05 * h
    assert 0.5 * h < r < 0.45 * w
    boxes = []
    for line in path.with_suffix(".txt").read_text().split("\n"):
        if line.strip():
            _, bx, by, bw, bh = (float(v) for v in line.split())
            boxes.append([(bx - bw / 2) * w, (by - bh / 2) * h, (bx + bw / 2) * w, (by + bh / 2) * h])
    boxes = np.array(boxes)
    centres = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    assert np.all(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy) < r), "YOLO box centre outside the retina"
    x, geometry = preprocess(image, 128, **IDENTITY)
    mapped = geometry.boxes_to_input(boxes)
    assert np.all(mapped >= 0) and np.all(mapped <= 128)
    # a box drawn on the original covers the same input pixels as its mapped box
    box = boxes[0]
    mask = np.zeros((h, w), bool)
    mask[int(np.ceil(box[1])) : int(box[3]), int(np.ceil(box[0])) : int(box[2])] = True
    lit = np.argwhere(geometry.mask_to_input(mask))
    mx0, my0, mx1, my1 = mapped[0]
    assert lit[:, 1].min() >= np.floor(mx0) - 1 and lit[:, 1].max() <= np.ceil(mx1) and lit[:, 0].min() >= np.floor(my0) - 1


def test_kaggle_circle_detection(real_data):
    for path in sorted((real_data / "fundus_kaggle_dr/images").glob("*.png")):
        found = detect_fundus_circle(load_image(path).pixels)
        assert found is not None, path.name
        cx, cy, r = found
        assert abs(cx - 256) < 8 and abs(cy - 256) < 8 and 240 < r < 270, (path.name, found)


def test_kaggle_lesion_points_fall_on_retina(real_data):
    rows = list(csv.DictReader(open(real_data / "fundus_kaggle_dr/labels/annotation_task_outcome.csv")))
    points = [(float(r["x"]), float(r["y"])) for r in rows if r["filename"] == "26127_right"]
    assert points
    image = load_image(real_data / "fundus_kaggle_dr/images/26127_right.png")
    cx, cy, r = detect_fundus_circle(image.pixels)
    assert all(np.hypot(x - cx, y - cy) < r for x, y in points)


def test_oct_drusen_masks_and_boxes_line_up(real_data):
    root = real_data / "oct_bonn_drusen"
    boxes: dict[str, list] = {}
    for row in csv.DictReader(open(root / "derived_drusen_boxes.csv")):
        boxes.setdefault(row["bscan"], []).append([int(row[k]) for k in ("x0", "y0", "x1", "y1")])
    checked = 0
    for scan in sorted(root.glob("bscans/*-Input.tif")):
        stem = scan.name.split("-")[0]
        image = load_image(scan)
        mask = np.asarray(Image.open(root / "derived_drusen_masks" / f"{stem}-drusen-derived.png")) > 0
        assert mask.shape == image.pixels.shape  # H x W of the B-scan
        for x0, y0, x1, y1 in boxes.get(stem, []):  # inclusive corners around mask pixels
            assert mask[y0 : y1 + 1, x0 : x1 + 1].any()
            assert 0 <= x0 <= x1 < image.width and 0 <= y0 <= y1 < image.height
        if mask.any() and checked < 3:
            # paint the mask onto the scan: the painted input pixels are exactly the mapped mask
            painted = np.where(mask, 255, 0).astype(np.uint8)
            image.pixels = painted
            x, geometry = preprocess(image, 224, **IDENTITY)
            np.testing.assert_array_equal(x[0].numpy() >= 0.5, geometry.mask_to_input(mask))
            assert geometry.method == "letterbox" and geometry.y0 == -8
            checked += 1
    assert checked == 3


def test_rsna_boxes_inside_frame(real_data):
    root = real_data / "cxr_rsna_png"
    for row in csv.DictReader(open(root / "stage_2_train_labels.csv")):
        path = root / "images" / f"{row['patientId']}.png"
        if not path.exists() or row["Target"] != "1":
            continue
        x, y, bw, bh = (float(row[k]) for k in ("x", "y", "width", "height"))
        assert 0 <= x and 0 <= y and x + bw <= 1024 and y + bh <= 1024


def test_tbx11k_boxes_inside_frame(real_data):
    root = real_data / "cxr_tbx11k_nih/tbx11k_test_data"
    data = json.load(open(root / "annotations/json/TBX11K_train.json"))
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        meta = images[ann["image_id"]]
        path = root / "imgs" / meta["file_name"]
        if not path.exists():
            continue
        image = load_image(path)
        assert (image.height, image.width) == (meta["height"], meta["width"])
        x, y, bw, bh = ann["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= image.width and y + bh <= image.height
