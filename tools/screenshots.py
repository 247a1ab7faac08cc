"""Regenerate the README screenshots (``docs/screenshots/``) from the demo: the 256 px synthetic
cohorts and the trained demo models that ``make run`` shows a new user.

    .venv/bin/python tools/screenshots.py [--home /tmp/softcam_screenshots] [--out docs/screenshots]

It builds the demo in ``--home`` when it is not there yet (``softcam demo``, about 10 minutes on 2
CPU cores, cached afterwards), starts the app on it, signs in as the first-run admin with a password
of its own, and photographs each page in Debian's headless Chromium (``SOFTCAM_CHROMIUM``). Use a
home of its own: an existing home whose admin has another password cannot be signed in to.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SOFTCAM_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
VIEWPORT = {"width": 1440, "height": 1800}  # tall: the app scrolls inside its own container, not the page


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(home: Path, password: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, SOFTCAM_HOME=str(home), SOFTCAM_ADMIN_PASSWORD=password, PYTHONUNBUFFERED="1")
    env.pop("SOFTCAM_DB_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the app did not start; its log is {log}")


def _idle(page) -> None:
    page.wait_for_timeout(800)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=600_000)


def _choose(page, label: str, option: str) -> None:
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
    _idle(page)
    box.click()
    page.get_by_role("option").filter(has_text=option).first.click()
    _idle(page)


def _shoot(page, out: Path, name: str) -> None:
    _idle(page)
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    page.wait_for_timeout(2000)  # charts and data grids finish drawing
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"wrote {out / f'{name}.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/softcam_screenshots"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.home.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "softcam_core", "demo", "--home", str(args.home)], check=True)
    password_file = args.home / "screenshots_admin_password"
    if not password_file.is_file():
        password_file.write_text(secrets.token_urlsafe(16))
    password = password_file.read_text().strip()
    process, url = _start_app(args.home, password, args.home / "screenshots_server.log")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(600_000)
            page.goto(url)
            page.get_by_label("User name").wait_for()
            _shoot(page, args.out, "sign_in")
            page.get_by_label("User name").fill("admin")
            page.get_by_role("textbox", name="Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_selector("[data-testid='stSidebarNav']")

            # Review: a diseased fundus photo of the test split, its evidence maps beside Grad-CAM
            page.get_by_role("link", name="Review").click()
            _choose(page, "Cohort", "demo-fundus")
            _choose(page, "Class", "diseased")
            _choose(page, "Split", "test")
            _shoot(page, args.out, "review")
            _choose(page, "Zoom", "4×")
            _shoot(page, args.out, "review_zoom")

            page.get_by_role("link", name="Annotate").click()
            page.wait_for_selector("h1:has-text('Annotate')")
            _choose(page, "Cohort", "demo-fundus")
            _shoot(page, args.out, "annotate")

            for link, name in (("Cohort metrics", "cohort"), ("Models", "models"), ("Data", "data")):
                page.get_by_role("link", name=link).click()
                _shoot(page, args.out, name)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
