"""Stopping code under test at a point the test chooses: an input file turned into a FIFO makes its
reader block in ``open`` until the test decides what happens next (kill it, cancel its job, then let
it read). No sleeps that guess how long something takes."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fifo_in_place_of(path: Path) -> Iterator[Path]:
    """``path`` becomes a FIFO for the block; the original file is put back afterwards."""
    real = path.with_name(path.name + ".real")
    path.rename(real)
    os.mkfifo(path)
    try:
        yield real
    finally:
        path.unlink(missing_ok=True)
        real.rename(path)


def writer_once_read(fifo: Path, running: Callable[[], bool], what: str, timeout: float = 300.0) -> int:
    """Wait until someone holds ``fifo`` open for reading (a writer can then open it without blocking);
    returns the writer's descriptor (blocking). ``running()`` False first fails the wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        else:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return fd
        if not running():
            raise AssertionError(f"{what} ended before it opened {fifo.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not open {fifo.name} in {timeout:.0f} s")
        time.sleep(0.05)


def feed(fd: int, data: bytes) -> None:
    """Write ``data`` to the FIFO's reader and close: it reads the bytes, then end of file."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 300.0):
    """Poll ``condition()`` until it is truthy (returned) or fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)
    return value
