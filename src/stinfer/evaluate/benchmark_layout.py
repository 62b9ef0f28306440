"""Where a benchmark run keeps its files: the one description of the output folder.

The runner (:mod:`stinfer.evaluate.benchmark`) writes these files and the report
(:mod:`stinfer.evaluate.report`) reads them back, so both take the names from here and
neither imports the other for them::

    <out>/benchmark.json                  marks the folder as a stinfer benchmark output
    <out>/cells/<cell id>/                one finished cell, renamed into place atomically
        done.json                         written last: the cell is complete
        rows.csv, robustness.csv          its result rows and blue-shift rows
        per_gene/<label>__<test>.csv      per-gene metrics of each prediction
        predictions/<label>__<test>.h5ad  the predictions (``save_predictions``)
        latents.npz                       STEvs latents per slide (``figures.umap``)

Beside these the runner writes ``config.yaml``, ``genes_<cohort>.txt``, ``results.csv``,
``robustness.csv``, ``failures.csv`` (the cells that raised in the last run, when any did),
``data/`` (generated cohorts), ``patch_cache/`` and the report
``summary.md`` and ``figures/`` (:data:`OWN_OUTPUTS`). ``--overwrite`` removes only these, in a
folder that has the manifest; any other file there is the user's and is kept.

``<label>`` is the model's name with its inference mode (:func:`model_label`); every name in a
path goes through :func:`safe_name`.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "CELLS_DIR",
    "CELL_DONE",
    "FAILURES_FILE",
    "LATENTS_FILE",
    "MANIFEST",
    "MODE_SUFFIX",
    "OWN_OUTPUTS",
    "cell_folder",
    "is_own_output",
    "model_label",
    "per_gene_path",
    "prediction_path",
    "safe_name",
]

MANIFEST = "benchmark.json"  # marks a folder as a stinfer benchmark output
CELLS_DIR = "cells"
CELL_DONE = "done.json"
FAILURES_FILE = "failures.csv"  # the cells that raised in the last run (absent when none did)
LATENTS_FILE = "latents.npz"
MODE_SUFFIX = {"fused": "", "image": " (image only)", "spatial": " (spatial only)"}
"""How a result row names a model evaluated in each inference mode (STEvs Table 5)."""


OWN_OUTPUTS = frozenset(
    {
        MANIFEST,
        CELLS_DIR,
        "config.yaml",
        "results.csv",
        "robustness.csv",
        FAILURES_FILE,
        "summary.md",
        "figures",
        "data",
        "patch_cache",
    }
)
"""The names a benchmark run writes directly in its output folder (plus ``genes_*.txt``)."""


def is_own_output(name: str) -> bool:
    """Whether the entry ``name`` of a benchmark output folder was written by the runner."""
    return name in OWN_OUTPUTS or bool(re.fullmatch(r"genes_[A-Za-z0-9._+-]+\.txt", name))


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than ``A-Za-z0-9._+-`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-") or "x"


def model_label(name: str, mode: str) -> str:
    """The row label of model ``name`` in inference ``mode``: ``"STEvs (image only)"``."""
    return name + MODE_SUFFIX[mode]


def cell_folder(out: str | Path, cell_id: str) -> Path:
    """Where a finished cell's outputs live: ``<out>/cells/<cell id>``."""
    return Path(out) / CELLS_DIR / cell_id


def prediction_path(folder: Path, label: str, test_name: str) -> Path:
    """The saved prediction of model ``label`` on test slide ``test_name`` in a cell ``folder``."""
    return folder / "predictions" / f"{safe_name(label)}__{safe_name(test_name)}.h5ad"


def per_gene_path(folder: Path, label: str, test_name: str) -> Path:
    """The per-gene metrics of model ``label`` on test slide ``test_name`` in a cell ``folder``."""
    return folder / "per_gene" / f"{safe_name(label)}__{safe_name(test_name)}.csv"
