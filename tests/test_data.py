"""Cohort folders: reading synth output and plain folders back, the dataset, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softcam_core.data import CohortDataset, CohortError, CohortFolder, order_classes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_round_trip_of_a_synth_cohort(synth_cohort):
    root = synth_cohort("fundus", artifact_rate=0.5)
    folder = CohortFolder(root)
    meta = json.loads((root / "synth_meta.json").read_text())
    assert folder.classes == ["healthy", "diseased"]  # the "no disease" class is index 0
    assert folder.modality == "fundus"
    assert len(folder.records) == 24 and folder.splits == ["train", "val", "test"]
    assert sorted(r.stem for s in ("train", "val", "test") for r in folder.split(s)) == sorted(r.stem for r in folder.records)
    assert folder.split("all") == folder.records
    for record in folder.records:
        info = meta["images"][record.path.name]
        assert record.path == root / "images" / record.path.name and record.path.is_file()
        assert record.stem == record.path.stem and record.label == info["label"] and record.split == info["split"]
        assert folder.classes[record.label_index] == record.label
        mask = folder.mask(record.stem)
        assert mask.dtype == bool and mask.shape == (128, 128)
        assert np.array_equal(mask, np.asarray(Image.open(root / "masks" / f"{record.stem}.png")) > 0)
        boxes = folder.boxes(record.stem)
        assert boxes.dtype == np.float64 and boxes.shape == (len(info["lesions"]), 4)
        expected = sorted(tuple(lesion["box"]) for lesion in info["lesions"])
        assert sorted(map(tuple, boxes.tolist())) == expected
        assert sorted(folder.box_labels(record.stem)) == sorted(lesion["kind"] for lesion in info["lesions"])
        if record.label == "diseased":
            exudates = folder.boxes(record.stem, label="hard_exudate")
            assert len(exudates) == info["lesion_counts"]["hard_exudate"]


def test_grade_classes_keep_their_order(synth_cohort):
    folder = CohortFolder(synth_cohort("oct", n=12, grades=True))
    assert folder.classes == ["grade0", "grade1", "grade2"]
    assert [folder.classes.index(r.label) for r in folder.records] == [r.label_index for r in folder.records]


def test_class_order_rule():
    assert order_classes(["diseased", "healthy", "diseased"]) == ["healthy", "diseased"]
    assert order_classes(["grade10", "grade2", "grade0", "grade1"]) == ["grade0", "grade1", "grade2", "grade10"]
    assert order_classes(["pneumonia", "Normal", "covid"]) == ["Normal", "covid", "pneumonia"]
    assert order_classes(["b", "a"]) == ["a", "b"]


def test_data_hash_is_stable_and_content_sensitive(synth_cohort, tmp_path):
    root = synth_cohort("cxr")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    digest = CohortFolder(root).data_hash()
    assert len(digest) == 64 and CohortFolder(copy).data_hash() == digest  # not tied to the location
    labels = (copy / "labels.csv").read_text().splitlines()
    name, label, split = labels[1].split(",")
    labels[1] = ",".join([name, "healthy" if label == "diseased" else "diseased", split])
    (copy / "labels.csv").write_text("\n".join(labels) + "\n")
    assert CohortFolder(copy).data_hash() != digest
    shutil.copytree(root, tmp_path / "copy2")
    image = tmp_path / "copy2" / "images" / "cxr_0003.dcm"
    data = bytearray(image.read_bytes())
    data[-1] ^= 1  # one pixel bit
    image.write_bytes(bytes(data))
    assert CohortFolder(tmp_path / "copy2").data_hash() != digest


@pytest.mark.parametrize("modality", ["fundus", "oct", "cxr"])
def test_dataset_serves_the_one_preprocessing_path(modality, synth_cohort):
    from softcam_core.imaging import load_image, preprocess

    root = synth_cohort(modality)
    folder = CohortFolder(root)
    dataset = CohortDataset(folder, "train", 48, MEAN, STD)
    assert len(dataset) == len(folder.split("train")) and dataset.classes == folder.classes
    x, y = dataset[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and isinstance(y, int)
    record = folder.split("train")[0]
    expected, _ = preprocess(load_image(record.path, modality=modality), 48, MEAN, STD)
    assert torch.equal(x, expected) and y == record.label_index
    assert dataset.targets == [r.label_index for r in folder.split("train")]
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch_x.shape == (4, 3, 48, 48) and batch_y.tolist() == dataset.targets[:4]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_applies_augment_to_a_copy(synth_cohort):
    root = synth_cohort("fundus")
    calls = []

    def flip(x):
        calls.append(x.shape)
        return torch.flip(x, dims=[2])

    plain = CohortDataset(root, "all", 32, MEAN, STD)
    augmented = CohortDataset(root, "all", 32, MEAN, STD, augment=flip)
    assert len(augmented) == 24
    first, _ = augmented[0]
    again, _ = augmented[0]  # cached input is not altered by the augmentation
    assert torch.equal(first, again) and torch.equal(first, torch.flip(plain[0][0], dims=[2]))
    assert calls == [(3, 32, 32), (3, 32, 32)]


def _plain_folder(root: Path, header: str, rows: list[str], images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    (root / "images").mkdir(parents=True)
    for k, name in enumerate(images):
        Image.fromarray(np.full((20, 30), 40 * (k + 1), dtype=np.uint8)).save(root / "images" / name)
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_plain_folder_without_split_annotations_or_masks(tmp_path):
    root = _plain_folder(tmp_path / "plain", "image,label,reader", ["a.png,pneumonia,r1", "images/b.png,normal,r2"])
    folder = CohortFolder(root)
    assert folder.classes == ["normal", "pneumonia"] and folder.modality is None
    assert [r.split for r in folder.records] == ["", ""] and folder.split("train") == []
    assert len(folder.split("all")) == 2
    assert folder.mask("a") is None and folder.boxes("a").shape == (0, 4)
    x, y = CohortDataset(folder, "all", 16, MEAN, STD, modality="other")[1]
    assert x.shape == (3, 16, 16) and y == 0


def _one_line_error(root, match: str) -> str:
    with pytest.raises(CohortError) as info:
        CohortFolder(root)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def test_clear_errors_for_bad_folders(tmp_path):
    message = _one_line_error(tmp_path / "nowhere", "not a folder")
    assert "nowhere" in message
    (tmp_path / "empty").mkdir()
    assert "labels.csv" in _one_line_error(tmp_path / "empty", "missing")

    bad_columns = _plain_folder(tmp_path / "cols", "file,diagnosis,split", ["a.png,x,train"])
    message = _one_line_error(bad_columns, "missing column(s) image, label")
    assert "labels.csv" in message

    missing_file = _plain_folder(tmp_path / "miss", "image,label,split", ["a.png,x,train", "c.png,y,test"])
    message = _one_line_error(missing_file, "line 3: image file c.png not found")
    assert "labels.csv" in message

    _one_line_error(_plain_folder(tmp_path / "nolabel", "image,label", ["a.png,", "b.png,y"]), "line 2: empty label")
    _one_line_error(_plain_folder(tmp_path / "short", "image,label,split", ["a.png,x"]), "line 2: expected 3 fields")
    _one_line_error(_plain_folder(tmp_path / "dup", "image,label", ["a.png,x", "images/a.png,y"]), "same stem")
    _one_line_error(_plain_folder(tmp_path / "none", "image,label", []), "no images listed")

    folder = CohortFolder(_plain_folder(tmp_path / "ok", "image,label,split", ["a.png,x,train", "b.png,y,test"]))
    with pytest.raises(CohortError, match="no split named 'tst'"):
        folder.split("tst")
    with pytest.raises(CohortError, match="no image with stem 'zzz'"):
        folder.mask("zzz")
    (tmp_path / "ok" / "annotations.json").write_text("{not json")
    with pytest.raises(CohortError, match=r"annotations\.json: not valid JSON"):
        folder.boxes("a")


def test_broken_coco_names_the_file_and_the_element(synth_cohort, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(synth_cohort("oct"), copy)
    coco = json.loads((copy / "annotations.json").read_text())
    coco["annotations"][0]["bbox"] = [1, 2, -3, 4]
    (copy / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(CohortError, match=r"annotations\.json: annotations\[0\].*negative width"):
        CohortFolder(copy).boxes("oct_0000")
