"""Trained-model fixtures other areas may reuse (explain, metrics, evaluate, app tests).

``tiny_checkpoint(modality="fundus", head="softcam", **train_options) -> Path`` trains a small
ResNet-18 (64 px, 2 epochs) on the ``synth_cohort(modality)`` fixture with the real
:func:`softcam_core.training.train`, once per distinct arguments and session, and returns the
checkpoint path. Treat the file as READ-ONLY (other tests reuse it); copy it before changing it.
The model is barely trained (accuracy is not the point): it is a genuine checkpoint with the full
metadata (classes, img_size, mean, std, modality, l1, l2, data_hash, metrics).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

TINY_TRAINING = {"arch": "resnet18", "epochs": 2, "img_size": 64, "batch_size": 8, "seed": 0}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, synth_cohort):
    """Factory ``tiny_checkpoint(modality="fundus", head="softcam", **train_options) -> Path`` (cached).

    SoftCAM heads get a small lasso penalty (``l1=0.01``) unless ``l1`` is given."""
    from softcam_core.training import train

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    made: dict[str, Path] = {}

    def factory(modality: str = "fundus", head: str = "softcam", **options) -> Path:
        settings = dict(TINY_TRAINING, head=head, **options)
        if head == "softcam":
            settings.setdefault("l1", 0.01)
        key = json.dumps([modality, sorted(settings.items())], default=str)
        if key not in made:
            name = f"{modality}-{head}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.pt"
            result = train(synth_cohort(modality), root / name, show_progress=False, **settings)
            made[key] = result.checkpoint
        return made[key]

    return factory
