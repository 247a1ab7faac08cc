"""Training: schedule, sampling, augmentation, metrics, checkpoints, resume, seeding, CLI and DDP."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softcam_core.cli import main as cli_main
from softcam_core.data import CohortFolder
from softcam_core.models import load_checkpoint
from softcam_core.training import (
    AUGMENTATION,
    AugmentPolicy,
    EpochSampler,
    TrainingError,
    augment_batch,
    classification_metrics,
    clipped_cosine,
    log_path,
    selection_key,
    state_path,
    train,
)

TINY = {"arch": "resnet18", "epochs": 2, "img_size": 64, "batch_size": 8, "show_progress": False}


def test_clipped_cosine_schedule():
    assert clipped_cosine(0, 100, 1e-3, 1e-4) == pytest.approx(1e-3)
    assert clipped_cosine(50, 100, 1e-3, 1e-4) == pytest.approx(5e-4)
    # 1e-3 * (1 + cos(0.9 pi)) / 2 = 2.447e-5 < 1e-4: clipped
    assert clipped_cosine(90, 100, 1e-3, 1e-4) == pytest.approx(1e-4)
    assert clipped_cosine(25, 100, 1e-3, 0.0) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert clipped_cosine(200, 100, 1e-3, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_epoch_sampler_shuffles_balances_and_shards():
    targets = [0] * 18 + [1] * 2
    plain = EpochSampler(targets, seed=3)
    assert sorted(plain) == list(range(20))
    assert list(plain) == list(EpochSampler(targets, seed=3))
    plain.set_epoch(1)
    assert list(plain) != list(EpochSampler(targets, seed=3))

    balanced = EpochSampler(targets, balanced=True, seed=0)
    drawn = []
    for epoch in range(50):
        balanced.set_epoch(epoch)
        drawn += [targets[i] for i in balanced]
    assert abs(np.mean(drawn) - 0.5) < 0.05  # 10 % minority class drawn half the time

    ranks = [EpochSampler(list(range(7)), seed=1, rank=r, world_size=2) for r in (0, 1)]
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 4  # 7 padded to 8
    assert set(shards[0]) | set(shards[1]) == set(range(7))


def test_augmentation_policies_respect_anatomy():
    assert not AUGMENTATION["oct"].vflip and not AUGMENTATION["cxr"].vflip
    assert not AUGMENTATION["cxr"].hflip
    assert AUGMENTATION["fundus"].saturation > 0 and AUGMENTATION["fundus"].brightness > 0
    assert AUGMENTATION["oct"].saturation == AUGMENTATION["cxr"].saturation == 0


def _still(**changes) -> AugmentPolicy:
    return AugmentPolicy(**dict(hflip=False, vflip=False, rotate=0.0, scale=0.0, translate=0.0,
                                brightness=0.0, contrast=0.0, saturation=0.0) | changes)


def test_augment_batch_flips_only_where_allowed():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8) * 0.1
    identity = augment_batch(x, _still(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)

    flipped = augment_batch(x, _still(hflip=True), torch.Generator().manual_seed(0))
    mirrored = [torch.allclose(f, xi.flip(-1), atol=1e-5) for f, xi in zip(flipped, x)]
    unchanged = [torch.allclose(f, xi, atol=1e-5) for f, xi in zip(flipped, x)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and any(mirrored) and any(unchanged)

    flipped_v = augment_batch(x, _still(vflip=True), torch.Generator().manual_seed(0))
    assert any(torch.allclose(f, xi.flip(-2), atol=1e-5) for f, xi in zip(flipped_v, x))


def test_augment_batch_is_seeded_and_keeps_black_padding():
    x = torch.zeros(4, 3, 16, 16)  # mean colour everywhere
    policy = AUGMENTATION["fundus"]
    a = augment_batch(x, policy, torch.Generator().manual_seed(5))
    b = augment_batch(x, policy, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape
    # a rotated square leaves corners outside the source: padded black, i.e. (0 - mean) / std
    turned = augment_batch(x, _still(rotate=45.0), torch.Generator().manual_seed(1))
    black = (0.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    corner = turned[:, :, 0, 0]
    assert any(torch.allclose(c, black, atol=0.3) for c in corner)


def test_classification_metrics_hand_computed():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    got = classification_metrics([0, 1, 1, 0], probs, 2)
    # pairs (pos, neg): (0.4,0.1) ok, (0.4,0.55) wrong, (0.7,0.1) ok, (0.7,0.55) ok -> AUC 3/4
    assert got == {"n": 4, "accuracy": 0.5, "auc": pytest.approx(0.75)}
    assert classification_metrics([1, 1], probs[:2], 2)["auc"] is None

    three = np.eye(3)[[0, 1, 2, 2]]  # predictions 0, 1, 2, 2 against targets 0, 1, 2, 0
    got = classification_metrics([0, 1, 2, 0], three, 3)
    # quadratic weights w = (i-j)^2/4; observed disagreement 1 * w(0,2) = 1 of 4 images -> 0.25;
    # expected from marginals (rows 2/4,1/4,1/4; cols 1/4,1/4,2/4): sum w * r_i c_j = 0.28125 + 0.046875 + 0.078125 = 0.40625
    assert got["accuracy"] == 0.75
    assert got["kappa"] == pytest.approx(1 - 0.25 / 0.40625)
    assert selection_key({"accuracy": 0.9, "auc": 0.5, "loss": 1.0}) > selection_key({"accuracy": 0.8, "auc": 1.0, "loss": 0.1})


def test_train_writes_checkpoint_with_metadata_and_log(tiny_checkpoint, synth_cohort):
    path = tiny_checkpoint("fundus", "softcam")
    model, meta = load_checkpoint(path)
    folder = CohortFolder(synth_cohort("fundus"))
    assert meta["arch"] == "resnet18" and meta["head"] == "softcam"
    assert meta["classes"] == folder.classes == ["healthy", "diseased"] and meta["num_classes"] == 2
    assert meta["img_size"] == 64 and meta["modality"] == "fundus"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["l1"] == 0.01 and meta["l2"] == 0.0
    assert meta["data_hash"] == folder.data_hash()
    assert meta["epochs"] == 2 and meta["seed"] == 0 and meta["created"]
    assert meta["versions"]["torch"] == str(torch.__version__)
    metrics = meta["metrics"]
    assert metrics["best_epoch"] in (1, 2)
    assert set(metrics["val"]) >= {"n", "accuracy", "auc", "loss"}
    assert metrics["test"]["n"] == len(folder.split("test"))
    with open(log_path(path), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"lr", "train_loss", "train_penalty", "val_accuracy", "val_auc"} <= set(rows[0])
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])
    assert float(rows[0]["train_penalty"]) > 0  # the lasso term is active
    # the checkpoint holds the best epoch's validation result
    assert float(rows[metrics["best_epoch"] - 1]["val_accuracy"]) == pytest.approx(metrics["val"]["accuracy"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x)
    assert maps.shape == (2, 2, 2, 2)


def test_same_seed_same_weights_and_resume(tmp_path, synth_cohort, tiny_checkpoint):
    data = synth_cohort("fundus")
    first = tiny_checkpoint("fundus", "softcam")  # resnet18, 64 px, 2 epochs, batch 8, seed 0, l1 0.01
    weights_a = torch.load(state_path(first))["model"]

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(epoch, step, metrics):
        if metrics["phase"] == "epoch" and epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(data, tmp_path / "c.pt", seed=0, l1=0.01, progress=stop_after_first_epoch, **TINY)
    assert torch.load(state_path(tmp_path / "c.pt"))["epoch"] == 1
    resumed = train(data, tmp_path / "c.pt", seed=0, l1=0.01, resume=True, **TINY)
    weights_c = torch.load(state_path(resumed.checkpoint))["model"]
    # a second run with the same seed, interrupted and resumed, ends with bit-identical weights
    assert all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    with open(log_path(resumed.checkpoint), newline="") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2"]
    assert resumed.meta["metrics"]["test"] is not None

    with pytest.raises(TrainingError, match="different l1"):
        train(data, tmp_path / "c.pt", seed=0, resume=True, l1=0.5, **TINY)
    with pytest.raises(TrainingError, match="d.last.pt: no saved training state"):
        train(data, tmp_path / "d.pt", resume=True, **TINY)


def test_progress_callback_balanced_baseline(tmp_path, synth_cohort):
    calls = []
    result = train(synth_cohort("oct"), tmp_path / "oct.pt", head="baseline", balanced=True,
                   progress=lambda e, s, m: calls.append((e, s, m["phase"])),
                   **dict(TINY, epochs=1, img_size=48))
    steps = [c for c in calls if c[2] == "train"]
    assert steps and steps[0][:2] == (0, 0)
    assert calls[-1] == (0, len(steps), "epoch")
    assert result.meta["head"] == "baseline" and result.meta["modality"] == "oct"
    assert result.meta["l1"] == 0.0 and result.meta["balanced"] is True


def test_cli_train_and_errors(tmp_path, synth_cohort, capsys):
    data = synth_cohort("cxr")
    code = cli_main(["train", "--data", str(data), "--arch", "resnet18", "--head", "softcam", "--l1", "0.001",
                     "--l2", "0.001", "--epochs", "1", "--img-size", "48", "--batch-size", "8",
                     "--out", str(tmp_path / "cxr.pt")])
    assert code == 0
    out = capsys.readouterr().out
    assert "test: n " in out and "checkpoint:" in out
    _, meta = load_checkpoint(tmp_path / "cxr.pt")
    assert meta["modality"] == "cxr" and meta["l2"] == 0.001

    code = cli_main(["train", "--data", str(tmp_path / "nowhere"), "--epochs", "1", "--img-size", "64",
                     "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nowhere" in err and "\n" not in err

    no_val = tmp_path / "no_val"
    shutil.copytree(data, no_val)
    labels = (no_val / "labels.csv").read_text().replace(",val\n", ",train\n")
    (no_val / "labels.csv").write_text(labels)
    code = cli_main(["train", "--data", str(no_val), "--epochs", "1", "--img-size", "64", "--out", str(tmp_path / "y.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "labels.csv" in err and "'val'" in err

    code = cli_main(["train", "--data", str(data), "--epochs", "1", "--img-size", "64", "--out", str(tmp_path / "z.pt"),
                     "--init", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing.pth: initial weights file not found" in err


def test_torchrun_two_cpu_processes(tmp_path, synth_cohort):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside the interpreter")
    data = synth_cohort("fundus")
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "softcam_core", "train",
         "--data", str(data), "--arch", "resnet18", "--head", "softcam", "--l1", "0.01", "--epochs", "1",
         "--img-size", "48", "--batch-size", "4", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, meta = load_checkpoint(out)
    assert meta["world_size"] == 2 and meta["training"]["world_size"] == 2
    with open(log_path(out), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1"]  # only rank 0 writes
    assert proc.stdout.count("checkpoint:") == 1
    state = torch.load(state_path(out))
    assert state["config"]["world_size"] == 2 and state["epoch"] == 1


# -- inference (softcam predict) on a trained checkpoint ----------------------------------------------


def test_predict_matches_the_model_on_the_one_preprocessing_path(tiny_checkpoint, synth_cohort):
    from softcam_core.imaging import load_image, preprocess
    from softcam_core.inference import load_model, predict

    model, meta = load_model(tiny_checkpoint("fundus", "softcam"))
    assert not model.training and next(model.parameters()).device.type == "cpu"
    files = [r.path for r in CohortFolder(synth_cohort("fundus")).split("test")[:3]]
    results = predict(model, meta, files)
    assert [r.image for r in results] == [str(f) for f in files]
    x = torch.stack([preprocess(load_image(f, modality="fundus"), 64, meta["mean"], meta["std"])[0] for f in files])
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
    for result, probs in zip(results, expected):
        assert result.probs == pytest.approx(probs.tolist(), abs=1e-5)
        assert sum(result.probs) == pytest.approx(1.0)
        assert result.pred == meta["classes"][int(probs.argmax())] and result.pred_index == int(probs.argmax())


def test_cli_predict_writes_good_rows_and_names_bad_files(tiny_checkpoint, synth_cohort, tmp_path, capsys):
    checkpoint = tiny_checkpoint("fundus", "softcam")
    files = [str(r.path) for r in CohortFolder(synth_cohort("fundus")).split("test")[:2]]
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    out = tmp_path / "pred.csv"

    assert cli_main(["predict", "--model", str(checkpoint), "--images", *files, "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "pred", "prob_healthy", "prob_diseased"]
    assert [r["image"] for r in rows] == files
    assert all(r["pred"] in ("healthy", "diseased") for r in rows)
    assert all(float(r["prob_healthy"]) + float(r["prob_diseased"]) == pytest.approx(1.0, abs=1e-5) for r in rows)
    capsys.readouterr()

    code = cli_main(["predict", "--model", str(checkpoint), "--images", files[0], str(text_file),
                     str(tmp_path / "absent.png"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("softcam predict: error:")]
    assert len(errors) == 2 and str(text_file) in errors[0] and "absent.png" in errors[1]
    with open(out, newline="") as handle:
        assert [r["image"] for r in csv.DictReader(handle)] == [files[0]]

    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    code = cli_main(["predict", "--model", str(tmp_path / "bad.pt"), "--images", files[0], "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "bad.pt" in err and "\n" not in err
