"""The `stinfer` command: a thin layer over the Python API.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a function taking the parsed arguments. User errors
(:class:`stinfer.errors.InputError`, missing files, paths that cannot be written) are printed
as one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stinfer import __version__
from stinfer.errors import InputError

SUBCOMMAND_MODULES = (
    "prepare",
    "train",
    "predict",
    "evaluate",
    "embed_genes",
    "gene_eval",
    "impute",
    "demo",
    "benchmark",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one subparser per subcommand module."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="stinfer",
        description=(
            "Spatial omics inference: predict spatial gene expression from H&E histology "
            "(STEvs), predict genes that were never measured (CoxFormer), and evaluate both "
            "with the papers' protocols. Run `stinfer COMMAND --help` for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"stinfer {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages (default: info)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"stinfer.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `stinfer` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except InputError as error:
        print(f"stinfer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(
            f"stinfer {args.command}: error: file not found: {error.filename or error}",
            file=sys.stderr,
        )
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as error:
        print(
            f"stinfer {args.command}: error: {error.filename or ''}: {error.strerror or error}; "
            "check the path (a folder where a file is expected, or no permission).",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"stinfer {args.command}: interrupted; no output was left half-written.",
            file=sys.stderr,
        )
        return 130
    return 0
