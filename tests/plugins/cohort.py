"""Synthetic cohort fixtures other areas may reuse (training, evaluation, app, database tests).

``synth_cohort(modality, n=24, size=128, seed=0, **kw) -> Path`` renders a cohort with
:func:`softcam_core.synth.make_cohort` once per distinct arguments and session, in a session temp
folder, and returns its path. Treat the folder as READ-ONLY (other tests reuse it): copy it
(``shutil.copytree``) before changing any file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory):
    """Factory ``synth_cohort(modality, n=24, size=128, seed=0, **make_cohort_options) -> Path`` (cached)."""
    from softcam_core.synth import make_cohort

    root = tmp_path_factory.mktemp("synth_cohorts")
    made: dict[str, Path] = {}

    def factory(modality: str, n: int = 24, size: int = 128, seed: int = 0, **options) -> Path:
        key = json.dumps([modality, n, size, seed, sorted((k, list(v) if isinstance(v, tuple) else v) for k, v in options.items())])
        if key not in made:
            name = f"{modality}-n{n}-s{size}-seed{seed}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
            made[key] = make_cohort(modality, n, seed, root / name, size=size, **options)
        return made[key]

    return factory
