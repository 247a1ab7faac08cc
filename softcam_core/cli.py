"""``softcam`` command line (contract: see DESIGN.md). Same as ``python -m softcam_core``.

Each command is registered by the module that owns its logic (``register_cli(subparsers)``), so
the CLI calls exactly the functions the Streamlit pages call. Errors print one line naming the file
and the problem and exit non-zero; set ``SOFTCAM_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# module that registers each top-level command, in the order `softcam --help` lists them
COMMAND_MODULES = (
    "softcam_core.synth",
    "softcam_core.training",
    "softcam_core.inference",
    "softcam_core.model_import",
    "softcam_core.imaging.deid",
    "softcam_core.explain.cli",
    "softcam_core.evaluate",
    "softcam_core.report",
    "softcam_core.demo",
    "db.cli",
    "service.worker",
    "service.jobs_cli",
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softcam",
        description="SoftCAM Review: self-explainable classifiers, saliency maps, annotations and metrics.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # module not written yet
            raise
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("softcam: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users, never a bare traceback
        if os.environ.get("SOFTCAM_DEBUG"):
            traceback.print_exc()
        print(f"softcam {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


def error_message(exc: BaseException) -> str:
    """One line for a user: an OSError as ``<path>: <reason>`` (``out/run: File exists``) rather than
    Python's ``[Errno 17] File exists: 'out/run'``; anything else as its message."""
    if isinstance(exc, OSError) and exc.strerror:
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{paths}: {exc.strerror}" if paths else exc.strerror
    return " ".join(str(exc).split()) or exc.__class__.__name__


if __name__ == "__main__":
    raise SystemExit(main())
