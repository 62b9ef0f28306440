"""Evaluation protocols of the STEvs paper, leakage-free: intra-slice, cross-slice, leave-one-patient-out.

Every expression model (STEvs and the baselines) follows one interface, :class:`ExpressionModel`:
built from training slides and a gene list, ``train()``, then ``predict(slide, patches=None)``.
:func:`run_unit` is the one runner of a (model, training slides, test slides) unit: train,
predict every counts-stripped test slide (per inference mode), evaluate, and record the
seconds and memory; :func:`run_protocol` (and the benchmark harness) call it.
:func:`run_protocol` runs a model factory under a protocol and returns one row per
(model, protocol, train slice, test slice, seed) with every metric of
:func:`stinfer.metrics.evaluate_expression`, the training and prediction seconds and
the peak memory; :func:`aggregate` reduces them to mean +/- sd over pairs and seeds.

Leakage rules (``docs/DESIGN.md`` "Protocols"):

- **cross-slice** (train on one slice of a group of serial sections, test on every other) and
  **leave-one-patient-out**: the model only ever receives test slides through
  :func:`strip_counts` (a copy whose counts are all zero and which keeps only coordinates,
  grid positions and image metadata), so nothing of the test slide's expression can reach it;
- **intra-slice**: a seeded random 7:1:2 split of one slice's spots
  (:func:`intra_slice_split`); the model is built on the train + validation spots, with
  ``obs[SPLIT_KEY]`` saying which are which (a model with early stopping or model selection
  uses the ``"val"`` spots for it, the others may ignore the column), and predicts the test
  spots, also stripped of counts.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stinfer.errors import InputError
from stinfer.io.slide_data import SPLIT_KEY, slide_id

logger = logging.getLogger("stinfer")

__all__ = [
    "INTRA_SLICE_RATIOS",
    "PROTOCOLS",
    "SPLIT_KEY",
    "EvaluationTask",
    "ExpressionModel",
    "ModelFactory",
    "PeakMemory",
    "UnitPrediction",
    "UnitResult",
    "aggregate",
    "cross_slice_pairs",
    "intra_slice_split",
    "leave_one_patient_out",
    "predict_stripped",
    "protocol_tasks",
    "run_protocol",
    "run_unit",
    "strip_counts",
]

INTRA_SLICE_RATIOS = (0.7, 0.1, 0.2)  # STEvs D.2.1: 7:1:2 train/val/test spots of one slice
PROTOCOLS = ("intra_slice", "cross_slice", "leave_one_patient_out")
Protocol_ = Literal["intra_slice", "cross_slice", "leave_one_patient_out"]

# obs columns and obsm keys a model may see on a test slide: position only, no expression
_TEST_OBS_COLUMNS = ("sample_id", "spot_id", "array_row", "array_col", "in_tissue")
_TEST_OBSM_KEYS = ("spatial",)


# --------------------------------------------------------------------------- model interface
@runtime_checkable
class ExpressionModel(Protocol):
    """The interface of every stinfer expression model (STEvs, baselines).

    ``Model(train_slides: list[AnnData], genes: list[str], config=ModelConfig())`` builds it
    from slides holding raw counts (``X``), coordinates (``obsm["spatial"]``) and image
    metadata (``uns["stinfer"]``); training spots may carry ``obs[SPLIT_KEY]`` in
    {"train", "val"} (validation spots for early stopping / model selection).
    """

    def train(self) -> Any:
        """Fit the model; returns an object (or dict) with at least ``train_seconds``."""
        ...

    def predict(self, slide: ad.AnnData, patches: np.ndarray | None = None) -> ad.AnnData:
        """Predict expression of every spot of ``slide`` (its counts are never used).

        Parameters
        ----------
        slide
            Coordinates, image metadata; ``X`` may be all zeros (see :func:`strip_counts`).
        patches
            Optional ``(n_spots, 3, H, W)`` uint8 patches in spot order used *instead of*
            extracting them from the slide's image (e.g. colour-shifted patches for the
            robustness sweep, or patches cached by the caller). Models that do not look at
            the image ignore it.

        Returns
        -------
        AnnData
            Same ``obs_names`` as ``slide``, ``var_names`` = the model's genes, ``X`` dense
            float32 predicted counts in the count scale of the training data (raw counts).
        """
        ...


ModelFactory = Callable[[list[ad.AnnData], list[str], int], ExpressionModel]
"""``factory(train_slides, genes, seed) -> model``: builds an untrained model for one run."""


# --------------------------------------------------------------------------- slides
def _slides_by_id(slides: Sequence[ad.AnnData] | Mapping[str, ad.AnnData]) -> dict[str, ad.AnnData]:
    if isinstance(slides, Mapping):
        return {str(k): v for k, v in slides.items()}
    by_id: dict[str, ad.AnnData] = {}
    for slide in slides:
        name = slide_id(slide)
        if name in by_id:
            raise InputError(
                f"two slides share the sample id {name!r}; give each slide a distinct "
                "uns['stinfer']['sample_id'] (or pass a dict name -> slide)."
            )
        by_id[name] = slide
    return by_id


def strip_counts(slide: ad.AnnData) -> ad.AnnData:
    """A copy of ``slide`` that carries no expression: what a model may see of a test slide.

    ``X`` is an all-zero sparse matrix of the same shape (same spot and gene names), and only
    identity, position and image information is kept: ``obs`` columns ``sample_id``,
    ``spot_id``, ``array_row``, ``array_col``, ``in_tissue``; ``obsm["spatial"]``; ``uns["stinfer"]``. Layers, ``raw``, other ``obs``
    columns (QC totals would leak depth), ``obsm``/``varm``/``obsp`` are dropped.
    """
    obs = pd.DataFrame(index=slide.obs_names.copy())
    for column in _TEST_OBS_COLUMNS:
        if column in slide.obs:
            obs[column] = slide.obs[column].to_numpy()
    stripped = ad.AnnData(
        X=sp.csr_matrix(slide.shape, dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=slide.var_names.copy()),
    )
    for key in _TEST_OBSM_KEYS:
        if key in slide.obsm:
            stripped.obsm[key] = np.array(slide.obsm[key], copy=True)
    if "stinfer" in slide.uns:
        stripped.uns["stinfer"] = dict(slide.uns["stinfer"])
    return stripped


# --------------------------------------------------------------------------- splits
def intra_slice_split(
    n_spots: int, seed: int, ratios: tuple[float, float, float] = INTRA_SLICE_RATIOS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random train / validation / test split of one slice's spots (STEvs D.2.1, 7:1:2).

    The sizes are ``round(ratio * n_spots)`` for validation and test and the remainder for
    training, so the three sets are disjoint and cover ``0 .. n_spots - 1``; the same seed gives
    the same split.

    Returns
    -------
    train_idx, val_idx, test_idx : numpy.ndarray
        Sorted int64 spot indices.
    """
    if len(ratios) != 3 or min(ratios) < 0 or not np.isclose(sum(ratios), 1.0):
        raise InputError(f"ratios must be three non-negative fractions summing to 1, got {ratios}.")
    if n_spots < 3:
        raise InputError(f"an intra-slice split needs at least 3 spots, got {n_spots}.")
    n_val = round(ratios[1] * n_spots)
    n_test = max(1, round(ratios[2] * n_spots))
    order = np.random.default_rng(seed).permutation(n_spots)
    test_idx = np.sort(order[:n_test])
    val_idx = np.sort(order[n_test : n_test + n_val])
    train_idx = np.sort(order[n_test + n_val :])
    return train_idx.astype(np.int64), val_idx.astype(np.int64), test_idx.astype(np.int64)


def cross_slice_pairs(slide_ids: Sequence[str]) -> list[tuple[str, str]]:
    """Every (train, test) pair of distinct slices: train on each slice, test on every other.

    In the order of ``slide_ids`` (train-major), ``n * (n - 1)`` pairs.
    """
    ids = [str(name) for name in slide_ids]
    if len(set(ids)) != len(ids):
        raise InputError(f"slide ids must be unique, got {ids}.")
    if len(ids) < 2:
        raise InputError(f"cross-slice evaluation needs at least 2 slices, got {ids}.")
    return [(train, test) for train, test in itertools.permutations(ids, 2)]


def _patient_of(slide: ad.AnnData, name: str, patient_key: str | Mapping[str, str] | None) -> str:
    if isinstance(patient_key, Mapping):
        if name not in patient_key:
            raise InputError(f"slide {name!r} is missing from the patient mapping.")
        return str(patient_key[name])
    key = patient_key or "patient_id"
    meta = slide.uns.get("stinfer", {})
    if key not in meta or meta[key] in (None, ""):
        raise InputError(
            f"slide {name!r} has no uns['stinfer'][{key!r}]; set it or pass a mapping "
            "slide id -> patient id."
        )
    return str(meta[key])


def leave_one_patient_out(
    slides: Sequence[ad.AnnData] | Mapping[str, ad.AnnData],
    patient_key: str | Mapping[str, str] | None = "patient_id",
) -> list[tuple[list[str], list[str]]]:
    """Folds that hold out one patient at a time.

    Parameters
    ----------
    slides
        Slides (ids from ``uns["stinfer"]["sample_id"]``) or a dict id -> slide.
    patient_key
        The ``uns["stinfer"]`` key holding each slide's patient id, or a mapping slide id ->
        patient id.

    Returns
    -------
    list of (train_ids, test_ids)
        One fold per patient (in order of first appearance): train on every slide of the other
        patients, test on each slide of the held-out one.
    """
    by_id = _slides_by_id(slides)
    patients = {name: _patient_of(slide, name, patient_key) for name, slide in by_id.items()}
    distinct = list(dict.fromkeys(patients.values()))
    if len(distinct) < 2:
        raise InputError(f"leave-one-patient-out needs at least 2 patients, got {distinct}.")
    return [
        (
            [name for name, patient in patients.items() if patient != held_out],
            [name for name, patient in patients.items() if patient == held_out],
        )
        for held_out in distinct
    ]


# --------------------------------------------------------------------------- tasks
@dataclass
class EvaluationTask:
    """One model run: the slides it trains on and the slide (spots) it is tested on."""

    protocol: str
    train_name: str
    test_name: str
    seed: int
    train_slides: list[ad.AnnData]
    test_slide: ad.AnnData  # with counts: the truth; models get strip_counts(test_slide)
    extra: dict[str, Any] = field(default_factory=dict)


def _intra_slice_tasks(by_id: dict[str, ad.AnnData], seeds: Sequence[int]) -> list[EvaluationTask]:
    tasks = []
    for name, slide in by_id.items():
        for seed in seeds:
            train_idx, val_idx, test_idx = intra_slice_split(slide.n_obs, seed)
            fit_idx = np.sort(np.concatenate([train_idx, val_idx]))
            training = slide[fit_idx].copy()
            split = np.full(len(fit_idx), "train", dtype=object)
            split[np.isin(fit_idx, val_idx)] = "val"
            training.obs[SPLIT_KEY] = pd.Categorical(split, categories=["train", "val"])
            tasks.append(
                EvaluationTask(
                    "intra_slice",
                    name,
                    name,
                    seed,
                    [training],
                    slide[test_idx].copy(),
                    {"n_train": len(train_idx), "n_val": len(val_idx)},
                )
            )
    return tasks


def protocol_tasks(
    slides: Sequence[ad.AnnData] | Mapping[str, ad.AnnData],
    protocol: Protocol_,
    seeds: Sequence[int] = (0,),
    patient_key: str | Mapping[str, str] | None = "patient_id",
) -> list[EvaluationTask]:
    """The runs of ``protocol`` over ``slides`` and ``seeds``, in a fixed order."""
    by_id = _slides_by_id(slides)
    if protocol == "intra_slice":
        return _intra_slice_tasks(by_id, seeds)
    if protocol == "cross_slice":
        return [
            EvaluationTask(protocol, train, test, seed, [by_id[train]], by_id[test])
            for train, test in cross_slice_pairs(list(by_id))
            for seed in seeds
        ]
    if protocol == "leave_one_patient_out":
        return [
            EvaluationTask(
                protocol, "+".join(train), test, seed, [by_id[n] for n in train], by_id[test]
            )
            for train, tests in leave_one_patient_out(by_id, patient_key)
            for test in tests
            for seed in seeds
        ]
    raise InputError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}.")


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Context manager: peak resident memory (RSS, MiB) of this process while it is open.

    A background thread samples ``psutil.Process().memory_info().rss`` every
    ``interval_s`` seconds (plus once at entry and exit), so short spikes between samples can
    be missed; on CUDA, the peak allocated GPU memory is recorded too (``peak_gpu_mb``, NaN
    otherwise). ``start_rss_mb`` is the RSS at entry, so ``peak_rss_mb - start_rss_mb`` is
    what the block itself added (the peak includes everything the process held before).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.start_rss_mb = 0.0
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb = float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss_mb = self._process.memory_info().rss / 2**20
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        import psutil

        self._process = psutil.Process()
        self.start_rss_mb = self._process.memory_info().rss / 2**20
        self._sample()
        self._cuda = _cuda_in_use()
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._cuda:
            import torch

            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def _cuda_in_use() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


# --------------------------------------------------------------------------- running
def _train_seconds(fit_info: Any, fallback: float) -> float:
    if isinstance(fit_info, Mapping):
        value = fit_info.get("train_seconds")
    else:
        value = getattr(fit_info, "train_seconds", None)
    return float(value or fallback)  # a model that reports no (or zero) time: the wall clock


@dataclass
class UnitPrediction:
    """One prediction of :func:`run_unit`: a test slide in one inference mode, and its scores."""

    test_name: str
    test_slide: ad.AnnData  # with counts: the truth
    mode: str
    prediction: ad.AnnData
    evaluation: Any  # stinfer.metrics.ExpressionMetrics of the prediction on the panel
    predict_seconds: float


@dataclass
class UnitResult:
    """What :func:`run_unit` returns: the trained model, one row and one prediction per
    (test slide, mode), in test-major order."""

    model: Any
    rows: list[dict[str, Any]]
    predictions: list[UnitPrediction]


def predict_stripped(
    model: Any, slide: ad.AnnData, mode: str = "fused", patches: np.ndarray | None = None
) -> ad.AnnData:
    """``model``'s prediction of ``strip_counts(slide)`` in inference ``mode`` (the one way a
    test slide reaches a model); only STEvs has modes other than ``"fused"``."""
    stripped = strip_counts(slide)
    if mode != "fused":
        return model.predict(stripped, mode=mode, patches=patches)
    if patches is None:
        return model.predict(stripped)
    return model.predict(stripped, patches=patches)


def run_unit(
    build_model: Callable[[], ExpressionModel],
    tests: Sequence[tuple[str, ad.AnnData]],
    genes: Sequence[str],
    *,
    modes: Sequence[str] = ("fused",),
    test_patches: Callable[[Any, ad.AnnData], np.ndarray | None] | None = None,
    on_prediction: Callable[[Any, UnitPrediction], Mapping[str, Any]] | None = None,
    after_predictions: Callable[[Any], None] | None = None,
) -> UnitResult:
    """Train one model, predict each counts-stripped test slide per mode, evaluate, and time it.

    The one runner of a (model, training slides, test slides) unit, used by
    :func:`run_protocol`, the benchmark harness (:func:`stinfer.evaluate.benchmark.run_cell`)
    and ``benchmarks/stevs_her2st.py``.

    Parameters
    ----------
    build_model
        Builds the untrained model (its time counts as training time unless the model reports
        its own ``train_seconds``).
    tests
        ``(name, slide)`` pairs; each slide keeps its counts (the truth) and reaches the model
        only through :func:`strip_counts`.
    genes
        The evaluated panel; every test slide must hold every gene.
    modes
        Inference modes predicted from the one training (``"fused"``; STEvs also ``"image"``,
        ``"spatial"``).
    test_patches
        ``test_patches(model, slide)``: patches to predict from instead of the slide's image
        (e.g. cached ones), or ``None``.
    on_prediction
        ``on_prediction(model, prediction)``: extra columns of that prediction's row (e.g.
        domain recovery), measured inside the cost.
    after_predictions
        ``after_predictions(model)``: further work on the trained model measured inside the cost
        (e.g. robustness sweeps, latents).

    Returns
    -------
    UnitResult
        Rows ``test_slice, mode``, every scalar of
        :class:`~stinfer.metrics.ExpressionMetrics`, the hook's columns, ``train_seconds``,
        ``predict_seconds`` (this prediction), and the unit's ``cpu_seconds`` (process CPU
        time), ``peak_rss_mb``, ``rss_increase_mb`` (see :class:`PeakMemory`) and
        ``peak_gpu_mb`` (NaN without CUDA).
    """
    from stinfer.metrics import evaluate_anndata

    genes = [str(gene) for gene in genes]
    for test_name, truth in tests:
        missing = [gene for gene in genes if gene not in truth.var_names]
        if missing:
            raise InputError(
                f"test slide {test_name!r} lacks {len(missing)} of the genes (e.g. {missing[:3]})."
            )
    rows, predictions = [], []
    cpu_start = time.process_time()
    with PeakMemory() as memory:
        start = time.perf_counter()
        model = build_model()
        fit_info = model.train()
        train_seconds = _train_seconds(fit_info, time.perf_counter() - start)
        for test_name, truth in tests:
            patches = None if test_patches is None else test_patches(model, truth)
            for mode in modes:
                start = time.perf_counter()
                prediction = predict_stripped(model, truth, mode, patches)
                predict_seconds = time.perf_counter() - start
                evaluation = evaluate_anndata(prediction, truth[:, genes])
                unit = UnitPrediction(
                    test_name, truth, mode, prediction, evaluation, predict_seconds
                )
                extra = {} if on_prediction is None else dict(on_prediction(model, unit))
                predictions.append(unit)
                rows.append(
                    {
                        "test_slice": test_name,
                        "mode": mode,
                        **evaluation.summary(),
                        **extra,
                        "train_seconds": train_seconds,
                        "predict_seconds": predict_seconds,
                    }
                )
        if after_predictions is not None:
            after_predictions(model)
    cpu_seconds = time.process_time() - cpu_start
    for row in rows:
        row["cpu_seconds"] = cpu_seconds
        row["peak_rss_mb"] = memory.peak_rss_mb
        row["rss_increase_mb"] = memory.peak_rss_mb - memory.start_rss_mb
        row["peak_gpu_mb"] = memory.peak_gpu_mb
    return UnitResult(model, rows, predictions)


def run_protocol(
    model_factory: ModelFactory,
    slides: Sequence[ad.AnnData] | Mapping[str, ad.AnnData],
    genes: Sequence[str],
    protocol: Protocol_,
    seeds: Sequence[int] = (0,),
    *,
    model_name: str | None = None,
    patient_key: str | Mapping[str, str] | None = "patient_id",
    predictions: dict | None = None,
) -> pd.DataFrame:
    """Train and evaluate one model under one protocol; one row per run.

    Parameters
    ----------
    model_factory
        ``factory(train_slides, genes, seed) -> model`` (:data:`ModelFactory`), e.g.
        ``lambda slides, genes, seed: PatchFeatureRidge(slides, genes)``.
    slides
        The group of slides (ids from ``uns["stinfer"]["sample_id"]``), or a dict id -> slide.
    genes
        The evaluated gene panel (present in every slide).
    protocol
        ``"intra_slice"`` (each slide split 7:1:2 per seed), ``"cross_slice"`` (train on each
        slide, test on every other) or ``"leave_one_patient_out"`` (see ``patient_key``).
    seeds
        One run per seed (split and model seeds).
    model_name
        The ``model`` column; default the model's class name.
    predictions
        When a dict is given, each run's prediction AnnData is stored in it under
        ``(model, protocol, train_slice, test_slice, seed)``.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, protocol, train_slice, test_slice, seed, mode``, every scalar of
        :class:`~stinfer.metrics.ExpressionMetrics`, ``train_seconds``,
        ``predict_seconds``, ``cpu_seconds``, ``peak_rss_mb`` (peak RSS of the process during
        training and prediction, see :class:`PeakMemory`), ``rss_increase_mb``,
        ``peak_gpu_mb`` (NaN without CUDA), and for intra-slice ``n_train``, ``n_val``: the
        rows of :func:`run_unit`, one unit per task.
    """
    genes = [str(gene) for gene in genes]
    rows = []
    for task in protocol_tasks(slides, protocol, seeds, patient_key):
        logger.info(
            "%s: train %s, test %s, seed %d",
            task.protocol,
            task.train_name,
            task.test_name,
            task.seed,
        )
        unit = run_unit(
            lambda task=task: model_factory(task.train_slides, list(genes), task.seed),
            [(task.test_name, task.test_slide)],
            genes,
        )
        name = model_name or type(unit.model).__name__
        if predictions is not None:
            key = (name, task.protocol, task.train_name, task.test_name, task.seed)
            predictions[key] = unit.predictions[0].prediction
        for row in unit.rows:
            rows.append(
                {
                    "model": name,
                    "protocol": task.protocol,
                    "train_slice": task.train_name,
                    "test_slice": task.test_name,
                    "seed": task.seed,
                    **row,
                    **task.extra,
                }
            )
    return pd.DataFrame(rows)


_KEY_COLUMNS = ("model", "protocol", "train_slice", "test_slice", "seed")


def aggregate(df: pd.DataFrame, by: Sequence[str] = ("model", "protocol")) -> pd.DataFrame:
    """Mean and sample standard deviation of every numeric column over pairs and seeds.

    Parameters
    ----------
    df
        Rows of :func:`run_protocol` (several models/protocols may be concatenated).
    by
        Grouping columns; the rest (train/test slices, seeds) are averaged over.

    Returns
    -------
    pandas.DataFrame
        One row per group: ``<metric>_mean`` and ``<metric>_sd`` (ddof=1; NaN for one run)
        for every numeric column, and ``n_runs``.
    """
    by = list(by)
    numeric = [
        column
        for column in df.columns
        if column not in _KEY_COLUMNS
        and column not in by
        and pd.api.types.is_numeric_dtype(df[column])
        and not pd.api.types.is_bool_dtype(df[column])
    ]
    grouped = df.groupby(by, sort=False)[numeric]
    means = grouped.mean().add_suffix("_mean")
    sds = grouped.std(ddof=1).add_suffix("_sd")
    columns = [name for metric in numeric for name in (f"{metric}_mean", f"{metric}_sd")]
    out = pd.concat([means, sds], axis=1)[columns]
    out["n_runs"] = df.groupby(by, sort=False).size()
    return out.reset_index()
