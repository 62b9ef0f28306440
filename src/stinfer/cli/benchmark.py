"""`stinfer benchmark`: a grid of models x protocols x cohorts from one YAML, resumable."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from stinfer.cli.options import HelpFormatter, checked_output_folder, positive_int
from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

EXAMPLES = """\
examples:
  stinfer benchmark --config benchmarks/her2st_patient_c.yaml \\
      --data-root ../shared/data/her2st --out results/her2st
  stinfer benchmark --config benchmarks/synthetic_ci.yaml --out results/synthetic
  stinfer benchmark --config benchmarks/her2st_patient_c.yaml \\
      --data-root ../shared/data/her2st --out results/her2st --workers 4

Writes into --out:
  results.csv      one row per model / protocol / train slice / test slice / seed: every
                   metric (MSE, median and mean PCC/SCC, depth-normalised PCC/SCC, HEST PCC,
                   constant genes, ARI when annotated), train/predict seconds, peak RSS
  robustness.csv   blue-shift sweep rows (when the config has `robustness`)
  failures.csv     the cells that raised in this run and their errors (only when one did)
  summary.md       tables in the paper's layout, mean +/- sd, best in bold; runtime table
  figures/         metric bars with error bars, true vs predicted maps of a gene for every
                   model, STEvs latent UMAPs by slice and by domain, blue-shift curves
  cells/           one folder per finished training (the unit of resuming)

--publish DIR copies summary.md and results.csv to DIR/<config name>/ (docs/results for the
tables the docs show).

Rerunning the same command resumes: finished cells are skipped, a cell that was interrupted
is recomputed. --overwrite discards the earlier run's outputs (the names above, config.yaml,
data/, patch_cache/); any other file in --out is kept. A non-empty --out that is not a benchmark
output (no benchmark.json) is refused, with or without --overwrite. SIGTERM or Ctrl-C drops the
cell in progress (exit 143 / 130); rerun to resume.

A cell that raises does not stop the others: it is listed on stderr and in failures.csv, its
folder is not written (a rerun tries it again) and the exit status is 1 (--publish is then
skipped). --workers N runs N cells at a time as Ray tasks (pip install -e ".[distributed]"),
one CPU and cores/N torch threads each; the tables, summary and figures are the same as with
one worker. Without Ray installed, --workers N warns and runs the cells one after the other.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="run a benchmark grid (models x protocols x cohorts) from a YAML config; resumable",
        description=(
            "Train and evaluate every model of the config under every protocol (cross-slice, "
            "intra-slice 7:1:2, leave-one-patient-out) on every cohort, leakage-free, and "
            "write results.csv, summary.md and figures."
        ),
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="benchmark YAML")
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (resumed if it exists)"
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        help="folder substituted for ${data_root} in the config (e.g. ../shared/data/her2st)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODEL",
        help="run only these models' cells (tables still include every finished cell)",
    )
    parser.add_argument("--no-figures", action="store_true", help="skip drawing the figures")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="run N cells at a time as Ray tasks, one CPU and cores/N torch threads each "
        '(pip install -e ".[distributed]"; without Ray: one after the other, with a warning); '
        "default 1: one after the other in this process",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        metavar="DIR",
        help="also copy summary.md and results.csv to DIR/<config name>/ (e.g. docs/results), "
        "so the tables in the docs are the ones this command measured",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier run in --out and start again (default: resume it)",
    )
    parser.set_defaults(func=run)


SUMMARY_HEADER = "# Benchmark: "  # the first line of every summary.md the report writes


def run(args: argparse.Namespace) -> int | None:
    from stinfer.evaluate.benchmark import load_config, run_benchmark

    config = load_config(args.config, data_root=args.data_root)
    checked_output_folder(args.out, overwrite=True)  # resumed if it exists: writable is enough
    if args.publish:
        check_publishable(args.publish / config.name)
    command = f"stinfer benchmark --config {shlex.quote(str(args.config))}"
    if args.data_root:
        command += f" --data-root {shlex.quote(str(args.data_root))}"
    command += f" --out {shlex.quote(str(args.out))}"
    if args.publish:
        command += f" --publish {shlex.quote(str(args.publish))}"
    result = run_benchmark(
        config,
        args.out,
        overwrite=args.overwrite,
        config_text=args.config.read_text(),
        command=command,
        only_models=args.only,
        figures=not args.no_figures,
        workers=args.workers,
    )
    for row in result.failures.itertuples():
        print(f"stinfer benchmark: failed: {row.cell}: {row.error}", file=sys.stderr)
    if len(result.failures):
        if args.publish:
            print(
                f"stinfer benchmark: not published to {args.publish / config.name}: "
                f"{len(result.failures)} cell(s) failed (see {args.out / 'failures.csv'}).",
                file=sys.stderr,
            )
        return 1
    if args.publish:
        publish(args.out, args.publish / config.name)
    return None


def check_publishable(destination: Path) -> None:
    """Refuse, before any cell runs, a ``--publish`` folder whose tables ``publish`` would not
    replace (a user's ``summary.md``) or cannot write."""
    earlier = destination / "summary.md"
    if earlier.exists() and not earlier.read_text().startswith(SUMMARY_HEADER):
        raise InputError(
            f"--publish {destination.parent}: {earlier} exists and was not written by "
            "`stinfer benchmark`; move it or choose another --publish."
        )
    checked_output_folder(destination, overwrite=True, flag="--publish")


def publish(run_folder: Path, destination: Path) -> None:
    """Copy a finished run's ``summary.md`` and ``results.csv`` into ``destination``, atomically.

    Files of the same names there are replaced only when they are an earlier published run (the
    summary starts with the benchmark header); anything else is a user's file and is kept.
    """
    from stinfer.io.atomic import atomic_output

    earlier = destination / "summary.md"
    if earlier.exists() and not earlier.read_text().startswith(SUMMARY_HEADER):
        raise InputError(
            f"{earlier}: exists and was not written by `stinfer benchmark`; not replaced."
        )
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "results.csv"):
        with atomic_output(destination / name, overwrite=True) as tmp:
            tmp.write_bytes((run_folder / name).read_bytes())
    logger.info("published %s and %s to %s", "summary.md", "results.csv", destination)
