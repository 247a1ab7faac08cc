"""Reader studies of explanation maps: the blinded, seeded order of the items a reader sees, and
the per-method summary of the ratings (pure functions; the database side is
``db/repository/reader_studies.py``, the page ``pages/study.py``).

How the SoftCAM authors' group validated maps with clinicians: each reader sees one map at a time,
without the method's name, and rates how plausible the highlighted evidence is (1 = implausible,
5 = fully plausible), optionally marking where the evidence should be. Order effects are controlled
by a random order per reader, seeded so that the study can be reproduced.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

RATINGS = (1, 2, 3, 4, 5)


def study_order(image_ids: Sequence[int], methods: Sequence[str], seed: int, reader_id: int) -> list[tuple[int, str]]:
    """Every ``(image id, method)`` item of a study in the order reader ``reader_id`` sees it: a
    permutation drawn by ``numpy.random.default_rng([seed, reader_id])`` (each reader their own
    order, the same on every visit and in every rerun of the study)."""
    items = [(int(image), str(method)) for image in image_ids for method in methods]
    order = np.random.default_rng([int(seed), int(reader_id)]).permutation(len(items))
    return [items[int(i)] for i in order]


def rating_summary(answers: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per method of an answers table (columns ``method``, ``rating``, ``reader``, ``image``):
    ``ratings`` (n), ``readers``, ``images``, ``mean`` rating with its 95 % percentile-bootstrap
    interval ``ci_low``/``ci_high`` (:func:`softcam_core.stats.bootstrap_ci` over the ratings),
    ``median``, and ``share_4_or_5`` (fraction rated plausible). Sorted by mean, best first."""
    from softcam_core.stats import bootstrap_ci

    rows = []
    for method, frame in answers.groupby("method", sort=True):
        ratings = frame["rating"].to_numpy(dtype=np.float64)
        low, high = bootstrap_ci(ratings, resamples=resamples, seed=seed)
        rows.append({"method": method, "ratings": int(ratings.size), "readers": int(frame["reader"].nunique()),
                     "images": int(frame["image"].nunique()), "mean": float(ratings.mean()) if ratings.size else math.nan,
                     "ci_low": low, "ci_high": high, "median": float(np.median(ratings)) if ratings.size else math.nan,
                     "share_4_or_5": float(np.mean(ratings >= 4)) if ratings.size else math.nan})
    columns = ["method", "ratings", "readers", "images", "mean", "ci_low", "ci_high", "median", "share_4_or_5"]
    return pd.DataFrame(rows, columns=columns).sort_values("mean", ascending=False, ignore_index=True)
