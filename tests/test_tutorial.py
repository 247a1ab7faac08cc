"""docs/tutorial-own-model.md: every command of the tutorial, run in order on the real images."""

from __future__ import annotations

import os
import re
import shlex

import pandas as pd
import torch
import torchvision

from softcam_core.cli import main
from tests.conftest import ROOT

TUTORIAL = ROOT / "docs" / "tutorial-own-model.md"


def tutorial_commands() -> list[str]:
    """The lines of the tutorial's ```bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", TUTORIAL.read_text(encoding="utf-8"), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_every_tutorial_command_runs(real_data, sqlite_url, tmp_path, monkeypatch, capsys):
    # the user's embedded default database; the commands' database code runs on PostgreSQL in test_labels.py
    monkeypatch.setenv("SOFTCAM_DB_URL", sqlite_url)
    commands = tutorial_commands()
    assert [c.split()[1] for c in commands] == ["models", "predict", "images", "images", "images", "annotations",
                                                "evaluate", "train", "evaluate"]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # step 0: the model "trained elsewhere"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), "dr_resnet18.pth")
    data = str(real_data / "fundus_kaggle_dr")
    for command in commands:
        argv = shlex.split(command.replace("$DATA", data))
        assert argv[0] == "softcam"
        code = main(argv[1:])
        assert code == 0, (command, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "probabilities match the original" in out and "15 image(s) labelled" in out
    assert "11 annotation(s) imported" in out and "15 images, 0 with boxes, 1 with points" in out
    cohort = pd.read_csv(tmp_path / "report" / "cohort.csv")
    assert set(cohort.method) == {"softcam", "gradcam", "sanity:centre"}
    assert os.path.isfile(tmp_path / "predictions.csv")
    # step 5 trained on the saved split (0.6/0.2/0.2 of 11 diseased + 4 healthy: 3 test images) and
    # scored only the held-out ones
    trained = pd.read_csv(tmp_path / "report_trained" / "per_image.csv", dtype={"image": str})
    assert set(trained.split) == {"test"} and trained.image.nunique() == 3
    assert "assigned" not in out.split("cohort eyepacs: 15 labelled images")[-1].split("checkpoint:")[0]
