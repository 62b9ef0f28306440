"""One benchmark command: models x protocols x cohorts from one YAML, resumable.

:func:`run_benchmark` reads a :class:`BenchmarkConfig` (see :func:`load_config` for the YAML
schema; ``benchmarks/*.yaml`` are examples), loads each cohort (prepared ``.h5ad`` slides,
legacy-ST files prepared on the fly, or synthetic sections), chooses its gene panel once, and
runs every *cell*: one model trained on one training set (a slide, a slide's 7:1:2 split, or a
leave-one-patient-out fold) with one seed, then predicted on each of that training set's test
slides (so a cross-slice model trained on C2 is trained once and tested on C3 and C4). Each
test prediction is one row of ``results.csv`` with every metric of
:func:`stinfer.metrics.evaluate_expression`, the domain ARI (:mod:`.domains`) when the
slide is annotated, the training and prediction seconds and the peak memory.

Leakage rules are those of :mod:`stinfer.evaluate.protocols`: models receive test slides only
through :func:`~stinfer.evaluate.protocols.strip_counts`.

Resuming. Each finished cell is written into ``<out>/cells/<cell id>/`` (the folder layout is
:mod:`stinfer.evaluate.benchmark_layout`, which the report reads too) in one atomic rename
(its rows, blue-shift rows, predictions and latents, then ``done.json``), so a run killed at any
moment leaves only whole cells behind; a rerun with the same ``--out`` skips every cell whose
folder exists and whose id matches. The id hashes everything the result depends on (cohort
data and image degradation, gene panel, model settings and inference modes, protocol, training
and test slices, seed, patch spec, domain and blue-shift settings), so changing a model's
options recomputes that model's cells only. Cell order: closed-form baselines first, then the
networks. ``results.csv``, ``robustness.csv``, ``summary.md`` and the figures are rebuilt from
the cells at the end of every run (and the CSVs after every cell).

Failures and workers. Every cell left to compute runs through :func:`compute_cell`: in this
process one after the other (``workers=1``), or with ``workers > 1`` as Ray tasks
(:mod:`stinfer.distributed`; the optional extra ``pip install -e ".[distributed]"``), one CPU
and ``cores // workers`` torch threads each, that many at a time, every task running the same
:func:`compute_cell` and writing its cell folder atomically. Without Ray, ``workers > 1`` warns
and runs in this process. A cell that raises is recorded (``failures.csv``: the cell and its
one-line error; a bug's traceback is logged) and the other cells go on; its folder is not
written, so a rerun tries it again. The tables and the report are built from the cells in
cell order, never in the order they finished, so both ways write the same files. A seeded
training gives the same numbers on a worker as here when both run with the same number of
torch threads (torch's CPU sums depend on it; the tests pin this with one thread each);
otherwise they agree to rounding (~1e-3 relative for a 1-epoch STEvs).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.data.patches import PatchSpec, spot_patches
from stinfer.distributed import (
    RAY_INSTALL,
    finished_tasks,
    import_ray,
    ray_session,
    remote_task,
    threads_per_worker,
)
from stinfer.errors import InputError
from stinfer.evaluate.benchmark_layout import (
    CELL_DONE,
    CELLS_DIR,
    FAILURES_FILE,
    LATENTS_FILE,
    MANIFEST,
    cell_folder,
    is_own_output,
    model_label,
    per_gene_path,
    prediction_path,
    safe_name,
)
from stinfer.evaluate.config_checks import (
    checked_dataclass,
    checked_value,
    unknown_keys_message,
)
from stinfer.evaluate.protocols import (
    PROTOCOLS,
    EvaluationTask,
    UnitPrediction,
    protocol_tasks,
    run_unit,
    strip_counts,
)
from stinfer.evaluate.robustness import (
    BLUE_SHIFT_ALPHAS,
    ImageDegradation,
    blue_shift_sweep,
    degrade_slide_image,
    model_patch_spec,
)
from stinfer.io import READERS, read_slide
from stinfer.io.slide_data import slide_id
from stinfer.metrics import DOMAIN_METHODS
from stinfer.modalities import MODALITIES, MODALITY_ALIASES, canonical_modality
from stinfer.models import create_model, list_models, model_config, model_type

logger = logging.getLogger("stinfer")

__all__ = [
    "BenchmarkConfig",
    "CohortSpec",
    "DomainSpec",
    "FigureSpec",
    "GeneSpec",
    "ModelSpec",
    "RobustnessSpec",
    "build_model",
    "compute_cell",
    "load_config",
    "parse_config",
    "run_benchmark",
]

COHORT_FORMATS = (*READERS, "synthetic")  # every reader of stinfer.io.read_slide, synthetic
DATA_ROOT = "${data_root}"


# --------------------------------------------------------------------------- configuration
@dataclass
class GeneSpec:
    """The gene panel of a cohort.

    Chosen by :func:`stinfer.preprocess.select_genes` as ``docs/DESIGN.md`` "Genes" defines it.
    """

    method: str = "svg"  # STEvs D.1.4: Moran's I SVGs in >= 2 slides; "hvg"; or "list"
    n_genes: int = 300  # STEvs D.1.4 (the paper's panel size)
    genes: list[str] | None = None  # explicit panel (method "list"), e.g. a marker panel


@dataclass
class CohortSpec:
    """A group of slides evaluated together (e.g. one patient's serial sections).

    ``format``: any format of :func:`stinfer.io.read_slide` (``h5ad``, ``legacy-st``,
    ``visium``, ``visium-hd``, ``hest``), each slide a mapping of its reader's arguments (as
    for ``stinfer prepare``: ``{counts, spots, image, sample_id}`` for legacy ST, ``{path,
    image}`` for Visium, ``{sample_id}`` for HEST, whose ``root`` defaults to the cohort's) or
    a string (the ``path``; a HEST ``sample_id``); or ``"synthetic"`` (``synthetic`` holds
    :class:`~stinfer.data.synthetic.SyntheticConfig` fields). Relative paths are taken under
    ``root``, which may be ``${data_root}`` (given on the command line with ``--data-root``).

    ``image_degradation`` (YAML: a mapping of
    :class:`~stinfer.evaluate.robustness.ImageDegradation` fields) degrades every slide's H&E
    image before any model reads it: lower resolution, blur, stain varying between sections.
    """

    name: str
    format: str = "h5ad"
    root: str | None = None
    slides: list[Any] = field(default_factory=list)
    synthetic: dict[str, Any] = field(default_factory=dict)
    patient_ids: dict[str, str] | None = None  # slide id -> patient (leave-one-patient-out)
    genes: GeneSpec = field(default_factory=GeneSpec)
    image_degradation: ImageDegradation | None = None  # issue 14: low-res, blurred, stained


@dataclass
class ModelSpec:
    """One model of the grid: a registered ``type`` (:data:`stinfer.models.MODEL_TYPES`, an
    expression model) and its options (config overrides, ``preset``; see :func:`build_model`).

    ``modes`` (STEvs only) are the inference modes evaluated from one training: ``fused`` and
    the single-modality rows of STEvs Table 5, ``image`` and ``spatial``.
    """

    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    modes: tuple[str, ...] = ("fused",)
    group: str = "model"  # "model" or "ablation" (which summary table it appears in)
    protocols: tuple[str, ...] | None = None  # run under these protocols only (None: all)


@dataclass
class DomainSpec:
    """Spatial-domain recovery (STEvs Fig. 5, Table 16) on annotated test slides."""

    key: str = "domain"  # obs column with the annotation
    method: str = "kmeans"  # STEvs Appendix H: k-means on the predicted expression; "gmm", "leiden"
    n_pcs: int = 30


@dataclass
class RobustnessSpec:
    """Blue-shift sweep (STEvs Appendix J.1, Eq. 40) on the test images of chosen models."""

    alphas: tuple[float, ...] = BLUE_SHIFT_ALPHAS  # 0, 0.1, ..., 0.8 (issue 4)
    models: list[str] | None = None  # model names; None: every model that reads the image
    protocols: tuple[str, ...] = ("cross_slice",)


@dataclass
class UncertaintySpec:
    """Predictive uncertainty of the STEvs models (issue 19): coverage before and after the
    calibration, interval width, sd vs error (:func:`stinfer.evaluate.uncertainty.
    uncertainty_metrics`), and a truth / mean / sd / error figure per test slide."""

    levels: tuple[float, ...] = (0.5, 0.9)
    samples: int = 30  # posterior samples of the latent per spot
    figure_genes: int = 3  # the test slide's most variable genes of the panel (0: no figure)


@dataclass
class FigureSpec:
    """Which figures to draw (all from the cells' saved predictions)."""

    genes: list[str] | None = None  # genes of the true-vs-predicted maps; default the top SVG
    pair: tuple[str, str] | None = None  # (train, test) slide of the maps; default the first
    metrics: tuple[str, ...] = (
        "pcc_median",
        "scc_median",
        "pcc_median_depthnorm",
        "scc_median_depthnorm",
        "mse",
    )
    umap: bool = True  # latent UMAPs by slice and by domain (STEvs Fig. 4), STEvs models only
    robustness_metric: str = "pcc_median"


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on; built from YAML by :func:`parse_config`."""

    name: str
    cohorts: list[CohortSpec]
    models: list[ModelSpec]
    protocols: tuple[str, ...] = ("cross_slice", "intra_slice")
    seeds: tuple[int, ...] = (0,)
    patch: PatchSpec = field(default_factory=PatchSpec)  # STEvs D.1.2: 160-px spot patches
    domains: DomainSpec | None = None
    robustness: RobustnessSpec | None = None
    uncertainty: UncertaintySpec | None = None
    figures: FigureSpec = field(default_factory=FigureSpec)
    save_predictions: bool = True


# --------------------------------------------------------------------------- YAML parsing
def _substitute(value: Any, data_root: str | None) -> Any:
    if isinstance(value, str) and DATA_ROOT in value:
        if data_root is None:
            raise InputError(
                f"the config refers to {DATA_ROOT} ({value!r}); give the data folder with "
                "--data-root DIR (or data_root=...)."
            )
        return value.replace(DATA_ROOT, str(data_root))
    if isinstance(value, Mapping):
        return {key: _substitute(item, data_root) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, data_root) for item in value]
    return value


def _dataclass_from(cls, values: Mapping[str, Any] | None, where: str):
    """``cls`` from a YAML mapping, every key and value type checked (see :mod:`.config_checks`)."""
    return checked_dataclass(cls, values, where)


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    """A YAML list of strings (a single string is refused, not split into letters)."""
    return tuple(checked_value(value, list[str], where))


def _check_keys(entry: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(map(str, entry)) - set(allowed))
    if unknown:
        raise InputError(f"{where}: {unknown_keys_message(unknown, allowed)}.")


def _mapping(value: Any, where: str, example: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: expected a mapping, e.g. {example}, got {value!r}.")
    return dict(value)


def _parse_models(raw: Any, source: str) -> list[ModelSpec]:
    if not isinstance(raw, list) or not raw:
        raise InputError(
            f"{source}: models: expected a non-empty list of {{name, type, ...}}, got {raw!r}."
        )
    models = []
    for index, entry in enumerate(raw):
        where = f"{source}: models[{index}]"
        if not isinstance(entry, Mapping) or "type" not in entry:
            raise InputError(f"{where} needs a `type` (one of {_types()}); got {entry!r}.")
        entry = dict(entry)
        kind = checked_value(entry.pop("type"), str, f"{where}.type")
        if kind not in _types():
            close = difflib.get_close_matches(kind, _types(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{where}.type {kind!r} is not one of {_types()}{hint}.")
        name = checked_value(entry.pop("name", kind), str, f"{where}.name")
        given = _string_list(entry.pop("modes", ["fused"]), f"{where}.modes")
        known = [mode for mode in given if mode in MODALITIES or mode in MODALITY_ALIASES]
        modes = tuple(canonical_modality(mode) for mode in known)
        if len(known) < len(given) or (kind != "stevs" and modes != ("fused",)):
            raise InputError(
                f"{where}.modes {list(given)}: only STEvs has modes, "
                f"one or more of {list(MODALITIES)}."
            )
        protocols = entry.pop("protocols", None)
        if protocols is not None:
            protocols = _string_list(protocols, f"{where}.protocols")
        options = dict(entry)
        preset = options.pop("preset", "fast" if model_type(kind).presets else None)
        try:  # the options as build_model reads them: unknown fields fail now, not in a cell
            model_config(kind, preset, 0, **options)
        except InputError as error:
            raise InputError(f"{where} ({name}): {error}") from error
        models.append(
            ModelSpec(name=name, type=kind, options=entry, modes=modes, protocols=protocols)
        )
    return models


ABLATION_KEYS = ("base", "common", "variants", "prefix", "include_base", "protocols")


def _parse_ablations(raw: Any, source: str) -> list[ModelSpec]:
    """Expand the ``ablations:`` section into STEvs model specs (one per variant)."""
    from stinfer.evaluate.ablations import deep_merge_loose, stevs_variant_config, variant_overrides

    where = f"{source}: ablations"
    raw = _mapping(raw, where, "{base: fast, variants: [concat]}")
    _check_keys(raw, ABLATION_KEYS, where)
    base = checked_value(raw.get("base", "fast"), str, f"{where}.base")
    common = checked_value(raw.get("common") or {}, dict[str, Any], f"{where}.common")
    prefix = checked_value(raw.get("prefix", "STEvs"), str, f"{where}.prefix")
    variants = checked_value(raw.get("variants") or [], list[Any], f"{where}.variants")
    include_base = checked_value(raw.get("include_base", True), bool, f"{where}.include_base")
    protocols = raw.get("protocols")
    if protocols is not None:
        protocols = _string_list(protocols, f"{where}.protocols")
    specs = []
    entries = [("full", {}, f"{where}.common")] if include_base else []
    for index, entry in enumerate(variants):
        try:
            entries.append((*variant_overrides(entry), f"{where}.variants[{index}]"))
        except InputError as error:
            raise InputError(f"{where}.variants[{index}]: {error}") from error
    for name, overrides, entry_where in entries:
        options = deep_merge_loose(common, overrides)
        try:
            stevs_variant_config(base, options)  # validate now, not hours into the run
        except InputError as error:
            raise InputError(f"{entry_where}: {error}") from error
        label = prefix if name == "full" else f"{prefix} {name}"
        specs.append(
            ModelSpec(
                name=label,
                type="stevs",
                options={"preset": base, **options},
                group="ablation",
                protocols=protocols,
            )
        )
    return specs


def _types() -> list[str]:
    """The model types a benchmark runs: every registered expression model."""
    return sorted(list_models("expression"))


TOP_LEVEL_KEYS = (
    "name",
    "cohorts",
    "models",
    "ablations",
    "protocols",
    "seeds",
    "patch",
    "domains",
    "robustness",
    "uncertainty",
    "figures",
    "save_predictions",
)
SLIDE_PATH_KEYS = ("path", "image", "counts", "spots", "root")  # resolved under cohort.root
SLIDE_NUMBER_KEYS = ("pixel_size_um", "bin_size_um", "spot_diameter_um")
SLIDE_STRING_KEY = {"hest": "sample_id"}  # what a bare string entry names (else "path")


def _reader_arguments(cohort_format: str) -> tuple[list[str], list[str]]:
    """``(every argument, the required ones)`` of the reader of ``cohort_format``; a HEST
    slide's ``root`` defaults to the cohort's."""
    import inspect

    parameters = inspect.signature(READERS[cohort_format]).parameters.values()
    names = [p.name for p in parameters]
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    if cohort_format == "hest":
        required.remove("root")
    return names, required


def _slide_entry(entry: Any, cohort_format: str) -> Any:
    """A string slide entry as the mapping it stands for (``{path: ...}``, HEST ``{sample_id}``)."""
    if isinstance(entry, str):
        return {SLIDE_STRING_KEY.get(cohort_format, "path"): entry}
    return entry


def _check_slide_entries(slides: Any, cohort_format: str, where: str) -> None:
    """The ``slides`` of one cohort: a list of paths or mappings of the reader's arguments."""
    slides = checked_value(slides, list[Any], where)
    if cohort_format not in READERS:
        return
    allowed, required = _reader_arguments(cohort_format)
    for index, entry in enumerate(slides):
        at = f"{where}[{index}]"
        expected = f"a path or a mapping of {', '.join(allowed)}"
        entry = _mapping(_slide_entry(entry, cohort_format), at, expected)
        _check_keys(entry, allowed, at)
        for key, value in entry.items():
            kind = float if key in SLIDE_NUMBER_KEYS else str
            checked_value(value, kind if key in required else kind | None, f"{at}.{key}")
        missing = [key for key in required if key not in entry]
        if missing:
            raise InputError(
                f"{at}: a {cohort_format} slide needs {', '.join(missing)} (the reader takes "
                f"{', '.join(allowed)}); got {entry!r}."
            )


def _parse_cohort(entry: Any, index: int, source: str) -> CohortSpec:
    where = f"{source}: cohorts[{index}]"
    entry = _mapping(entry, where, "{name: C, format: h5ad, slides: [C2.h5ad]}")
    _check_keys(entry, [f.name for f in dataclasses.fields(CohortSpec)], where)
    cohort_format = checked_value(entry.get("format", "h5ad"), str, f"{where}.format")
    if cohort_format not in COHORT_FORMATS:
        raise InputError(f"{where}.format {cohort_format!r} is not one of {COHORT_FORMATS}.")
    entry["genes"] = _dataclass_from(GeneSpec, entry.get("genes"), f"{where}.genes")
    if entry.get("image_degradation") is not None:
        at = f"{where}.image_degradation"
        if not isinstance(entry["image_degradation"], Mapping):
            raise InputError(f"{at}: expected a mapping of fields, e.g. {{blur_sigma_um: 8}}.")
        entry["image_degradation"] = _dataclass_from(
            ImageDegradation, entry["image_degradation"], at
        )
    if "slides" in entry:
        _check_slide_entries(entry["slides"], cohort_format, f"{where}.slides")
    cohort = _dataclass_from(CohortSpec, entry, where)
    if cohort.format == "synthetic":
        from stinfer.data.synthetic import SyntheticConfig

        _dataclass_from(SyntheticConfig, cohort.synthetic, f"{where}.synthetic")
    return cohort


def parse_config(
    raw: Mapping[str, Any], source: str = "config", data_root: str | os.PathLike | None = None
) -> BenchmarkConfig:
    """A :class:`BenchmarkConfig` from the YAML mapping; see :func:`load_config` for the keys.

    Every key and the type of every value are checked here, before any cell runs; an
    :class:`InputError` names ``source`` (the file) and the key path, e.g.
    ``x.yaml: cohorts[0].slides: expected a list, got 'A1'``.
    """
    if not isinstance(raw, Mapping):
        raise InputError(f"{source}: the config must be a YAML mapping, got {raw!r}.")
    raw = _substitute(dict(raw), None if data_root is None else str(data_root))
    unknown = sorted(set(map(str, raw)) - set(TOP_LEVEL_KEYS))
    if unknown:
        message = unknown_keys_message(unknown, TOP_LEVEL_KEYS, what="top-level keys")
        raise InputError(f"{source}: {message}.")
    name = checked_value(raw.get("name", Path(source).stem), str, f"{source}: name")
    cohort_entries = checked_value(raw.get("cohorts") or [], list[Any], f"{source}: cohorts")
    cohorts = [_parse_cohort(entry, index, source) for index, entry in enumerate(cohort_entries)]
    if not cohorts:
        raise InputError(f"{source}: `cohorts` must list at least one cohort.")
    models = _parse_models(raw.get("models"), source) if raw.get("models") else []
    if raw.get("ablations"):
        models += _parse_ablations(raw["ablations"], source)
    if not models:
        raise InputError(f"{source}: give `models` and/or `ablations`.")
    names = [model.name for model in models]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise InputError(f"{source}: model names must be unique; repeated: {duplicated}.")
    protocols = _string_list(
        raw.get("protocols") or ["cross_slice", "intra_slice"], f"{source}: protocols"
    )
    bad = [p for p in protocols if p not in PROTOCOLS]
    bad += [p for m in models for p in (m.protocols or ()) if p not in PROTOCOLS]
    if bad:
        raise InputError(f"{source}: unknown protocols {bad}; use {list(PROTOCOLS)}.")
    seeds = tuple(checked_value(raw.get("seeds", [0]), list[int], f"{source}: seeds"))
    if not seeds or any(seed < 0 for seed in seeds):
        raise InputError(f"{source}: seeds: expected a non-empty list of integers >= 0.")
    robustness = None
    if raw.get("robustness"):
        robustness = _dataclass_from(RobustnessSpec, raw["robustness"], f"{source}: robustness")
        unknown_models = sorted(set(robustness.models or []) - set(names))
        if unknown_models:
            raise InputError(f"{source}: robustness.models {unknown_models} are not models.")
    uncertainty = None
    if raw.get("uncertainty"):
        entry = {} if raw["uncertainty"] is True else raw["uncertainty"]
        uncertainty = _dataclass_from(UncertaintySpec, entry, f"{source}: uncertainty")
        from stinfer.models.uncertainty import UncertaintyConfig

        UncertaintyConfig(samples=uncertainty.samples, levels=uncertainty.levels)  # checks them
    domains = raw.get("domains")
    if domains is not None and not isinstance(domains, (bool, Mapping)):
        raise InputError(
            f"{source}: domains: expected true, false or a mapping such as {{key: domain}}, "
            f"got {domains!r}."
        )
    domain_spec = (
        None
        if not domains
        else _dataclass_from(DomainSpec, {} if domains is True else domains, f"{source}: domains")
    )
    if domain_spec is not None and domain_spec.method not in DOMAIN_METHODS:
        raise InputError(
            f"{source}: domains.method {domain_spec.method!r} is not one of {list(DOMAIN_METHODS)}."
        )
    return BenchmarkConfig(
        name=name,
        cohorts=cohorts,
        models=models,
        protocols=protocols,
        seeds=seeds,
        patch=_dataclass_from(PatchSpec, raw.get("patch"), f"{source}: patch"),
        domains=domain_spec,
        robustness=robustness,
        uncertainty=uncertainty,
        figures=_dataclass_from(FigureSpec, raw.get("figures"), f"{source}: figures"),
        save_predictions=checked_value(
            raw.get("save_predictions", True), bool, f"{source}: save_predictions"
        ),
    )


def load_config(path: str | os.PathLike, data_root: str | os.PathLike | None = None):
    """Read a benchmark YAML into a :class:`BenchmarkConfig`.

    Keys (see ``benchmarks/her2st_patient_c.yaml`` and ``benchmarks/synthetic_ci.yaml``)::

        name: her2st_patient_c
        cohorts:                      # groups of slides evaluated together
          - name: patient_c
            format: legacy-st         # h5ad | legacy-st | synthetic
            root: ${data_root}        # --data-root on the command line
            slides: [{sample_id: C2, counts: counts/C2.tsv.gz, spots: ..., image: ...}, ...]
            genes: {method: svg, n_genes: 300}
            image_degradation: {pixel_size_um: 12.7}  # optional: also blur_sigma_um,
                                                      # stain_variation, seed
        protocols: [cross_slice, intra_slice]   # and/or leave_one_patient_out
        seeds: [0]
        models:                       # type: an expression model of stinfer.models.list_models()
          - {name: Mean, type: mean}
          - {name: "Ridge (colour)", type: feature_ridge, features: color}
          - {name: STEvs, type: stevs, preset: fast, modes: [fused, image, spatial]}
        ablations: {base: fast, variants: [w/o image decoder, concat, ...]}
        domains: {key: domain}        # ARI on annotated test slides; method: kmeans/gmm/leiden
        robustness: {models: [STEvs], alphas: [0, 0.1, ...]}
        uncertainty: {levels: [0.5, 0.9], samples: 30}  # STEvs: coverage, sd vs error
        figures: {genes: [ERBB2], pair: [C2, C3]}
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"benchmark config {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML: {error}") from error
    return parse_config(raw, str(path), data_root)


# --------------------------------------------------------------------------- models
def build_model(
    kind: str,
    slides: list[ad.AnnData],
    genes: list[str],
    seed: int,
    options: Mapping[str, Any],
    patches: list | None,
) -> Any:
    """A cell's model, created through the registry (:func:`stinfer.models.create_model`).

    ``kind`` is a registered expression model type; ``options`` the YAML entry's config
    overrides plus ``preset`` (``fast`` when omitted, for models with presets: the harness
    runs on CPUs); ``patches`` the training slides' patches (one array each) in the model's
    patch spec, or ``None``, passed to the models that take them
    (:attr:`~stinfer.models.ModelType.accepts_patches`). STEvs trains without a progress bar.
    """
    entry = model_type(kind)
    options = dict(options)
    preset = options.pop("preset", "fast" if entry.presets else None)
    config = model_config(kind, preset, seed, **options)
    if kind == "stevs":
        config.trainer.progress_bar = False
    extra = {"patches": patches} if entry.accepts_patches else {}
    return create_model(kind, slides, genes, config=config, **extra)


# --------------------------------------------------------------------------- cohorts
def _resolve(root: str | None, path: str) -> Path:
    candidate = Path(os.path.expanduser(str(path)))
    if candidate.is_absolute() or root is None:
        return candidate
    return Path(os.path.expanduser(root)) / candidate


def load_cohort(cohort: CohortSpec, data_dir: Path) -> list[ad.AnnData]:
    """The cohort's slides (raw counts, coordinates, image metadata), in config order.

    Synthetic cohorts are generated once into ``data_dir`` and read back on later runs. With
    ``image_degradation``, each slide that has an image is replaced by a copy pointing to its
    degraded image, written once into ``data_dir/<cohort>/degraded``.
    """
    if cohort.format == "synthetic":
        slides = _synthetic_cohort(cohort, data_dir)
    else:
        slides = _read_cohort_slides(cohort)
    if cohort.patient_ids:
        for slide in slides:
            name = slide_id(slide)
            if name in cohort.patient_ids:
                slide.uns["stinfer"]["patient_id"] = str(cohort.patient_ids[name])
    if cohort.image_degradation is not None:
        degraded_dir = data_dir / safe_name(cohort.name) / "degraded"
        slides = [
            _degraded(slide, cohort.image_degradation, index, degraded_dir)
            for index, slide in enumerate(slides)
        ]
    return slides


def _read_cohort_slides(cohort: CohortSpec) -> list[ad.AnnData]:
    """Each slide through :func:`stinfer.io.read_slide` with the cohort's format."""
    if not cohort.slides:
        raise InputError(f"cohort {cohort.name!r}: `slides` is empty.")
    _check_slide_entries(cohort.slides, cohort.format, f"cohort {cohort.name!r}: slides")
    slides = []
    for entry in cohort.slides:
        arguments = dict(_slide_entry(entry, cohort.format))
        for key in SLIDE_PATH_KEYS:
            if arguments.get(key) is not None:
                arguments[key] = _resolve(cohort.root, arguments[key])
        if cohort.format == "hest" and arguments.get("root") is None:
            arguments["root"] = _resolve(None, cohort.root or ".")
        slides.append(read_slide(cohort.format, **arguments))
    return slides


def _degraded(
    slide: ad.AnnData, degradation: ImageDegradation, index: int, folder: Path
) -> ad.AnnData:
    """The slide with its image degraded; a slide without an image is returned as it is."""
    from stinfer.io.slide_data import slide_meta

    if slide_meta(slide)["image_path"] is None:
        logger.info("slide %s has no image: image_degradation skips it.", slide_id(slide))
        return slide
    return degrade_slide_image(slide, degradation, index, folder)


def _synthetic_cohort(cohort: CohortSpec, data_dir: Path) -> list[ad.AnnData]:
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
    from stinfer.io.atomic import write_h5ad, write_text
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.io.slide_data import prepare_for_h5ad

    config = _dataclass_from(SyntheticConfig, cohort.synthetic, f"cohort {cohort.name!r}")
    folder = data_dir / safe_name(cohort.name)
    marker = folder / "slides.json"
    wanted = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if marker.is_file() and json.loads(marker.read_text()).get("config") == wanted:
        names = json.loads(marker.read_text())["slides"]
        return [read_h5ad_slide(folder / f"{name}.h5ad") for name in names]
    logger.info("cohort %s: generating synthetic sections into %s", cohort.name, folder)
    slides = make_synthetic_sections(folder / "images", config, overwrite=True)
    names = []
    for slide in slides:
        name = slide_id(slide)
        write_h5ad(prepare_for_h5ad(slide), folder / f"{name}.h5ad", overwrite=True)
        names.append(name)
    write_text(json.dumps({"config": wanted, "slides": names}), marker, overwrite=True)
    return [read_h5ad_slide(folder / f"{name}.h5ad") for name in names]


def cohort_genes(cohort: CohortSpec, slides: Sequence[ad.AnnData]) -> list[str]:
    """The cohort's gene panel (:class:`GeneSpec`), checked against every slide."""
    from stinfer.preprocess import select_genes

    spec = cohort.genes
    if spec.genes:
        genes = [str(g) for g in spec.genes]
        for slide in slides:
            missing = [g for g in genes if g not in slide.var_names]
            if missing:
                raise InputError(
                    f"cohort {cohort.name!r}: slide {slide_id(slide)!r} lacks genes {missing[:5]}."
                )
        return genes
    if spec.method not in ("svg", "hvg"):
        raise InputError(
            f"cohort {cohort.name!r}: genes.method {spec.method!r}: use svg, hvg, or list genes."
        )
    return select_genes(list(slides), method=spec.method, n_genes=spec.n_genes)


# --------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One training: a model, a protocol, a training set and a seed, with its test slides."""

    cohort: str
    model: ModelSpec
    protocol: str
    train_name: str
    seed: int
    train_slides: list[ad.AnnData]
    tests: list[tuple[str, ad.AnnData]]  # (test slice name, test slide with counts)
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def cell_id(self) -> str:
        readable = "__".join(
            safe_name(part)
            for part in (self.cohort, self.model.name, self.protocol, self.train_name)
        )
        return f"{readable}__seed{self.seed}__{self.key[:10]}"


def _fingerprint(slides: Sequence[ad.AnnData]) -> str:
    """Cheap identity of a cohort's data: ids, shapes, spot and gene names, count totals."""
    digest = hashlib.sha256()
    for slide in slides:
        digest.update(slide_id(slide).encode())
        digest.update(str(slide.shape).encode())
        digest.update("|".join(map(str, slide.obs_names)).encode())
        digest.update(str(float(slide.X.sum())).encode())
    return digest.hexdigest()


def _cell_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def make_cells(
    config: BenchmarkConfig,
    cohort: CohortSpec,
    slides: list[ad.AnnData],
    genes: list[str],
) -> list[Cell]:
    """Every cell of one cohort, in a fixed order.

    Test tasks of :func:`~stinfer.evaluate.protocols.protocol_tasks` that share a training set
    and seed are merged into one cell (train once, test on each). Cells of the closed-form
    models (:attr:`~stinfer.models.ModelType.closed_form`) come first, then the networks; within each, protocol,
    model, training set and seed in config order: every baseline's table fills within minutes,
    and a run stopped early has finished the cheap rows.
    """
    fingerprint = _fingerprint(slides)
    by_id = {slide_id(s): s for s in slides}
    patient_key = cohort.patient_ids if cohort.patient_ids else "patient_id"
    cells = []
    for protocol in config.protocols:
        if protocol == "cross_slice" and len(by_id) < 2:
            logger.warning("cohort %s has one slide: no cross-slice cells.", cohort.name)
            continue
        tasks: list[EvaluationTask] = protocol_tasks(by_id, protocol, config.seeds, patient_key)
        groups: dict[tuple[str, int], list[EvaluationTask]] = {}
        for task in tasks:
            groups.setdefault((task.train_name, task.seed), []).append(task)
        for model in config.models:
            if model.protocols is not None and protocol not in model.protocols:
                continue
            for (train_name, seed), group in groups.items():
                parts = {
                    "data": fingerprint,
                    "genes": genes,
                    "model": {"type": model.type, "options": model.options},
                    "modes": list(model.modes),
                    "protocol": protocol,
                    "train": train_name,
                    "tests": [t.test_name for t in group],
                    "seed": seed,
                    "patch": dataclasses.asdict(config.patch),
                    "domains": None
                    if config.domains is None
                    else dataclasses.asdict(config.domains),
                    "robustness": _robustness_key(config, model, protocol),
                }
                if config.uncertainty is not None and model.type == "stevs":
                    # only when set, so the cells of runs without it keep their earlier ids
                    parts["uncertainty"] = dataclasses.asdict(config.uncertainty)
                if cohort.image_degradation is not None:
                    # only when set, so the cells of sharp cohorts keep their earlier ids
                    parts["image_degradation"] = dataclasses.asdict(cohort.image_degradation)
                key = _cell_key(parts)
                cells.append(
                    Cell(
                        cohort=cohort.name,
                        model=model,
                        protocol=protocol,
                        train_name=train_name,
                        seed=seed,
                        train_slides=group[0].train_slides,
                        tests=[(t.test_name, t.test_slide) for t in group],
                        extra=dict(group[0].extra),
                        key=key,
                    )
                )
    return sorted(cells, key=lambda cell: not model_type(cell.model.type).closed_form)


def _robustness_key(config: BenchmarkConfig, model: ModelSpec, protocol: str):
    return list(config.robustness.alphas) if _sweeps(config, model, protocol) else None


def _sweeps(config: BenchmarkConfig, model: ModelSpec, protocol: str) -> bool:
    spec = config.robustness
    if spec is None or protocol not in spec.protocols:
        return False
    if spec.models is None:
        return model_type(model.type).reads_images
    return model.name in spec.models


# --------------------------------------------------------------------------- patches
class PatchStore:
    """Spot patches of every slide, extracted once per (slide, patch spec) into a disk cache.

    Subsets of a slide (intra-slice train/test spots) are served by row indexing into the full
    slide's patches (matched by spot name), so the image is read once per slide.
    """

    def __init__(self, slides: Sequence[ad.AnnData], cache_dir: Path) -> None:
        self.slides = {slide_id(s): s for s in slides}
        self.cache_dir = cache_dir
        self._patches: dict[tuple[str, str], np.ndarray] = {}

    def full(self, name: str, spec: PatchSpec) -> np.ndarray:
        key = (name, json.dumps(dataclasses.asdict(spec), sort_keys=True))
        if key not in self._patches:
            self._patches[key] = spot_patches(self.slides[name], spec, cache_dir=self.cache_dir)
        return self._patches[key]

    def of(self, slide: ad.AnnData, spec: PatchSpec) -> np.ndarray | None:
        """Patches of ``slide`` (a slide of the cohort or a subset of one), or ``None``."""
        from stinfer.io.slide_data import slide_meta

        name = slide_id(slide)
        if name not in self.slides or slide_meta(slide)["image_path"] is None:
            return None
        full_slide = self.slides[name]
        rows = full_slide.obs_names.get_indexer(slide.obs_names)
        if (rows < 0).any():
            return None
        patches = self.full(name, spec)
        if len(rows) == full_slide.n_obs and np.array_equal(rows, np.arange(len(rows))):
            return np.asarray(patches)
        return np.ascontiguousarray(patches[rows])


# --------------------------------------------------------------------------- running a cell
def _feature_store_of(options: Mapping[str, Any]) -> str | None:
    """The feature store a model's options name (``feature_store`` of the ridge probe,
    ``training.feature_store`` of STEvs), or ``None``. Such a model is handed no patches: the
    harness's patches would be read instead of the store (patches given explicitly always
    are, for perturbed images)."""
    training = options.get("training")
    nested = training.get("feature_store") if isinstance(training, Mapping) else None
    return options.get("feature_store") or nested


def _model_options(
    model_spec: ModelSpec, config: BenchmarkConfig, cache_dir: Path | None = None
) -> dict[str, Any]:
    """The model's options with the benchmark's patch spec (and STEvs' patch cache) filled in."""
    options = copy.deepcopy(model_spec.options)
    training = options.get("training")
    if model_spec.type == "stnet" and isinstance(training, Mapping) and "patch" in training:
        # the harness extracts a patch-taking model's patches in options["patch"], ST-Net's
        # older flat name, which its config upgrade moves back to training.patch
        options["patch"] = training.pop("patch")
        if not training:
            del options["training"]
    if model_type(model_spec.type).accepts_patches and "patch" not in options:
        options["patch"] = config.patch
    elif isinstance(options.get("patch"), Mapping):
        options["patch"] = PatchSpec(**options["patch"])
    if model_spec.type == "stevs":
        training = options.setdefault("training", {})
        training.setdefault("patch", dataclasses.asdict(config.patch))
        if cache_dir is not None:
            training.setdefault("patch_cache_dir", str(cache_dir))
    return options


def _latents(model: Any, slides: Mapping[str, ad.AnnData]) -> dict[str, np.ndarray]:
    """Posterior means of the fused, image and spatial latents of each slide (STEvs only)."""
    if not hasattr(model, "get_latent"):
        return {}
    arrays = {}
    for name, slide in slides.items():
        for which in ("fused", "image", "spatial"):
            try:
                arrays[f"{which}/{name}"] = np.asarray(model.get_latent(strip_counts(slide), which))
            except (InputError, ValueError, RuntimeError) as error:
                logger.info("no %s latent for %s: %s", which, name, error)
        arrays[f"obs_names/{name}"] = np.asarray(slide.obs_names, dtype=str)
    return arrays


def run_cell(
    cell: Cell,
    config: BenchmarkConfig,
    genes: list[str],
    store: PatchStore,
    folder: Path,
) -> None:
    """Train and evaluate one cell; write its outputs into ``folder`` (a fresh directory).

    The training, predictions, metrics and cost are
    :func:`~stinfer.evaluate.protocols.run_unit`'s; the cell adds, inside the measured cost,
    domain recovery and expert weights per prediction, the blue-shift sweeps and the latents.
    """
    from stinfer.evaluate.domains import domain_labels, domain_recovery

    entry = model_type(cell.model.type)
    options = _model_options(cell.model, config, store.cache_dir)
    sweep_rows: list[pd.DataFrame] = []
    latents: dict[str, np.ndarray] = {}
    uncertain: dict[tuple[str, str], ad.AnnData] = {}

    def build() -> Any:
        train_patches = None
        if entry.accepts_patches and not _feature_store_of(options):
            spec = options.get("patch", config.patch)
            train_patches = [store.of(slide, spec) for slide in cell.train_slides]
            if any(p is None for p in train_patches):
                train_patches = None
        return build_model(
            cell.model.type, cell.train_slides, list(genes), cell.seed, options, train_patches
        )

    def test_patches(model: Any, test_slide: ad.AnnData) -> np.ndarray | None:
        if not entry.reads_images or _feature_store_of(options):
            return None  # the model reads its features from the store (patches would bypass it)
        return store.of(test_slide, model_patch_spec(model))

    def per_prediction(model: Any, unit: UnitPrediction) -> dict[str, Any]:
        columns = {}
        if config.uncertainty is not None and cell.model.type == "stevs":
            columns.update(uncertainty_columns(model, unit))
        if config.domains is None:
            return columns
        labels = domain_labels(unit.test_slide, config.domains.key)
        if labels is None or labels.notna().sum() < 2:
            return columns
        return columns | domain_recovery(
            unit.prediction,
            unit.test_slide[:, genes],
            config.domains.key,
            config.domains.method,
            config.domains.n_pcs,
            cell.seed,
        )

    def uncertainty_columns(model: Any, unit: UnitPrediction) -> dict[str, Any]:
        """Uncertainty metrics of the calibrated prediction, and of the uncalibrated one
        (suffix ``_uncalibrated``); keeps the calibrated prediction for the figure."""
        from stinfer.evaluate.protocols import strip_counts
        from stinfer.evaluate.uncertainty import uncertainty_metrics
        from stinfer.models.uncertainty import UncertaintyConfig

        spec = config.uncertainty
        stripped = strip_counts(unit.test_slide)
        patches = test_patches(model, unit.test_slide)
        columns: dict[str, Any] = {}
        for calibrated in (True, False):
            settings = UncertaintyConfig(spec.samples, spec.levels, cell.seed, calibrated)
            prediction = model.predict(stripped, unit.mode, patches, uncertainty=settings)
            metrics = uncertainty_metrics(prediction, unit.test_slide, cell.seed)
            suffix = "" if calibrated else "_uncalibrated"
            columns.update(
                {f"{key}{suffix}": value for key, value in metrics.items() if key != "calibrated"}
            )
            if calibrated:
                uncertain[(unit.mode, unit.test_name)] = prediction
        return columns

    def after_predictions(model: Any) -> None:
        for test_name, test_slide in cell.tests:
            patches = test_patches(model, test_slide)
            if not _sweeps(config, cell.model, cell.protocol) or patches is None:
                continue
            sweep = blue_shift_sweep(
                model,
                {test_name: test_slide},
                genes,
                config.robustness.alphas,
                model_name=cell.model.name,
                patches={test_name: patches},
            )
            sweep.insert(0, "cohort", cell.cohort)
            sweep.insert(2, "protocol", cell.protocol)
            sweep.insert(3, "train_slice", cell.train_name)
            sweep.insert(4, "seed", cell.seed)
            sweep_rows.append(sweep)
        if config.figures.umap and hasattr(model, "get_latent") and cell.protocol != "intra_slice":
            latents.update(
                _latents(
                    model,
                    {**{slide_id(s): s for s in cell.train_slides}, **dict(cell.tests)},
                )
            )

    unit = run_unit(
        build,
        cell.tests,
        genes,
        modes=cell.model.modes,
        test_patches=test_patches,
        on_prediction=per_prediction,
        after_predictions=after_predictions,
    )
    rows, predictions, per_gene = [], {}, {}
    for row, done in zip(unit.rows, unit.predictions, strict=True):
        name = model_label(cell.model.name, done.mode)
        predictions[(name, done.test_name)] = done.prediction
        per_gene[(name, done.test_name)] = done.evaluation.per_gene
        rows.append(
            {
                "cohort": cell.cohort,
                "model": name,
                "model_type": cell.model.type,
                "group": cell.model.group,
                "mode": done.mode,
                "protocol": cell.protocol,
                "train_slice": cell.train_name,
                "test_slice": done.test_name,
                "seed": cell.seed,
                **row,
                "n_train_spots": int(sum(s.n_obs for s in cell.train_slides)),
                **_expert_weights(done.prediction, done.mode),
                **cell.extra,
            }
        )
    pd.DataFrame(rows).to_csv(folder / "rows.csv", index=False)
    (folder / "per_gene").mkdir()
    for (name, test_name), table in per_gene.items():
        table.to_csv(per_gene_path(folder, name, test_name))
    if sweep_rows:
        pd.concat(sweep_rows, ignore_index=True).to_csv(folder / "robustness.csv", index=False)
    if config.save_predictions:
        from stinfer.io.slide_data import prepare_for_h5ad

        (folder / "predictions").mkdir()
        for (name, test_name), prediction in predictions.items():
            prepare_for_h5ad(prediction).write_h5ad(prediction_path(folder, name, test_name))
    if latents:
        np.savez_compressed(folder / LATENTS_FILE, **latents)
    if uncertain and config.uncertainty.figure_genes > 0:
        _uncertainty_figures(folder, cell, uncertain, config.uncertainty.figure_genes)


def _uncertainty_figures(
    folder: Path, cell: Cell, predictions: dict[tuple[str, str], ad.AnnData], n_genes: int
) -> None:
    """``uncertainty_<model>_<test>.png`` per prediction: truth, mean, sd, |error| of the
    test slide's most variable panel genes (:func:`stinfer.plot.plot_uncertainty_maps`)."""
    from stinfer.metrics import per_gene_pearson, top_variable_genes
    from stinfer.plot import plot_uncertainty_maps, save_figure

    tests = dict(cell.tests)
    for (mode, test_name), prediction in predictions.items():
        truth = tests[test_name][prediction.obs_names]
        genes = list(prediction.var_names)
        counts = truth[:, genes].X
        chosen = [genes[i] for i in top_variable_genes(counts, n_genes)]
        pcc, _ = per_gene_pearson(prediction.layers["predictive_mean"], counts)
        name = model_label(cell.model.name, mode)
        figure = plot_uncertainty_maps(
            truth, prediction, chosen, dict(zip(genes, pcc, strict=True)), model=name
        )
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{name}_{test_name}")
        save_figure(figure, folder / f"uncertainty_{safe}.png")


# --------------------------------------------------------------------------- the run
FAILURE_COLUMNS = ("cell", "cohort", "model", "protocol", "train_slice", "seed", "error")
"""The columns of ``failures.csv``: which cell raised and its one-line error."""


def compute_cell(
    cell: Cell, config: BenchmarkConfig, genes: list[str], store: PatchStore, out: Path
) -> dict[str, Any]:
    """Compute one cell into ``out``: :func:`run_cell` into ``<cell id>.partial``, then
    ``done.json``, then one rename to ``cells/<cell id>``; in-process and Ray tasks alike.

    Returns ``{"cell", "seconds", "error", "traceback"}``: ``error`` is ``""`` for a finished
    cell, else the one-line message of what the cell raised (nothing is written for it);
    ``traceback`` is set for a bug (not an :class:`InputError` or :class:`OSError`). Ctrl-C and
    SIGTERM (:class:`BaseException`) remove the partial folder and propagate.
    """
    import traceback

    folder = cell_folder(out, cell.cell_id)
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    try:
        run_cell(cell, config, genes, store, partial)
    except Exception as error:
        shutil.rmtree(partial, ignore_errors=True)
        message = " ".join(str(error).split())
        bug = not isinstance(error, (InputError, OSError))
        return {
            "cell": cell.cell_id,
            "seconds": time.perf_counter() - start,
            "error": f"{type(error).__name__}: {message}" if bug or not message else message,
            "traceback": traceback.format_exc() if bug else "",
        }
    except BaseException:  # Ctrl-C or SIGTERM: leave no half-written cell
        shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    (partial / CELL_DONE).write_text(
        json.dumps({"cell": cell.cell_id, "key": cell.key, "seconds": seconds}, indent=2)
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return {"cell": cell.cell_id, "seconds": seconds, "error": "", "traceback": ""}


@dataclass
class _Pending:
    """A cell left to compute, with what :func:`compute_cell` needs and its progress label."""

    cell: Cell
    genes: list[str]
    store: PatchStore
    label: str


def _cells_here(
    pending: Sequence[_Pending], config: BenchmarkConfig, out: Path, say: Callable[[str], None]
):
    """``(pending, outcome)`` of each cell, computed one after the other in this process."""
    for item in pending:
        say(f"{item.label}: running")
        yield item, compute_cell(item.cell, config, item.genes, item.store, out)


def _cells_on_ray(
    ray: Any,
    pending: Sequence[_Pending],
    config: BenchmarkConfig,
    out: Path,
    workers: int,
    say: Callable[[str], None],
):
    """``(pending, outcome)`` of each cell as its Ray task finishes: :func:`compute_cell` with
    ``cores // workers`` torch threads; each cohort's slides are put in Ray's object store
    once. A worker that died (e.g. out of memory) fails its cell only."""
    threads = threads_per_worker(workers)
    with ray_session(ray, workers):
        task = remote_task(ray)
        config_ref, stores, running = ray.put(config), {}, {}
        for item in pending:
            if item.cell.cohort not in stores:
                stores[item.cell.cohort] = ray.put(item.store)
            arguments = (item.cell, config_ref, item.genes, stores[item.cell.cohort], out)
            running[task.remote(threads, compute_cell, *arguments)] = item
        say(f"{len(pending)} cells on {workers} Ray workers, {threads} torch thread(s) each")
        for item, outcome, died in finished_tasks(ray, running):
            if died:
                outcome = {"cell": item.cell.cell_id, "seconds": float("nan"), "error": died}
            yield item, {"traceback": "", **outcome}


def _failure_row(cell: Cell, error: str) -> dict[str, Any]:
    return {
        "cell": cell.cell_id,
        "cohort": cell.cohort,
        "model": cell.model.name,
        "protocol": cell.protocol,
        "train_slice": cell.train_name,
        "seed": cell.seed,
        "error": error,
    }


def _write_failures(out: Path, rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """``out/failures.csv``: the cells that failed in this run; an earlier run's file is
    removed when none did."""
    from stinfer.io.atomic import write_text

    failures = pd.DataFrame(list(rows), columns=list(FAILURE_COLUMNS))
    if len(failures):
        write_text(failures.to_csv(index=False), out / FAILURES_FILE, overwrite=True)
    else:
        (out / FAILURES_FILE).unlink(missing_ok=True)
    return failures


@dataclass
class BenchmarkResult:
    """What :func:`run_benchmark` did: output paths and how many cells ran or were reused."""

    out: Path
    results: pd.DataFrame
    robustness: pd.DataFrame
    n_cells: int
    n_computed: int
    n_reused: int
    files: list[Path] = field(default_factory=list)
    failures: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FAILURE_COLUMNS))
    """The cells that raised, one row each (:data:`FAILURE_COLUMNS`); empty when none did."""


def _prepare_out(out: Path, config: BenchmarkConfig, overwrite: bool, config_text: str) -> None:
    """Make ``out`` ready for the run: new, empty, or an earlier benchmark output (the manifest).

    A non-empty folder without the manifest is refused, with or without ``overwrite``: stinfer
    never deletes what it did not write. With ``overwrite`` an earlier run's own outputs
    (:func:`~stinfer.evaluate.benchmark_layout.is_own_output`) are removed one by one; any
    other file in the folder is the user's and survives.
    """
    from stinfer.io.atomic import visible_entries, write_text

    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --out.")
    if visible_entries(out) and not manifest.is_file():
        raise InputError(
            f"{out}: folder exists, is not empty and is not a stinfer benchmark output (no "
            f"{MANIFEST}); stinfer never deletes files it did not write, not even with "
            "--overwrite: choose another --out or empty this folder."
        )
    if overwrite:
        for name in sorted(visible_entries(out)):
            if is_own_output(name) and name != MANIFEST:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / CELLS_DIR).mkdir(exist_ok=True)
    write_text(
        json.dumps({"name": config.name, "tool": "stinfer benchmark"}, indent=2),
        manifest,
        overwrite=True,
    )
    if config_text:
        write_text(config_text, out / "config.yaml", overwrite=True)


def _collect(out: Path, cells: Sequence[Cell], filename: str) -> pd.DataFrame:
    frames = []
    for cell in cells:
        path = cell_folder(out, cell.cell_id) / filename
        if (cell_folder(out, cell.cell_id) / CELL_DONE).is_file() and path.is_file():
            frames.append(pd.read_csv(path, keep_default_na=True))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write_tables(out: Path, cells: Sequence[Cell]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from stinfer.io.atomic import write_text

    results = _collect(out, cells, "rows.csv")
    robustness = _collect(out, cells, "robustness.csv")
    write_text(results.to_csv(index=False), out / "results.csv", overwrite=True)
    if not robustness.empty:
        write_text(robustness.to_csv(index=False), out / "robustness.csv", overwrite=True)
    return results, robustness


def _expert_weights(prediction: ad.AnnData, mode: str) -> dict[str, float]:
    """Mean per-spot precision weight of each expert of a fused STEvs prediction (issue 14:
    which modality the model trusted on this slide); empty for other models and modes."""
    from stinfer.models.stevs import EXPERT_WEIGHT_KEYS

    columns = {key: f"stevs_{key}" for key in EXPERT_WEIGHT_KEYS}  # STEvs.predict's obs names
    if mode != "fused" or not all(column in prediction.obs for column in columns.values()):
        return {}
    return {key: float(prediction.obs[column].mean()) for key, column in columns.items()}


def run_benchmark(
    config: BenchmarkConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    config_text: str = "",
    command: str | None = None,
    only_models: Sequence[str] | None = None,
    figures: bool = True,
    progress: Callable[[str], None] | None = print,
    workers: int = 1,
) -> BenchmarkResult:
    """Run (or resume) a benchmark into ``out``; see the module docstring.

    Parameters
    ----------
    config
        From :func:`load_config` / :func:`parse_config`.
    out
        Output folder: new, empty, or an earlier run of a benchmark (resumed).
    overwrite
        Discard an earlier run in ``out`` (all its cells) and start again.
    config_text
        The YAML text, copied to ``out/config.yaml`` for the record.
    command
        The command line that reproduces the run, quoted in ``summary.md``.
    only_models
        Run only these models' cells (the tables still include every finished cell).
    figures
        Draw the figures at the end.
    progress
        Called with one line per cell (default ``print``); ``None`` for silence.
    workers
        1: the cells one after the other in this process. More: that many cells at a time as
        Ray tasks (a local Ray with ``num_cpus=workers`` unless Ray is already initialised),
        each with ``cores // workers`` torch threads; without Ray installed, a warning and
        this process. The outputs are the same either way.

    Returns
    -------
    BenchmarkResult
        With :attr:`~BenchmarkResult.failures`: the cells that raised, also written to
        ``out/failures.csv``. A failed cell does not stop the others; rerun to retry it.
    """
    from stinfer.evaluate.report import write_figures, write_summary
    from stinfer.io.atomic import write_text

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers={workers!r}: give a whole number >= 1.")
    ray = import_ray() if workers > 1 else None
    if workers > 1 and ray is None:
        logger.warning(
            "%d workers run the cells as Ray tasks, and Ray is not installed (%s): running "
            "them one after the other in this process.",
            workers,
            RAY_INSTALL,
        )
    out = Path(out)
    say = progress or (lambda line: None)
    _prepare_out(out, config, overwrite, config_text)
    if only_models:
        missing = sorted(set(only_models) - {m.name for m in config.models})
        if missing:
            raise InputError(f"--only {missing}: no such model in the config.")
    all_cells: list[Cell] = []
    cohort_data: dict[str, tuple[list[ad.AnnData], list[str]]] = {}
    n_computed = n_reused = 0
    pending: list[_Pending] = []
    for cohort in config.cohorts:
        slides = load_cohort(cohort, out / "data")
        genes = cohort_genes(cohort, slides)
        write_text("\n".join(genes) + "\n", out / f"genes_{safe_name(cohort.name)}.txt", True)
        cohort_data[cohort.name] = (slides, genes)
        say(f"cohort {cohort.name}: {len(slides)} slides, {len(genes)} genes")
        cells = make_cells(config, cohort, slides, genes)
        all_cells += cells
        store = PatchStore(slides, out / "patch_cache")
        for index, cell in enumerate(cells, start=1):
            folder = cell_folder(out, cell.cell_id)
            label = (
                f"[{cohort.name} {index}/{len(cells)}] {cell.model.name} | {cell.protocol} | "
                f"train {cell.train_name} | seed {cell.seed}"
            )
            if (folder / CELL_DONE).is_file():
                n_reused += 1
                say(f"{label}: done earlier, skipped")
                continue
            if only_models and cell.model.name not in only_models:
                continue
            pending.append(_Pending(cell, genes, store, label))
    if ray is not None and pending:
        outcomes = _cells_on_ray(ray, pending, config, out.absolute(), workers, say)
    else:
        outcomes = _cells_here(pending, config, out, say)
    failed: list[dict[str, Any]] = []
    for item, outcome in outcomes:
        if outcome["error"]:
            failed.append(_failure_row(item.cell, outcome["error"]))
            say(f"{item.label}: failed: {outcome['error']}")
            if outcome["traceback"]:
                logger.warning("cell %s failed:\n%s", item.cell.cell_id, outcome["traceback"])
            continue
        n_computed += 1
        say(f"{item.label}: finished in {outcome['seconds']:.1f} s")
        _write_tables(out, all_cells)
    order = {item.cell.cell_id: index for index, item in enumerate(pending)}
    failures = _write_failures(out, sorted(failed, key=lambda row: order[row["cell"]]))
    results, robustness = _write_tables(out, all_cells)
    files = [out / "results.csv"]
    if not robustness.empty:
        files.append(out / "robustness.csv")
    files.append(write_summary(out, config, results, robustness, command))
    if figures and not results.empty:
        files += write_figures(out, config, results, robustness, all_cells, cohort_data)
    say(
        f"{len(all_cells)} cells: {n_computed} computed, {n_reused} reused, {len(failures)} "
        f"failed; wrote {out / 'results.csv'}, {out / 'summary.md'} and {out / 'figures'}"
    )
    if len(failures):
        files.append(out / FAILURES_FILE)
    return BenchmarkResult(
        out, results, robustness, len(all_cells), n_computed, n_reused, files, failures
    )
