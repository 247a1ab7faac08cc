"""Issue 9 point 5 in the browser: a 512 px ResNet-50 on the Review page, timed from the click on *Next*
until the image, both SoftCAM evidence maps and Grad-CAM are drawn, and again on reopening (cached).

The figures are printed, and ``python -m bench --only review_latency`` prints them against the 2 s /
0.5 s budgets (docs/performance.md); this test checks that the measurement runs and that the reopened
image came from the caches, not that a shared CI machine meets a wall-clock budget.
"""

from __future__ import annotations

import pytest

from bench.common import Config
from bench.review_latency import measure, prepared_server, results_from, settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_review_time_to_maps_for_a_512_px_resnet50(browser, tmp_path):
    options = settings(Config(level="quick"))
    server, names = prepared_server(tmp_path / "home", options)
    with server as url:
        times = measure(url, names, browser)
    assert len(times["open"]) == len(times["reopen"]) == options["n_images"] - 1
    # a reopen runs no forward pass: the server's own figure is far below an open's
    assert max(s for s in times["server_reopen"] if s is not None) < min(s for s in times["server_open"] if s is not None)
    for line in results_from(times, options):
        print("\n" + line.line())
