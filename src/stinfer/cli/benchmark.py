"""`stinfer benchmark`: a grid of models x protocols x cohorts from one YAML, resumable."""

from __future__ import annotations

import argparse
import shlex
import signal
from pathlib import Path

EXAMPLES = """\
examples:
  stinfer benchmark --config benchmarks/her2st_patient_c.yaml \\
      --data-root ../shared/data/her2st --out results/her2st
  stinfer benchmark --config benchmarks/synthetic_ci.yaml --out results/synthetic

Writes into --out:
  results.csv      one row per model / protocol / train slice / test slice / seed: every
                   metric (MSE, median and mean PCC/SCC, depth-normalised PCC/SCC, HEST PCC,
                   constant genes, ARI when annotated), train/predict seconds, peak RSS
  robustness.csv   blue-shift sweep rows (when the config has `robustness`)
  summary.md       tables in the paper's layout, mean +/- sd, best in bold; runtime table
  figures/         metric bars with error bars, true vs predicted maps of a gene for every
                   model, STEvs latent UMAPs by slice and by domain, blue-shift curves
  cells/           one folder per finished training (the unit of resuming)

Rerunning the same command resumes: finished cells are skipped, a cell that was interrupted
is recomputed. --overwrite discards the earlier run.
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "--overwrite",
        action="store_true",
        help="discard an earlier run in --out and start again (default: resume it)",
    )
    parser.set_defaults(func=run)


def _interrupt_on_sigterm() -> None:
    """Make ``kill PID`` (SIGTERM) stop the run like Ctrl-C: the cell in progress is dropped.

    Lightning keeps this handler beside its own while a network trains, so a SIGTERM there
    also ends the process instead of being deferred.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> None:
    from stinfer.evaluate.benchmark import load_config, run_benchmark

    config = load_config(args.config, data_root=args.data_root)
    command = f"stinfer benchmark --config {shlex.quote(str(args.config))}"
    if args.data_root:
        command += f" --data-root {shlex.quote(str(args.data_root))}"
    command += f" --out {shlex.quote(str(args.out))}"
    _interrupt_on_sigterm()
    run_benchmark(
        config,
        args.out,
        overwrite=args.overwrite,
        config_text=args.config.read_text(),
        command=command,
        only_models=args.only,
        figures=not args.no_figures,
    )
