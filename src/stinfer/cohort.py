"""Predicting a cohort of slides with one trained run: one task per slide, in-process or on Ray.

:func:`predict_cohort` is what ``stinfer predict --slides ... --out-dir DIR`` runs. Each slide is
one task that reads the slide, predicts it with the run's model and writes
``DIR/<name>.h5ad`` atomically (the same file ``stinfer predict --slide`` writes). A task's
user error (an unreadable file, a missing image: any :class:`~stinfer.errors.InputError` or
:class:`OSError`) marks that slide ``failed`` with its one-line message and the others go on;
a slide whose output already exists is ``skipped`` unless ``overwrite``, so a rerun after a
failure or an interruption does only what is left. ``DIR/summary.csv`` records every slide
(:data:`SUMMARY_COLUMNS`).

With ``workers=1`` the slides are predicted one after the other in this process, the model
loaded once. With ``workers > 1`` each slide is a Ray task (:mod:`stinfer.distributed`: one
CPU and one torch thread each, no retries: a rerun retries) that loads the model from the run
folder itself, so only paths and options are sent to the workers; Ray is started locally with
``num_cpus=workers`` unless it is already initialised (``ray.init(address=...)`` beforehand
runs the tasks on that cluster, whose workers must see the same paths). Ray tasks use no GPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from stinfer.distributed import (
    RAY_INSTALL,
    finished_tasks,
    import_ray,
    ray_session,
    remote_task,
)
from stinfer.errors import InputError

if TYPE_CHECKING:
    import anndata as ad

    from stinfer.models.uncertainty import UncertaintyConfig

__all__ = [
    "STATUSES",
    "SUMMARY_COLUMNS",
    "SUMMARY_FILE",
    "CohortSlide",
    "cohort_slides",
    "predict_cohort",
    "read_manifest",
    "write_slide_prediction",
]

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
# slide: its name; path: the slide file; output: the prediction file; spots: the slide's spots;
# seconds: reading + predicting + writing (a skipped slide keeps the earlier run's); error: the
# one-line message of a failed slide; peak_rss_mb: peak resident memory of the process that ran
# the task when it ended (a Ray worker's own, or this process's with workers=1)
SUMMARY_COLUMNS = ("slide", "path", "output", "spots", "seconds", "peak_rss_mb", "status", "error")
STATUSES = ("done", "skipped", "failed")


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its prediction is written to ``<out_dir>/<name>.h5ad``."""

    name: str
    path: Path


@dataclass(frozen=True)
class _PredictOptions:
    """What every slide of a cohort is predicted with (sent to each task; small)."""

    mode: str = "fused"
    overwrite: bool = False
    uncertainty: UncertaintyConfig | bool | None = None
    test_time_augmentation: bool | None = None


def cohort_slides(
    paths: Sequence[str | os.PathLike], names: Sequence[str | None] | None = None
) -> list[CohortSlide]:
    """The cohort of ``paths``, each named by ``names`` or, where that is blank, by its stem.

    Raises :class:`InputError` for an empty cohort, a name that is not a plain file name
    (empty, holding a path separator, starting with ``.``) and, before any work, for a name
    given to two slides (their outputs would overwrite each other).
    """
    if not paths:
        raise InputError("no slides given; name at least one prepared slide (.h5ad).")
    if names is not None and len(names) != len(paths):
        raise InputError(f"{len(names)} names for {len(paths)} slides; give one name per slide.")
    slides = []
    for index, path in enumerate(paths):
        given = names[index] if names is not None else None
        name = str(given).strip() if given is not None and str(given).strip() else Path(path).stem
        separators = {os.sep, os.altsep or os.sep}
        if not name or name.startswith(".") or any(sep in name for sep in separators):
            raise InputError(
                f"{path}: slide name {name!r} cannot name its output file <name>.h5ad; give a "
                "name without path separators that does not start with '.'."
            )
        slides.append(CohortSlide(name, Path(path)))
    by_name: dict[str, list[str]] = {}
    for slide in slides:
        by_name.setdefault(slide.name, []).append(str(slide.path))
    repeated = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if repeated:
        name, clashing = next(iter(repeated.items()))
        raise InputError(
            f"slide name {name!r} is given to {len(clashing)} slides ({', '.join(clashing)}); "
            "their outputs would overwrite each other. Give each slide a unique name (a "
            "manifest's `name` column) or list each slide once."
        )
    return slides


def read_manifest(path: str | os.PathLike) -> list[CohortSlide]:
    """The cohort a CSV manifest lists: a ``path`` column and an optional ``name`` column.

    Relative paths are relative to the manifest's folder; a blank ``name`` falls back to the
    slide file's stem. Raises :class:`InputError` when the file is missing or not a CSV with a
    ``path`` column, when a row has no path, and as :func:`cohort_slides` does.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: manifest not found; give a CSV with a `path` column (and optionally a "
            "`name` column), one slide a row."
        )
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read as a CSV manifest ({error}).") from None
    table.columns = [str(column).strip() for column in table.columns]
    if "path" not in table.columns:
        raise InputError(
            f"{path}: no `path` column (columns: {', '.join(table.columns) or 'none'}); a "
            "manifest has a `path` column and optionally a `name` column."
        )
    slide_paths = []
    for row, value in enumerate(table["path"], start=2):  # row 1 is the header
        if not value.strip():
            raise InputError(f"{path}: row {row} has no `path`; give each row a slide file.")
        slide_paths.append(path.parent / value.strip())
    names = list(table["name"]) if "name" in table.columns else None
    return cohort_slides(slide_paths, names)


def write_slide_prediction(
    model: Any,
    slide: ad.AnnData,
    path: str | os.PathLike,
    mode: str = "fused",
    overwrite: bool = False,
    uncertainty: UncertaintyConfig | bool | None = None,
) -> Path:
    """Write ``model``'s prediction of ``slide`` to ``path`` atomically; ``stinfer predict``'s
    one way to do it.

    A model that writes its prediction chunk by chunk (STEvs' ``write_prediction``: bounded
    memory on a Visium HD slide, and ``mode``/``uncertainty``) does; any other expression
    model predicts in memory (``mode`` and ``uncertainty`` apply to STEvs only).
    """
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.slide_data import prepare_for_h5ad

    if hasattr(model, "write_prediction"):
        return model.write_prediction(
            slide, path, mode=mode, overwrite=overwrite, uncertainty=uncertainty
        )
    return write_h5ad(prepare_for_h5ad(model.predict(slide)), path, overwrite=overwrite)


def predict_cohort(
    run: str | os.PathLike,
    slides: Sequence[CohortSlide | str | os.PathLike],
    out_dir: str | os.PathLike,
    workers: int = 1,
    mode: str = "fused",
    overwrite: bool = False,
    uncertainty: UncertaintyConfig | bool | None = None,
    test_time_augmentation: bool | None = None,
) -> pd.DataFrame:
    """Predict every slide of a cohort with the run's model, one task per slide.

    Parameters
    ----------
    run
        A run folder of ``stinfer train`` (any expression model).
    slides
        Prepared slides (``.h5ad`` paths, named by their stems) or :class:`CohortSlide` (see
        :func:`cohort_slides`, :func:`read_manifest`). Names must be unique.
    out_dir
        Folder of the outputs (created if needed): ``<name>.h5ad`` per slide and
        :data:`SUMMARY_FILE`.
    workers
        1: one slide after the other in this process. More: that many Ray tasks at a time (a
        local Ray with ``num_cpus=workers`` unless Ray is already initialised).
    mode, uncertainty, test_time_augmentation
        As for one slide (``stinfer predict --mode``, ``--uncertainty``, ``--no-tta``); STEvs
        only. ``test_time_augmentation=None`` keeps the run's setting.
    overwrite
        Predict again slides whose output exists; otherwise they are ``skipped``.

    Returns
    -------
    pandas.DataFrame
        One row per slide, in the given order, with :data:`SUMMARY_COLUMNS`; ``status`` is
        ``done``, ``skipped`` or ``failed`` (with ``error``). The same table is written to
        ``out_dir/summary.csv`` (replacing an earlier one; a skipped slide keeps the earlier
        row's ``spots`` and ``seconds``).

    Raises
    ------
    InputError
        Before any slide is read: a run that is not an expression model, STEvs options for
        another model, repeated slide names or an ``out_dir`` that cannot be written. A
        slide's own errors do not raise. ``workers > 1`` without Ray installed warns and runs
        in this process.
    """
    from stinfer.io.atomic import check_writable, write_text

    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers={workers!r}: give a whole number >= 1.")
    cohort = cohort_slides(
        [slide.path if isinstance(slide, CohortSlide) else slide for slide in slides],
        [slide.name if isinstance(slide, CohortSlide) else None for slide in slides],
    )
    _check_expression_run(run, mode, uncertainty, test_time_augmentation)
    ray = _import_ray(workers) if workers > 1 else None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; give a folder for the slides' predictions.")
    check_writable(out_dir / SUMMARY_FILE, overwrite=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{out_dir}: cannot create the folder ({error.strerror}).") from None

    options = _PredictOptions(mode, overwrite, uncertainty, test_time_augmentation)
    earlier = _earlier_rows(out_dir / SUMMARY_FILE)
    rows: dict[str, dict[str, Any]] = {}
    pending = []
    for slide in cohort:
        output = out_dir / f"{slide.name}.h5ad"
        if output.exists() and not overwrite:
            rows[slide.name] = _skipped_row(slide, output, earlier.get(slide.name))
            logger.info(
                "%s: skipped, %s exists (overwrite to predict it again)", slide.name, output
            )
        else:
            pending.append((slide, output))
    if pending:
        where = f"on {workers} Ray workers" if ray else "in this process"
        logger.info("predicting %d slide(s) %s", len(pending), where)
    tasks = (
        _run_on_ray(ray, run, pending, options, workers)
        if ray
        else _run_here(run, pending, options)
    )
    for row in tasks:
        rows[row["slide"]] = row
        if row["status"] == "failed":
            logger.warning("%s: failed: %s", row["slide"], row["error"])
        else:
            logger.info(
                "%s: %d spots in %.1f s -> %s",
                *(row[k] for k in ("slide", "spots", "seconds", "output")),
            )
    summary = pd.DataFrame([rows[slide.name] for slide in cohort], columns=list(SUMMARY_COLUMNS))
    summary["spots"] = summary["spots"].astype("Int64")
    write_text(summary.to_csv(index=False), out_dir / SUMMARY_FILE, overwrite=True)
    return summary


def _check_expression_run(
    run: str | os.PathLike,
    mode: str,
    uncertainty: UncertaintyConfig | bool | None,
    test_time_augmentation: bool | None,
) -> None:
    """Refuse, before any slide, a run that is not an expression model or STEvs options for
    another model (as ``stinfer predict`` does)."""
    from stinfer.modalities import canonical_modality
    from stinfer.models import MODEL_TYPES
    from stinfer.models.persistence import read_model_header

    kind = read_model_header(run).model_type
    if kind in MODEL_TYPES and not MODEL_TYPES[kind].expression:
        raise InputError(
            f"{run}: holds a {kind} model, not an expression model; impute genes with "
            "`stinfer impute` or load it with stinfer.models.load."
        )
    mode = canonical_modality(mode, "mode")
    if kind != "stevs" and (mode != "fused" or uncertainty or test_time_augmentation is not None):
        raise InputError(
            f"{run}: holds a {kind} model; mode, test-time augmentation and uncertainty are "
            "options of STEvs runs only."
        )


def _import_ray(workers: int) -> Any | None:
    """Ray, or ``None`` (a warning: the slides then run one after the other in this process,
    as with one worker; the benchmark's ``--workers`` does the same)."""
    ray = import_ray()
    if ray is None:
        logger.warning(
            "%d workers run the slides as Ray tasks, and Ray is not installed (%s): "
            "predicting them one after the other in this process.",
            workers,
            RAY_INSTALL,
        )
    return ray


def _load_model(run: str | os.PathLike, options: _PredictOptions) -> Any:
    from stinfer.models import load

    model = load(run)
    if options.test_time_augmentation is not None:
        model.config.training.test_time_augmentation = options.test_time_augmentation
    return model


def _predict_slide(
    run: str | os.PathLike,
    slide: CohortSlide,
    output: Path,
    options: _PredictOptions,
    model: Any = None,
) -> dict[str, Any]:
    """One task: read, predict and write one slide; its summary row (``failed`` with the
    message of a user error or an :class:`OSError`, which never propagate)."""
    from stinfer.io.h5ad import read_h5ad_slide

    start = time.perf_counter()
    spots = None
    try:
        model = _load_model(run, options) if model is None else model
        data = read_h5ad_slide(slide.path)
        spots = data.n_obs
        write_slide_prediction(
            model, data, output, options.mode, options.overwrite, options.uncertainty
        )
    except (InputError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        return _row(slide, output, spots, time.perf_counter() - start, "failed", message)
    return _row(slide, output, spots, time.perf_counter() - start, "done")


def _run_here(
    run: str | os.PathLike, pending: list[tuple[CohortSlide, Path]], options: _PredictOptions
) -> Iterator[dict[str, Any]]:
    if not pending:
        return
    model = _load_model(run, options)
    for slide, output in pending:
        yield _predict_slide(run, slide, output, options, model=model)


def _run_on_ray(
    ray: Any,
    run: str | os.PathLike,
    pending: list[tuple[CohortSlide, Path]],
    options: _PredictOptions,
    workers: int,
) -> Iterator[dict[str, Any]]:
    """Rows of the pending slides as their Ray tasks finish (:mod:`stinfer.distributed`): each
    task is :func:`_predict_slide` on one torch thread, the model loaded from ``run``. A task
    that raised (a bug) raises here; a worker that died (e.g. out of memory) fails its slide
    only."""
    if not pending:
        return
    with ray_session(ray, workers):
        task = remote_task(ray)
        # workers get absolute paths (a worker's folder need not be ours); rows keep the given
        run_path = str(Path(run).absolute())
        running = {}
        for slide, output in pending:
            absolute = CohortSlide(slide.name, slide.path.absolute())
            arguments = (run_path, absolute, output.absolute(), options)
            running[task.remote(1, _predict_slide, *arguments)] = (slide, output)
        for (slide, output), row, died in finished_tasks(ray, running):
            if died:
                row = _row(slide, output, None, float("nan"), "failed", died)
            yield {**row, "path": str(slide.path), "output": str(output)}


def _row(
    slide: CohortSlide,
    output: Path,
    spots: int | None,
    seconds: float,
    status: str,
    error: str = "",
) -> dict[str, Any]:
    return {
        "slide": slide.name,
        "path": str(slide.path),
        "output": str(output),
        "spots": spots,
        "seconds": round(seconds, 3),
        "peak_rss_mb": _peak_rss_mb() if status != "skipped" else float("nan"),
        "status": status,
        "error": error,
    }


def _earlier_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier summary by slide name; none when there is none or it is
    unreadable (it is only bookkeeping: the outputs themselves say what is done)."""
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, dtype={"slide": str, "error": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        logger.warning("%s: ignoring the earlier summary, unreadable (%s)", path, error)
        return {}
    if not {"slide", "spots", "seconds"} <= set(table.columns):
        return {}
    return {str(row["slide"]): row for row in table.to_dict("records")}


def _skipped_row(
    slide: CohortSlide, output: Path, earlier: dict[str, Any] | None
) -> dict[str, Any]:
    spots, seconds, peak = None, float("nan"), float("nan")
    if earlier is not None and earlier.get("status") in ("done", "skipped"):
        spots = pd.to_numeric(earlier["spots"], errors="coerce")
        spots = None if pd.isna(spots) else int(spots)
        seconds = float(pd.to_numeric(earlier["seconds"], errors="coerce"))
        peak = float(pd.to_numeric(earlier.get("peak_rss_mb", float("nan")), errors="coerce"))
    return {**_row(slide, output, spots, seconds, "skipped"), "peak_rss_mb": peak}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``; NaN where unavailable)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
