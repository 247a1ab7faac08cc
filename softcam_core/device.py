"""Compute device selection: CUDA when present, else CPU; never hard-coded elsewhere."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """The device to run models on: ``SOFTCAM_DEVICE`` if set, else ``cuda`` when available, else ``cpu``."""
    forced = os.environ.get("SOFTCAM_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device | None = None) -> str:
    """Human-readable device name for the UI and reports, e.g. ``"cuda: NVIDIA H100"`` or ``"cpu (2 threads)"``."""
    device = device or default_device()
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"
