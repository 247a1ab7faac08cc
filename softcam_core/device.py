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


def join_process_group(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """``(rank, world_size, device, started_here)``: join the process group that ``torchrun``
    describes in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``), with
    NCCL on CUDA (one GPU per local rank) and gloo on CPU. Outside torchrun: ``(0, 1, device,
    False)``. ``started_here``: this call initialised the group, so the caller destroys it."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    started = False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return dist.get_rank(), dist.get_world_size(), device, started
