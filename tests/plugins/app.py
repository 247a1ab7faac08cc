"""Fixtures for the app tests: a prepared SOFTCAM_HOME, a running ``streamlit run app.py`` server and
headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SOFTCAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ADMIN = ("admin", "test-admin-pw")  # tests/conftest.py TEST_ADMIN_PASSWORD


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_checkpoint(path: Path, classes=("healthy", "disease"), modality: str = "fundus", img_size: int = 64,
                         arch: str = "resnet18", head: str = "softcam", seed: int = 0) -> Path:
    """A real (untrained, seeded) ResNet-18 SoftCAM checkpoint at a small input size."""
    import torch

    from softcam_core.models import build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(arch, len(classes), head)
    meta = {"arch": arch, "head": head, "classes": list(classes), "img_size": img_size,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "modality": modality,
            "l1": 0.0, "l2": 0.0, "data_hash": "tiny", "metrics": {}}
    return save_checkpoint(path, model, meta)


def server_keys(home: Path) -> Path:
    """The key folder of a server run on ``home`` (beside it, never inside)."""
    return home.parent / f"{home.name}-keys"


def prepare_home(home: Path, *, n_images: int = 6, modality: str = "fundus", image_size: int = 128,
                 arch: str = "resnet18", img_size: int = 64, then=None) -> dict:
    """Fill ``home`` like a small demo: one synthetic cohort imported into the database and one model.

    ``image_size``: side of the synthetic images (px); ``arch`` / ``img_size``: the (untrained,
    seeded) SoftCAM model and its input side. ``then(session, cohort_dir)``: more set-up in the same
    environment and transaction. Returns ``{"cohort": name, "cohort_dir": Path, "model": Path,
    "pseudonyms": [image pseudonyms in import order], "image_names": [the names the pages show]}``.
    """
    from softcam_core.synth import make_cohort

    home.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("SOFTCAM_HOME")
    old_keys = os.environ.get("SOFTCAM_KEY_DIR")
    if old != str(home):  # a server's home (run_server): the keys the server will use
        os.environ["SOFTCAM_KEY_DIR"] = str(server_keys(home))
    os.environ["SOFTCAM_HOME"] = str(home)
    try:
        cohort_dir = make_cohort(modality, n_images, 0, home / "demo" / modality, size=image_size)
        model = make_tiny_checkpoint(home / "models" / f"{modality}_softcam.pt", modality=modality,
                                     arch=arch, img_size=img_size)
        from db.session import get_engine, session_scope, upgrade
        from service.cohorts import register_cohort_folder

        engine = get_engine()
        upgrade(engine)
        name = f"demo-{modality}"
        with session_scope(engine) as session:
            register_cohort_folder(session, cohort_dir, name, modality=modality)
            from db import repository

            # what the image pickers show: pseudonyms (file names are not stored), in import order
            images = repository.list_images(session, name)
            pseudonyms = [image.pseudonym for image in images]
            image_names = [f"{image.pseudonym}{image.extension}" for image in images]  # MedicalImage.name
            if then is not None:
                then(session, cohort_dir)
    finally:
        for variable, value in (("SOFTCAM_HOME", old), ("SOFTCAM_KEY_DIR", old_keys)):
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    return {"cohort": name, "cohort_dir": cohort_dir, "model": model, "pseudonyms": pseudonyms,
            "image_names": image_names}


@pytest.fixture
def app_home(_isolated_home) -> dict:
    """This test's SOFTCAM_HOME with a tiny synthetic cohort in the database and a tiny SoftCAM model."""
    return prepare_home(Path(os.environ["SOFTCAM_HOME"]))


@contextlib.contextmanager
def run_server(home: Path, log_path: Path, timeout: float = 90.0):
    """``streamlit run app.py`` on a free port with its own SOFTCAM_HOME; yields the base URL."""
    port = free_port()
    env = dict(os.environ, SOFTCAM_HOME=str(home), SOFTCAM_KEY_DIR=str(server_keys(home)), SOFTCAM_DEVICE="cpu",
               SOFTCAM_ADMIN_PASSWORD=ADMIN[1],
               PYTHONUNBUFFERED="1")
    env.pop("SOFTCAM_DB_URL", None)
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--global.developmentMode", "false"]
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def sign_in(page, url: str, path: str = "") -> None:
    """Sign in as the first-run admin on the server at ``url`` (Playwright page), then open ``path``."""
    page.goto(f"{url}/{path}")
    page.get_by_label("User name").fill(ADMIN[0])
    page.get_by_role("textbox", name="Password").fill(ADMIN[1])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("[data-testid='stSidebarNav']")


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright; skips with the reason when either is missing."""
    if not (os.path.isfile(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium: `make chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium"),
                                             args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def dicom_from_png(png: Path, out: Path, *, patient_name: str = "Doe^Jane", patient_id: str = "PID-0042") -> Path:
    """A Secondary Capture DICOM (MONOCHROME2, 8-bit) holding a real radiograph PNG's pixels, with patient
    identifiers in the header (the app must de-identify them). Marked DERIVED / SECONDARY."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ImageType = "OT", ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"  # a converted radiograph without text: not held in quarantine at upload
    ds.PatientName, ds.PatientID, ds.BodyPartExamined = patient_name, patient_id, "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out
