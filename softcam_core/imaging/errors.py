"""The one error type for unreadable input."""

from __future__ import annotations

import contextlib
import logging
import threading


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace so a message from any decoder fits on one line; cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class ImageLoadError(ValueError):
    """An input that cannot be read as a medical image.

    ``str(error) == "<file name>: <problem>"`` on one line, so the CLI and the app can show it as is.
    ``.filename`` and ``.problem`` hold the two parts.
    """

    def __init__(self, filename: str, problem: str):
        self.filename = _one_line(filename or "<unnamed>", 120)
        self.problem = _one_line(problem)
        super().__init__(f"{self.filename}: {self.problem}")


_quiet_lock = threading.Lock()
_quiet_depth: dict[str, tuple[int, int]] = {}  # logger name -> (nesting depth, level to restore)


@contextlib.contextmanager
def quiet_logs(*logger_names: str):
    """Silence decoder loggers (pydicom, tifffile log a traceback per failed attempt) inside a load;
    the caller turns the failure into one ImageLoadError instead. Reference-counted, so overlapping
    loads in several threads (Streamlit) restore the original level only when the last one ends."""
    with _quiet_lock:
        for name in logger_names:
            depth, level = _quiet_depth.get(name, (0, logging.getLogger(name).level))
            if depth == 0:
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)
            _quiet_depth[name] = (depth + 1, level)
    try:
        yield
    finally:
        with _quiet_lock:
            for name in logger_names:
                depth, level = _quiet_depth[name]
                if depth == 1:
                    logging.getLogger(name).setLevel(level)
                    del _quiet_depth[name]
                else:
                    _quiet_depth[name] = (depth - 1, level)


def is_decoder_failure(exc: BaseException) -> bool:
    """True for anything a decoder may raise on bad bytes, i.e. everything except process control.

    Rust extensions (pylibjpeg-rle) raise ``pyo3_runtime.PanicException``, a BaseException, on
    malformed input; it must become an ImageLoadError too.
    """
    return not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))
