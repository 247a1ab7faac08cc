"""Synthetic cohorts: determinism, layout, exact ground truth, balance, DICOM, artifact, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from softcam_core import synth
from softcam_core.cli import main as cli_main

MODALITIES = synth.MODALITIES


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _pixels(path: Path) -> np.ndarray:
    if path.suffix == ".dcm":
        return pydicom.dcmread(path).pixel_array
    return np.asarray(Image.open(path))


def _mask(root: Path, stem: str) -> np.ndarray:
    return np.asarray(Image.open(root / "masks" / f"{stem}.png"))


def _coco_boxes(root: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """file name -> [(category name, (x0, y0, x1, y1))] from annotations.json."""
    coco = json.loads((root / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out: dict[str, list] = {name: [] for name in files.values()}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        out[files[ann["image_id"]]].append((names[ann["category_id"]], (x, y, x + w, y + h)))
    return out


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_arguments_give_byte_identical_files(modality, tmp_path):
    kwargs = dict(size=64, artifact_rate=0.5)
    first = synth.make_cohort(modality, 10, 7, tmp_path / "a", **kwargs)
    second = synth.make_cohort(modality, 10, 7, tmp_path / "b", **kwargs)
    digest_a, digest_b = _tree_digest(first), _tree_digest(second)
    assert len(digest_a) == 10 + 10 + 3  # images, masks, labels.csv + annotations.json + synth_meta.json
    assert digest_a == digest_b
    other_seed = synth.make_cohort(modality, 10, 8, tmp_path / "c", **kwargs)
    changed = [k for k, v in _tree_digest(other_seed).items() if k.startswith("images/") and digest_a.get(k) != v]
    assert len(changed) == 10  # a different seed gives different images


@pytest.mark.parametrize("modality", MODALITIES)
def test_layout_labels_csv_and_coco(modality, synth_cohort):
    root = synth_cohort(modality)
    with open(root / "labels.csv", newline="") as handle:
        assert handle.readline().strip() == "image,label,split"
    rows = _read_labels(root)
    assert len(rows) == 24
    suffix = ".dcm" if modality == "cxr" else ".png"
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(r["image"] for r in rows)
    assert all(r["image"].endswith(suffix) for r in rows)
    assert {r["label"] for r in rows} == {"healthy", "diseased"}
    assert {r["split"] for r in rows} == {"train", "val", "test"}

    coco = json.loads((root / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(synth.LESION_KINDS[modality])
    by_name = {im["file_name"]: im for im in coco["images"]}
    assert set(by_name) == {r["image"] for r in rows}
    expected_shape = synth.image_shape(modality, 128)
    for row in rows:
        pixels = _pixels(root / "images" / row["image"])
        stem = Path(row["image"]).stem
        mask = _mask(root, stem)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert pixels.shape[:2] == mask.shape == expected_shape
        assert (by_name[row["image"]]["height"], by_name[row["image"]]["width"]) == expected_shape
    sample = _pixels(root / "images" / rows[0]["image"])
    if modality == "fundus":
        assert sample.ndim == 3 and sample.shape[2] == 3 and sample.dtype == np.uint8
    elif modality == "oct":
        assert sample.ndim == 2 and sample.dtype == np.uint8
        assert expected_shape == (124, 128)  # W x round(0.97 W), the Spectralis 512 x 496 aspect
    else:
        assert sample.dtype == np.uint16 and sample.max() <= 4095


@pytest.mark.parametrize("modality", MODALITIES)
def test_boxes_line_up_with_masks(modality, synth_cohort):
    root = synth_cohort(modality, n=20, artifact_rate=0.6)
    boxes = _coco_boxes(root)
    meta = json.loads((root / "synth_meta.json").read_text())
    for row in _read_labels(root):
        mask = _mask(root, Path(row["image"]).stem) > 0
        found = boxes[row["image"]]
        if row["label"] == "healthy":
            assert not mask.any() and not found
            continue
        assert len(found) >= 2, "diseased images carry several lesions"
        covered = np.zeros_like(mask)
        for _, (x0, y0, x1, y1) in found:
            assert x0 == int(x0) and y1 == int(y1)
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
            inside = mask[y0:y1, x0:x1]
            # tight: every edge row and column of the box holds a lesion pixel
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert not (mask & ~covered).any(), "union of boxes covers the mask"
        # learnable at a 128 px input: at least two lesions span >= 3 % of the image side
        sides = sorted(max(x1 - x0, y1 - y0) for _, (x0, y0, x1, y1) in found)
        assert sides[-2] >= 0.03 * 128
        areas = sorted(lesion["area"] for lesion in meta["images"][row["image"]]["lesions"])
        assert sum(areas) == int(mask.sum()), "lesions do not overlap each other"


@pytest.mark.parametrize("modality", ["fundus", "cxr"])
def test_masks_are_the_pixels_the_lesions_changed(modality):
    for index in range(3):
        with_lesions = synth.render_image(modality, 128, 5, index, "diseased")
        without = synth.render_image(modality, 128, 5, index, "diseased", draw_lesions=False)
        mask = with_lesions.mask()
        assert mask.any()
        diff = np.abs(with_lesions.pixels.astype(np.int32) - without.pixels.astype(np.int32))
        if diff.ndim == 3:
            diff = diff.max(axis=2)
        # the lesions change nothing outside the mask but their one-pixel anti-aliased rim (where an
        # irregular edge may leave a faint, <= 2 grey level, tail)
        assert not (diff > 2)[~ndimage.binary_dilation(mask)].any()
        assert (diff > 0)[~ndimage.binary_dilation(mask)].sum() <= 3
        # and visibly change (nearly) every mask pixel
        threshold = 6 if modality == "fundus" else 20
        assert (diff[mask] >= threshold).mean() > 0.97
        assert np.array_equal(without.mask(), mask)  # same lesion plan either way


def test_oct_drusen_lift_the_rpe_inside_the_mask():
    with_lesions = synth.render_image("oct", 128, 3, 1, "diseased")
    without = synth.render_image("oct", 128, 3, 1, "diseased", draw_lesions=False)
    mask = with_lesions.mask()
    assert mask.any()
    diff = np.abs(with_lesions.pixels.astype(int) - without.pixels.astype(int))
    druse_columns = mask.any(axis=0)
    # changes stay in the drusen's columns (the retina above them rides up)
    assert not diff[:, ~ndimage.binary_dilation(druse_columns, iterations=2)].any()
    for lesion in with_lesions.lesions:
        x0, y0, x1, y1 = (int(v) for v in lesion.box)
        # the mask spans from the lifted RPE down to the normal RPE line: the top rows of each column
        # become bright RPE where the healthy eye had dark photoreceptor layers
        top_rows = [int(np.flatnonzero(lesion.mask[:, x])[0]) for x in range(x0, x1) if lesion.mask[:, x].sum() >= 4]
        gained = [with_lesions.pixels[y, x].astype(int) - without.pixels[y, x].astype(int) for y, x in zip(top_rows, range(x0, x1))]
        assert top_rows and np.mean(gained) > 20


def test_labels_balanced_and_every_split_holds_every_class():
    rng = np.random.default_rng(0)
    for classes in (synth.BINARY_CLASSES, synth.GRADE_CLASSES):
        for n in range(10, 60):
            labels, splits = synth.assign_labels_and_splits(n, classes, (0.6, 0.2, 0.2), rng)
            counts = Counter(labels)
            assert max(counts.values()) - min(counts.values()) <= 1
            if n >= 3 * len(classes):
                for split in synth.SPLITS:
                    assert {lab for lab, s in zip(labels, splits) if s == split} == set(classes), (n, split)
            train = sum(s == "train" for s in splits)
            assert abs(train - 0.6 * n) <= len(classes) + 1


def test_grades_follow_lesion_load(synth_cohort):
    root = synth_cohort("fundus", n=30, grades=True)
    meta = json.loads((root / "synth_meta.json").read_text())
    assert meta["classes"] == ["grade0", "grade1", "grade2"]
    load = {}
    for info in meta["images"].values():
        load.setdefault(info["label"], []).append(sum(info["lesion_counts"].values()))
    assert sorted(load) == ["grade0", "grade1", "grade2"] and all(len(v) == 10 for v in load.values())
    assert max(load["grade0"]) == 0
    assert min(load["grade1"]) >= 2 and max(load["grade1"]) < min(load["grade2"])


def test_cxr_dicom_has_fake_identifiers_and_display_fields(synth_cohort):
    root = synth_cohort("cxr", n=20, artifact_rate=0.6)
    meta = json.loads((root / "synth_meta.json").read_text())
    for row in _read_labels(root):
        ds = pydicom.dcmread(root / "images" / row["image"])
        assert str(ds.PatientName).startswith("SYNTH^PATIENT^")
        assert ds.PatientID and ds.PatientBirthDate and ds.InstitutionName and ds.AccessionNumber
        assert ds.Modality == "DX" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == ("MONOCHROME2", 16, 12, 11)
        assert float(ds.RescaleSlope) == synth.CXR_RESCALE_SLOPE and float(ds.RescaleIntercept) == synth.CXR_RESCALE_INTERCEPT
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == pytest.approx(synth.cxr_window(), abs=0.1)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([430 / 128] * 2, rel=1e-5)
        has_artifact = meta["images"][row["image"]]["artifact"] is not None
        assert ds.BurnedInAnnotation == ("YES" if has_artifact else "NO")
        assert not has_artifact or row["label"] == "diseased"
        assert ds.pixel_array.shape == (128, 128) and int(ds.pixel_array.max()) <= 4095
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in (root / "images").iterdir()}
    assert len(uids) == 20


def test_cxr_reads_back_through_the_imaging_loader(synth_cohort):
    from softcam_core.imaging import load_image

    root = synth_cohort("cxr")
    image = load_image(root / "images" / "cxr_0000.dcm")
    assert image.modality == "cxr" and image.pixels.shape == (128, 128) and image.pixels.dtype == np.uint8
    assert image.spacing == pytest.approx((430 / 128, 430 / 128), rel=1e-5)
    # the default window shows lungs dark and the mediastinum bright, nothing blown out
    assert image.pixels[64, 20:40].mean() < image.pixels[64, 60:68].mean()
    assert np.percentile(image.pixels, 99) > 170 and (image.pixels == 255).mean() < 0.01
    assert "SYNTH" not in json.dumps(image.metadata, default=str)


@pytest.mark.parametrize("modality", MODALITIES)
def test_artifact_marks_only_diseased_images_and_avoids_lesions(modality, synth_cohort):
    from softcam_core.imaging import load_image, preprocess

    root = synth_cohort(modality, n=20, artifact_rate=0.6)
    meta = json.loads((root / "synth_meta.json").read_text())
    boxes = _coco_boxes(root)
    tagged = [name for name, info in meta["images"].items() if info["artifact"]]
    diseased = [name for name, info in meta["images"].items() if info["label"] == "diseased"]
    assert set(tagged) <= set(diseased) and len(tagged) == round(0.6 * len(diseased))
    for name in tagged:
        x0, y0, x1, y1 = (int(v) for v in meta["images"][name]["artifact"]["box"])
        stem = Path(name).stem
        assert not _mask(root, stem)[y0:y1, x0:x1].any()
        for _, (bx0, by0, bx1, by1) in boxes[name]:
            assert bx1 <= x0 or x1 <= bx0 or by1 <= y0 or y1 <= by0
        image = load_image(root / "images" / name)
        grey = image.pixels if image.pixels.ndim == 2 else image.pixels.mean(axis=2)
        assert grey[y0:y1, x0:x1].max() >= 220  # a bright tag
        # the model sees it: the artifact lies inside the square preprocess maps to the input
        _, geometry = preprocess(image, 64, (0.5,) * 3, (0.25,) * 3)
        assert geometry.x0 <= x0 and geometry.y0 <= y0 and x1 <= geometry.x0 + geometry.side and y1 <= geometry.y0 + geometry.side
    untagged_pixels = [name for name in meta["images"] if name not in tagged]
    assert untagged_pixels


def test_fundus_looks_like_a_fundus():
    rendered = synth.render_image("fundus", 256, 0, 0, "healthy")
    rgb = rendered.pixels.astype(float)
    assert rgb[:8, :8].max() == 0 and rgb[-8:, -8:].max() == 0  # black surround
    centre = rgb[96:160, 96:160].reshape(-1, 3).mean(axis=0)
    assert centre[0] > centre[1] > centre[2]  # orange-red retina
    brightest = np.unravel_index(np.argmax(rgb.sum(axis=2)), rgb.shape[:2])
    assert abs(brightest[1] - 128) > 30  # the optic disc sits off-centre, left or right
    assert rgb[brightest][2] < rgb[brightest][0]  # yellowish, not white


def test_cli_synth_writes_a_cohort_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "cohort"
    code = cli_main(["synth", "--modality", "oct", "--n", "12", "--seed", "3", "--out", str(out), "--size", "64", "--grades"])
    assert code == 0
    assert "wrote 12 oct images" in capsys.readouterr().out
    assert {r["label"] for r in _read_labels(out)} == {"grade0", "grade1", "grade2"}
    # rerunning into an earlier cohort replaces it
    assert cli_main(["synth", "--modality", "oct", "--n", "10", "--seed", "3", "--out", str(out), "--size", "64"]) == 0
    assert len(list((out / "images").iterdir())) == 10
    capsys.readouterr()

    assert cli_main(["synth", "--modality", "cxr", "--n", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--n must be a positive number" in err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    assert cli_main(["synth", "--modality", "cxr", "--n", "4", "--out", str(occupied)]) == 2
    assert str(occupied) in capsys.readouterr().err and (occupied / "notes.txt").exists()
    assert cli_main(["synth", "--modality", "fundus", "--n", "4", "--artifact-rate", "1.5", "--out", str(tmp_path / "y")]) == 2
    assert "--artifact-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["synth", "--modality", "mri", "--n", "4", "--out", str(tmp_path / "z")])


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_two_hundred_images_render_quickly(modality, tmp_path):
    import time

    start = time.process_time()
    synth.make_cohort(modality, 200, 0, tmp_path / modality, size=256)
    assert time.process_time() - start < 20


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_cohort_is_learnable_by_a_resnet18_from_scratch(modality, tmp_path):
    """The demo models rely on it: 300 images (180 to train), 128 px input, 10 epochs of the paper's
    SGD recipe from random weights. Measured on an H200 (60 test images each): baseline / SoftCAM
    (l1 0.01) test accuracy fundus 0.98 / 1.00, OCT 1.00 / 1.00, CXR 0.93 / 0.97."""
    from softcam_core.training import train

    root = synth.make_cohort(modality, 300, 1, tmp_path / "cohort")
    result = train(root, tmp_path / "model.pt", arch="resnet18", head="baseline", epochs=10, img_size=128,
                   batch_size=16, seed=0, show_progress=False)
    assert result.meta["metrics"]["test"]["accuracy"] >= 0.9
