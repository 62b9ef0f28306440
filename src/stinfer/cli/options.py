"""Arguments shared by several subcommands, defined once so they mean the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from stinfer.io.atomic import check_writable


def add_output_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--out PATH`` (required) and ``--overwrite``."""
    parser.add_argument("--out", required=True, type=Path, metavar="PATH", help=help_text)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output if it exists (default: refuse and exit with an error)",
    )


def checked_output(args: argparse.Namespace) -> Path:
    """The ``--out`` path after checking it may be written (before any work is done)."""
    return check_writable(args.out, args.overwrite)
