"""Arguments shared by several subcommands, defined once so they mean the same everywhere.

The ``type=`` functions below check a numeric option where argparse reads it, so a bad value
(``--epochs 0``, ``--top-k 0``, ``--devices abc``) fails at parse time with argparse's own one-line
message naming the flag (``argument --epochs: must be a whole number >= 1, got '0'``, exit 2)
before any file is read. Every command uses these, never a bare ``type=int``/``type=float``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from stinfer.io.atomic import check_writable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _finite_float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type=``: a finite number ``> 0``."""
    value = _finite_float(text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type=``: a finite number ``>= 0``."""
    value = _finite_float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def fraction_in(include_zero: bool = True, include_one: bool = True) -> Callable[[str], float]:
    """An argparse ``type=``: a fraction in ``[0, 1]``, either end excluded on request."""
    interval = f"{'[' if include_zero else '('}0, 1{']' if include_one else ')'}"
    expected = f"a fraction in {interval}"

    def parse(text: str) -> float:
        value = _finite_float(text, expected)
        low_ok = value >= 0 if include_zero else value > 0
        high_ok = value <= 1 if include_one else value < 1
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


fraction = fraction_in()  # [0, 1]
open_fraction = fraction_in(include_zero=False, include_one=False)  # (0, 1): a split in two


def devices(text: str) -> int | str:
    """An argparse ``type=`` for ``--devices``: ``auto``, a count ``>= 1`` or a comma list of
    device indices (``0,2``; Lightning reads a string with a comma as indices)."""
    text = text.strip()
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    indices = [part.strip() for part in text.split(",")]
    if "," in text and all(part.isdigit() for part in indices):
        if len(set(indices)) < len(indices):
            raise argparse.ArgumentTypeError(f"device indices repeat in {text!r}")
        return ",".join(indices)
    raise argparse.ArgumentTypeError(
        f"must be 'auto', a number of devices >= 1 or a comma list of device indices "
        f"(e.g. 0,1), got {text!r}"
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs wrapped at the terminal's width, examples kept as written.

    A line that starts with a space (an example command, its continuation) is printed as it
    is; the other lines of a paragraph (blank-line separated) are joined and filled to the
    width argparse gives (the terminal's, ``$COLUMNS`` where set), so prose never overflows a
    narrow terminal and never stays narrow on a wide one.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        lines: list[str] = []
        prose: list[str] = []

        def flush() -> None:
            if prose:
                lines.extend(
                    textwrap.wrap(
                        " ".join(prose),
                        max(width, 20),
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
                prose.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                lines.append("")
            elif line.startswith(" ") or (not prose and line.rstrip().endswith(":")):
                flush()
                lines.append(indent + line)
            else:
                prose.append(line.strip())
        flush()
        return "\n".join(lines)


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def add_accelerator_argument(parser: argparse.ArgumentParser, help_text: str, default=None) -> None:
    """``--accelerator`` with the names Lightning takes (a GPU is checked for before work)."""
    parser.add_argument("--accelerator", choices=ACCELERATORS, default=default, help=help_text)


def add_distributed_arguments(parser: argparse.ArgumentParser, models: str) -> None:
    """``--devices``, ``--strategy`` and ``--num-nodes``: Lightning's DDP settings.

    With ``--devices N --strategy ddp`` Lightning runs the same command once per device
    (``--accelerator cpu`` gives N processes talking over gloo); every process trains on its
    shard of the batches, only rank 0 writes. Batch sizes are per process.
    """
    parser.add_argument(
        "--devices",
        type=devices,
        help="'auto', a number of devices (e.g. 4) or device indices (e.g. 0,1); with "
        f"--strategy ddp one process per device ({models}; default auto)",
    )
    parser.add_argument(
        "--strategy",
        help=f"Lightning strategy, e.g. ddp: batch sizes are then per process ({models}; auto)",
    )
    parser.add_argument(
        "--num-nodes",
        type=int_at_least(1),
        help=f"machines of a multi-node DDP run, each with --devices processes ({models}; 1)",
    )


def add_allow_pickle_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-pickle``: read a ``.pkl`` embedding table (refused by default)."""
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a .pkl/.pickle --embeddings file. Off by default because reading a pickle "
        "runs any code it holds: use it only for a file you trust, or convert the table once "
        "to .h5ad/.csv/.parquet",
    )


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


def checked_output_folder(folder: Path, overwrite: bool, flag: str = "--out") -> Path:
    """An output *folder* after checking, before any work, that it may be created or filled:
    not a file, new or empty unless ``overwrite``, and under a folder this process may write."""
    import os

    from stinfer.errors import InputError

    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder}: is a file; give a folder for the output.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError(
            f"{flag} {folder}: folder exists and is not empty; pass --overwrite or another {flag}."
        )
    ancestor = folder.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(
            f"{flag} {folder}: cannot write there: {ancestor} is not a folder stinfer may write "
            f"to; choose another {flag}."
        )
    return folder
