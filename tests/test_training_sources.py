"""`softcam train` on the data a researcher brings: a folder of images with a label CSV, an
ImageFolder tree and a labelled database cohort; the split it assigns is stratified, seeded and
saved, so evaluation scores the held-out images.

Runs on the 15 real EyePACS photos of ``../shared/data/real`` (11 with DR, 4 without, Kaggle grades).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from softcam_core.cli import main
from softcam_core.data import CohortError, CohortFolder, ImageFolderTree, open_cohort, write_splits
from softcam_core.labels import read_label_rows, stratified_splits
from softcam_core.models import load_checkpoint

KAGGLE = "fundus_kaggle_dr"
GRADES = f"{KAGGLE}/labels/softcam_kaggle_gradable_test__subset.csv"
FAST = ["--arch", "resnet18", "--epochs", "1", "--img-size", "32", "--batch-size", "4", "--no-augment"]


def onset(real_data: Path) -> dict[str, str]:
    """The Kaggle grades as DR onset, the documented mapping: grade 0 -> healthy, 1-4 -> diseased."""
    table = pd.read_csv(real_data / GRADES)
    return {row.image: ("diseased" if row.level > 0 else "healthy") for row in table.itertuples()}


def image_folder_tree(real_data: Path, root: Path, splits: dict[str, str] | None = None) -> Path:
    """The real photos linked into ``root/[split/]<class>/<file>``."""
    for stem, label in onset(real_data).items():
        folder = root / splits[stem] / label if splits else root / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.png").symlink_to((real_data / KAGGLE / "images" / f"{stem}.png").resolve())
    return root


def read_splits(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as handle:
        return {Path(row["image"]).stem: (row["label"], row["split"]) for row in csv.DictReader(handle)}


def test_stratified_splits_pins():
    # 11 diseased and 4 healthy at 0.6/0.2/0.2: round(2.2) = 2 val and test of the 11, and at least one
    # of each for the 4 (round(0.8) = 1)
    labels = ["d"] * 11 + ["h"] * 4
    splits = stratified_splits(labels, (0.6, 0.2, 0.2), seed=3)
    assert Counter(zip(labels, splits)) == {("d", "train"): 7, ("d", "val"): 2, ("d", "test"): 2,
                                            ("h", "train"): 2, ("h", "val"): 1, ("h", "test"): 1}
    assert splits == stratified_splits(labels, (0.6, 0.2, 0.2), seed=3)
    assert splits != stratified_splits(labels, (0.6, 0.2, 0.2), seed=4)
    assert stratified_splits(["a", "a"], (0.5, 0.25, 0.25)) == ["train", "train"]  # < 3: round(0.5) = 0 each
    assert stratified_splits(["a"] * 4, (1, 0, 0)) == ["train"] * 4
    with pytest.raises(ValueError, match="summing to 1"):
        stratified_splits(["a"], (0.5, 0.2, 0.2))


def test_label_file_layouts_and_split_column(tmp_path):
    layout, column, rows = read_label_rows("image,level\na,0\nb,3\nc,5\n", classes=("no_dr", "dr"))
    assert (layout, column) == ("kaggle_dr", "image")
    assert [(r.ref, r.label) for r in rows] == [("a", "no_dr"), ("b", "dr"), ("c", None)]
    assert "level '5' is not one of 0, 1, 2, 3, 4" in rows[2].problem
    _, _, rows = read_label_rows("patientId,Target\np1,0\np1,0\np2,1\np3,1\np3,0\n")
    assert [(r.ref, r.label) for r in rows if not r.problem] == [("p1", "healthy"), ("p2", "diseased"), ("p3", "diseased")]
    assert "'p3' is labelled '1' on line 5 and '0' here" in rows[-1].problem
    _, _, rows = read_label_rows("image,label,split\na,x,train\nb,y,tset\n")
    assert rows[0].split == "train" and "split 'tset' is not one of train, val, test" in rows[1].problem


def test_folder_with_kaggle_labels_trains_on_an_assigned_stratified_split(real_data, tmp_path, capsys):
    truth = onset(real_data)
    out = tmp_path / "kaggle.pt"
    code = main(["train", "--data", str(real_data / KAGGLE), "--labels", str(real_data / GRADES),
                 "--split-fractions", "0.6,0.2,0.2", "--split-seed", "1", "--modality", "fundus", *FAST,
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "assigned a stratified split" in printed and "--split test" in printed
    _, meta = load_checkpoint(out)
    assert meta["classes"] == ["healthy", "diseased"] and meta["modality"] == "fundus"
    assert meta["splits"]["assigned"] == {"fractions": [0.6, 0.2, 0.2], "seed": 1}
    assert meta["splits"]["counts"] == {"train": 9, "val": 3, "test": 3}
    assert "labels" in meta["data"] and str((real_data / GRADES).resolve()) in meta["data"]
    # the split written beside the checkpoint is stratified, labelled as the grades say, and is the
    # one evaluation reads back
    saved = read_splits(tmp_path / "kaggle.splits.csv")
    assert {stem: label for stem, (label, _) in saved.items()} == truth
    assert Counter(saved.values()) == {("diseased", "train"): 7, ("diseased", "val"): 2, ("diseased", "test"): 2,
                                       ("healthy", "train"): 2, ("healthy", "val"): 1, ("healthy", "test"): 1}
    again = CohortFolder(real_data / KAGGLE, tmp_path / "kaggle.splits.csv")
    assert [(r.stem, r.split) for r in again.records] == [(stem, split) for stem, (_, split) in saved.items()]
    assert again.splits_assigned is None and again.data_hash() == meta["data_hash"]

    code = main(["evaluate", "--model", str(out), "--data", str(real_data / KAGGLE), "--labels",
                 str(tmp_path / "kaggle.splits.csv"), "--split", "test", "--methods", "softcam", "--metrics",
                 "deletion", "--steps", "4", "--no-figures", "--target", "label", "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr()
    scored = pd.read_csv(tmp_path / "eval" / "per_image.csv", dtype={"image": str})
    assert sorted(scored["image"]) == sorted(s for s, (_, split) in saved.items() if split == "test")
    assert set(scored["split"]) == {"test"}


def test_image_folder_tree_with_and_without_split_folders(real_data, tmp_path, capsys):
    truth = onset(real_data)
    flat = image_folder_tree(real_data, tmp_path / "flat")
    tree = open_cohort(flat)
    assert isinstance(tree, ImageFolderTree) and tree.classes == ["healthy", "diseased"]
    assert {Path(r.stem).name: r.label for r in tree.records} == truth
    assert {r.split for r in tree.records} == {""}
    code = main(["train", "--data", str(flat), "--modality", "fundus", *FAST, "--out", str(tmp_path / "flat.pt")])
    assert code == 0, capsys.readouterr()
    _, meta = load_checkpoint(tmp_path / "flat.pt")
    assert meta["splits"]["assigned"]["seed"] == 0 and "ImageFolder" in meta["data"]
    saved = read_splits(tmp_path / "flat.splits.csv")
    assert {stem: label for stem, (label, _) in saved.items()} == truth
    # default 0.7/0.15/0.15: 11 diseased -> round(1.65) = 2 val, 2 test; 4 healthy -> round(0.6) = 1, 1
    assert Counter(split for _, split in saved.values()) == {"train": 9, "val": 3, "test": 3}

    # root/<split>/<class>/<file>: the tree's own split is kept, nothing is assigned
    chosen = {stem: split for stem, (_, split) in saved.items()}
    split_tree = image_folder_tree(real_data, tmp_path / "split", chosen)
    code = main(["train", "--data", str(split_tree), "--modality", "fundus", *FAST, "--out", str(tmp_path / "split.pt")])
    assert code == 0, capsys.readouterr()
    _, meta = load_checkpoint(tmp_path / "split.pt")
    assert meta["splits"]["assigned"] is None
    assert {stem: split for stem, (_, split) in read_splits(tmp_path / "split.splits.csv").items()} == chosen


def test_bad_training_sources_get_one_clear_error(real_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "healthy").mkdir(parents=True)
    (empty / "healthy" / "notes.txt").write_text("no image here")
    with pytest.raises(CohortError, match="no images found"):
        open_cohort(empty)
    mixed = image_folder_tree(real_data, tmp_path / "mixed", {s: "train" for s in onset(real_data)})
    (mixed / "extra").mkdir()
    with pytest.raises(CohortError, match="mixes split folders"):
        open_cohort(mixed)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,level\n650_left,0\nnot_there,1\n5139_left,7\n")
    with pytest.raises(CohortError) as info:
        open_cohort(real_data / KAGGLE, bad)
    message = str(info.value)
    assert "2 row(s) not usable" in message and "line 3: image file not_there not found" in message
    assert "line 4: level '7' is not one of 0, 1, 2, 3, 4" in message and "\n" not in message
    half = tmp_path / "half.csv"
    half.write_text("image,label,split\n650_left,healthy,train\n5139_left,diseased,\n")
    with pytest.raises(CohortError, match="1 of 2 images have no split"):
        open_cohort(real_data / KAGGLE, half, assign_splits=((0.7, 0.15, 0.15), 0))
    code = main(["train", "--data", str(real_data / KAGGLE), "--labels", str(real_data / GRADES),
                 "--split-fractions", "0.5,0.5", *FAST, "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "split fractions must be three non-negative numbers" in err
    assert not (tmp_path / "x.pt").exists()
    code = main(["train", "--data", str(real_data / KAGGLE), "--label-col", "level", *FAST, "--out", str(tmp_path / "y.pt")])
    assert code == 2 and "need a label file" in capsys.readouterr().err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_database_cohort_trains_on_its_saved_split_and_evaluates_the_held_out_images(real_data, db_env, tmp_path, capsys):
    from db import repository
    from db.session import session_scope

    with session_scope(db_env) as session:
        repository.import_images(session, [real_data / KAGGLE / "images"], "kaggle")
    assert main(["images", "label", "--cohort", "kaggle", "--labels", str(real_data / GRADES)]) == 0
    # one image left unlabelled: training leaves it out and says so
    with session_scope(db_env) as session:
        cohort = repository.get_cohort(session, "kaggle")
        resolver = repository.CohortResolver(session, cohort)
        repository.set_image_label(session, repository.get_image(session, resolver("650_left").key), None)
    capsys.readouterr()
    out = tmp_path / "db.pt"
    code = main(["train", "--cohort", "kaggle", "--split-fractions", "0.6,0.2,0.2", "--modality", "fundus", *FAST,
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "14 labelled images, 1 unlabeled left out" in printed
    assert "assigned a stratified split to 14 image(s)" in printed and "saved with the cohort" in printed
    _, meta = load_checkpoint(out)
    assert meta["data"] == "database cohort 'kaggle'" and meta["classes"] == ["healthy", "diseased"]
    # the split is in the database now, stratified, with its history
    with session_scope(db_env, readonly=True) as session:
        cohort = repository.get_cohort(session, "kaggle")
        images = list(cohort.images)
        splits = {image.pseudonym: (image.label, image.split) for image in images if image.label}
        histories = [repository.label_history(session, image) for image in images if image.label]
    assert Counter(splits.values()) == {("diseased", "train"): 7, ("diseased", "val"): 2, ("diseased", "test"): 2,
                                        ("healthy", "train"): 1, ("healthy", "val"): 1, ("healthy", "test"): 1}
    assert all(h[-1].field == "split" and h[-1].source == "split" for h in histories)
    assert read_splits(tmp_path / "db.splits.csv") == splits
    assert meta["splits"]["counts"] == {"train": 8, "val": 3, "test": 3}

    # a second run finds the saved split and assigns nothing
    code = main(["train", "--cohort", "kaggle", "--modality", "fundus", *FAST, "--out", str(tmp_path / "db2.pt")])
    assert code == 0 and "assigned" not in capsys.readouterr().out
    assert read_splits(tmp_path / "db2.splits.csv") == splits

    code = main(["evaluate", "--model", str(out), "--cohort", "kaggle", "--split", "test", "--methods", "softcam",
                 "--metrics", "deletion", "--steps", "4", "--no-figures", "--target", "label",
                 "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr()
    scored = pd.read_csv(tmp_path / "eval" / "per_image.csv", dtype={"image": str})
    assert sorted(scored["image"]) == sorted(p for p, (_, split) in splits.items() if split == "test")

    # a database cohort is labelled in the database, not by a file
    code = main(["train", "--cohort", "kaggle", "--labels", str(real_data / GRADES), *FAST, "--out", str(tmp_path / "z.pt")])
    assert code == 2 and "softcam images label" in capsys.readouterr().err


def test_write_splits_round_trips_a_tree(real_data, tmp_path):
    tree = open_cohort(image_folder_tree(real_data, tmp_path / "t"), assign_splits=((0.6, 0.2, 0.2), 5))
    path = write_splits(tree, tmp_path / "t.csv")
    back = CohortFolder(tmp_path / "t", path)
    assert [(r.path, r.label, r.split) for r in back.records] == [(r.path, r.label, r.split) for r in tree.records]
