"""Zip archives from users (image and annotation imports), read without trusting them.

A hostile archive can claim small members that expand to gigabytes (a zip bomb), hold a million
empty members, or name members ``../../etc/passwd``, ``/abs/path`` or symbolic links. Here:

* :func:`safe_members` lists the members to read and the ones skipped with the reason (a ``..``
  part, an absolute or drive path, a symbolic link, a directory), and refuses the whole archive
  (:class:`ArchiveError`) when it holds more than ``max_members`` files, when the declared total
  uncompressed size exceeds ``max_total_bytes``, or when one member larger than ``ratio_floor``
  bytes declares a compression ratio above ``max_ratio``;
* :func:`read_member` reads one member and stops as soon as it expands past its declared size, so
  a header that lies about the size cannot make the reader allocate more than it declared.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath


class ArchiveError(ValueError):
    """An archive refused as a whole: ``"<archive>: <why>"``."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on one archive. Sizes in bytes; ``max_ratio`` = uncompressed / compressed size of one member."""

    max_members: int = 20_000
    max_total_bytes: int = 4 * 1024**3
    max_ratio: float = 200.0
    ratio_floor: int = 1024**2


DEFAULT_LIMITS = ArchiveLimits()


def unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a member must not be read (None: it may be): a path that leaves the archive's folder or
    is absolute, or a symbolic link."""
    name = info.filename
    if "\x00" in name:
        return "its name holds a NUL character"
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        return "absolute path"
    if ".." in posix.parts:
        return "path with '..'"
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # made on Unix with the link bit
        return "symbolic link"
    return None


def safe_members(archive: zipfile.ZipFile, label: str,
                 limits: ArchiveLimits = DEFAULT_LIMITS) -> tuple[list[zipfile.ZipInfo], list[tuple[str, str]]]:
    """``(members to read, [(skipped member, why)])`` of ``archive`` (files only, in archive order).

    Raises :class:`ArchiveError` (``label`` names the archive in the message) when the archive
    breaks a cap of ``limits``.
    """
    files = [info for info in archive.infolist() if not info.is_dir()]
    if len(files) > limits.max_members:
        raise ArchiveError(f"{label}: holds {len(files)} files, more than the {limits.max_members} an import reads")
    keep: list[zipfile.ZipInfo] = []
    skipped: list[tuple[str, str]] = []
    total = 0
    for info in files:
        reason = unsafe_member_reason(info)
        if reason:
            skipped.append((info.filename, reason))
            continue
        if info.file_size > limits.ratio_floor and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise ArchiveError(f"{label}: member {info.filename!r} would expand {info.file_size / max(info.compress_size, 1):.0f}x "
                               f"(more than {limits.max_ratio:.0f}x): refused as a possible zip bomb")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ArchiveError(f"{label}: expands to more than {limits.max_total_bytes / 1024**3:.1f} GiB: refused")
        keep.append(info)
    return keep, skipped


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> bytes:
    """The bytes of one member, never more than its declared size (ArchiveError if it expands further)."""
    with archive.open(info) as handle:
        data = handle.read(info.file_size + 1)
    if len(data) > info.file_size:
        raise ArchiveError(f"{label}: member {info.filename!r} expands past its declared size: refused")
    return data
