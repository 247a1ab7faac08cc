"""Benchmark 6: the Review page, from opening an image to SoftCAM + Grad-CAM maps on screen.

Measured in a real browser, as a clinician sees it: ``streamlit run app.py`` serves a SOFTCAM_HOME
holding a synthetic fundus cohort of 512 x 512 images and an untrained (seeded) SoftCAM ResNet-50
with a 512 px input (speed does not depend on the weights); headless Debian Chromium, driven by
Playwright, signs in, waits for the first image (model load and warm-up, not timed), then clicks
*Next* through the cohort and times each image until the page has finished its run and the image
panel, both SoftCAM evidence maps and Grad-CAM are drawn (plotly heatmap layers present). Clicking
*Previous* back through the same images times a reopen (maps cached in memory and the database).

Targets (issue 9 point 5): open <= 2 s and cached reopen <= 0.5 s on 2 CPU cores. The line's ratio
is the median measured seconds / the budget (lower is better); the Streamlit server, the database
and Chromium all share the machine's cores, as on a clinician's laptop.

Also run as the browser test ``tests/test_e2e_review_latency.py`` (``-m slow``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import Config, Result, device_label

NAME = "review_latency"
OPEN_BUDGET_S = 2.0
REOPEN_BUDGET_S = 0.5
TIMEOUT_MS = 300_000

# the page has sent its 'Maps of <image> ready' caption (written after the last map of that image),
# and at least ``count`` plotly figures carry a drawn heatmap or image layer
_MAPS_DRAWN = """([count, name]) => {
    const ready = Array.from(document.querySelectorAll('[data-testid="stCaptionContainer"]'))
        .some(c => c.textContent.startsWith('Maps of ' + name + ' ready in'));
    if (!ready) return false;
    const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
    return plots.filter(p => p.querySelector('.heatmaplayer .hm, .layer-above image, .imagelayer image')).length >= count;
}"""


def settings(config: Config) -> dict:
    """Images opened (the first one is the untimed warm-up), model and image sizes per run level."""
    return config.pick(
        tiny=dict(n_images=3, arch="resnet18", img_size=64, image_size=128),
        quick=dict(n_images=4, arch="resnet50", img_size=512, image_size=512),
        full=dict(n_images=6, arch="resnet50", img_size=512, image_size=512),
    )


def wait_for_maps(page, name: str, count: int = 4) -> None:
    """Until image ``name``'s maps are all sent (the page's closing caption) and ``count`` figures drawn."""
    page.wait_for_function(_MAPS_DRAWN, arg=[count, name], timeout=TIMEOUT_MS, polling="raf")


def step(page, button: str, name: str) -> float:
    """Click *Next* / *Previous*; seconds until image ``name`` has all its maps drawn."""
    start = time.monotonic()
    page.get_by_role("button", name=button).click()
    wait_for_maps(page, name)
    return time.monotonic() - start


def server_seconds(page, name: str) -> float | None:
    """The page's own figure for image ``name`` (server side: image chosen to last map sent)."""
    text = page.locator("[data-testid='stCaptionContainer']").filter(has_text=f"Maps of {name} ready in").first.inner_text()
    try:
        return float(text.split(" ready in ")[1].split(" s")[0])
    except (IndexError, ValueError):
        return None


def measure(url: str, names: list[str], browser) -> dict[str, list[float]]:
    """Open ``names`` in order with *Next* (first untimed), then back with *Previous*.

    Returns ``{"open": [s...], "reopen": [s...], "server_open": [...], "server_reopen": [...]}``.
    """
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    out: dict[str, list[float]] = {"open": [], "reopen": [], "server_open": [], "server_reopen": []}
    try:
        from tests.plugins.app import sign_in

        sign_in(page, url)
        wait_for_maps(page, names[0])  # model load and warm-up
        for name in names[1:]:
            out["open"].append(step(page, "Next", name))
            out["server_open"].append(server_seconds(page, name))
        for name in reversed(names[:-1]):
            out["reopen"].append(step(page, "Previous", name))
            out["server_reopen"].append(server_seconds(page, name))
    finally:
        context.close()
    return out


def prepared_server(home: Path, options: dict):
    """Context manager: a prepared SOFTCAM_HOME served by ``streamlit run``; yields (url, image names)."""
    from tests.plugins.app import prepare_home, run_server

    prepared = prepare_home(home, n_images=options["n_images"], image_size=options["image_size"],
                            arch=options["arch"], img_size=options["img_size"])
    names = prepared["image_names"][: options["n_images"]]  # pseudonyms: file names are not stored
    return run_server(home, home / "server.log", timeout=180.0), names


def launch_browser(playwright):
    from tests.plugins.app import CHROMIUM, CHROMIUM_ARGS

    executable = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    if not executable:
        raise RuntimeError("no Chromium found (install Debian's chromium: `make chromium`)")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)


def results_from(times: dict[str, list[float]], options: dict) -> list[Result]:
    """Two lines: median open and reopen seconds against their budgets (server, database and browser
    on this machine's CPU; the label gives the server's torch threads)."""
    import torch

    device = device_label(torch.device("cpu"))
    described = f"{options['arch']} {options['img_size']} px"
    lines = []
    for key, budget in (("open", OPEN_BUDGET_S), ("reopen", REOPEN_BUDGET_S)):
        seconds = statistics.median(times[key])
        server = [s for s in times[f"server_{key}"] if s is not None]
        lines.append(Result(
            f"review {key} to SoftCAM + Grad-CAM on screen, {described}", device, 1e3 * seconds, 1e3 * budget,
            seconds / budget, 1.0, "<=", ours_label="browser", reference_label="budget",
            extra={"images": len(times[key]), "max ms": round(1e3 * max(times[key]), 1),
                   "server median ms": round(1e3 * statistics.median(server), 1) if server else "n/a"}))
    return lines


def run(config: Config) -> list[Result]:
    from playwright.sync_api import sync_playwright

    options = settings(config)
    with tempfile.TemporaryDirectory(prefix="bench_review_") as tmp:
        server, names = prepared_server(Path(tmp), options)
        with server as url, sync_playwright() as playwright:
            browser = launch_browser(playwright)
            try:
                times = measure(url, names, browser)
            finally:
                browser.close()
    results = results_from(times, options)
    for result in results:
        print(result.line(), flush=True)
    return results
