"""The `stinfer` command: a thin layer over the Python API.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a function taking the parsed arguments (and returning
``None``, or an exit status: 1 when part of the work failed). User errors
(:class:`stinfer.errors.InputError`, missing files, paths that cannot be written) are printed
as one line on stderr with exit status 2; anything else is a bug and keeps its traceback.

SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's time limit) stop every command the same
way, through the one handler :func:`main` installs: the command stops where it is, temporary
files and folders are removed (outputs are written atomically, so none is half-written), one
line goes to stderr and the exit status is 130 (SIGINT) or 143 (SIGTERM), as a shell reports a
process the signal ended.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from stinfer import __version__
from stinfer.cli.options import HelpFormatter
from stinfer.errors import InputError
from stinfer.logs import configure_logging

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
    "features",
)


EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

EXIT_STATUS_HELP = """\
exit status (every command):
  0    finished
  1    finished, but part of the work failed (stinfer predict --slides/--manifest: the slides
       named on stderr failed, the others were written)
  2    user error (a missing file, a bad field or argument): one line on stderr
  130  interrupted (Ctrl-C / SIGINT)
  143  terminated (SIGTERM, e.g. `kill` or a scheduler's time limit)
  Interrupted or terminated, a command leaves no partial output: files and run folders appear
  under their names only once complete.
"""


class Stopped(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives.

    A ``BaseException`` and not a ``KeyboardInterrupt`` on purpose: ``except Exception`` blocks
    do not swallow it, and Lightning re-raises it (it turns a ``KeyboardInterrupt`` during
    ``fit`` into ``sys.exit(1)``, which would hide the signal from a scheduler).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signals() -> dict[int, object]:
    """Make SIGINT and SIGTERM raise :class:`Stopped`; return the handlers they replace.

    Once one arrived, further SIGINT/SIGTERM are ignored so the clean-up (removing temporary
    files) is not itself interrupted. A signal the process was started ignoring (``nohup``, a
    shell's background job) stays ignored. Only the main thread may install handlers; elsewhere
    (``main`` called from a thread) nothing is changed.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        for name in (signal.SIGINT, signal.SIGTERM):
            signal.signal(name, signal.SIG_IGN)
        raise Stopped(signum)

    return {
        name: signal.signal(name, stop)
        for name in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(name) is not signal.SIG_IGN
    }


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
        epilog=EXIT_STATUS_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stinfer {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log debug messages, and the third-party notices hidden by default (Lightning's "
        "device summary and tips, deprecation warnings addressed to other packages)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=float,
        default=None,
        metavar="N",
        help="largest JPEG/PNG (width x height) to decode, default 2^31 (~2.1e9, ~6 GB "
        "decoded); sets STINFER_MAX_IMAGE_PIXELS. JPEG/PNG images are decoded whole, so a "
        "corrupt header declaring an absurd size is refused before decoding",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"stinfer.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `stinfer` console script; returns the exit status.

    0: finished; 2: user error; 130: interrupted (SIGINT); 143: terminated (SIGTERM); see
    :data:`EXIT_STATUS_HELP`. The signal handlers are installed for the command's duration and
    the earlier ones restored on return.
    """
    previous = _stop_on_signals()
    command = "stinfer"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"stinfer {args.command}" if args.command else command
        return _run(parser, args)
    except Stopped as stopped:
        what = "terminated (SIGTERM)" if stopped.signum == signal.SIGTERM else "interrupted"
        print(f"{command}: {what}; no output was left half-written.", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:  # Ctrl-C where the handler could not be installed
        print(f"{command}: interrupted; no output was left half-written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    configure_logging(debug=args.verbose)
    if getattr(args, "max_image_pixels", None) is not None:
        from stinfer.io.slide_image import MAX_IMAGE_PIXELS_ENV

        # the environment reaches data-loader worker processes too
        os.environ[MAX_IMAGE_PIXELS_ENV] = str(int(args.max_image_pixels))
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        status = args.func(args)
    except InputError as error:
        print(f"stinfer {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as error:
        print(
            f"stinfer {args.command}: error: file not found: {error.filename or error}",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as error:
        print(
            f"stinfer {args.command}: error: {error.filename or ''}: {error.strerror or error}; "
            "check the path (a folder where a file is expected, or no permission).",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    return EXIT_OK if status is None else status
