"""STEvs cross-slice on HER2ST patient C (C2, C3, C4), beside its baselines; speed on the CPU.

For every section as the training slide, the `fast` STEvs preset is trained on it and predicts
the two other sections (fused and image-only), beside

- the mean-expression baseline (:class:`stinfer.models.baselines.MeanExpression`),
- the colour-statistics ridge (per-channel mean and sd of the 160-px patch,
  :class:`~stinfer.models.baselines.PatchFeatureRidge` with ``features="color"``),
- ridges on frozen, randomly initialised encoder features (the `fast` preset's CNN and, unless
  ``--skip-swin``, the paper's Swin-T): what a frozen encoder without pretrained weights knows.

Metrics are those of :mod:`stinfer.metrics` (``docs/DESIGN.md`` "Metrics"): MSE of log1p
counts, median PCC / SCC per gene on raw counts and after depth normalisation over the panel.
The gene panel is the group's (:func:`stinfer.preprocess.select_genes` over the three sections:
Moran's I SVGs in at least two sections, as ``docs/DESIGN.md`` "Genes" defines it). Each
model runs through :func:`stinfer.evaluate.protocols.run_unit`, the runner of ``stinfer
benchmark`` (test sections reach the models stripped of counts); its training seconds and the
process's peak RSS while it trained and predicted are recorded.

STEvs is trained once per ``--seeds`` value (training seed; the baselines are deterministic),
so the summary's mean +/- sd runs over pairs and seeds.

Speed (on unless ``--no-speed``): the `fast` preset's training time on one section is the
table's ``train_s``; an epoch over 4,000 synthetic spots with the encoder frozen and its
features cached (`fast`; `paper` measured on 500 spots and scaled); seconds per epoch of the
`paper` preset, extrapolated from a few timed batches. Report ``uptime``'s load average with
any timing: the machine may be shared.

    python benchmarks/stevs_her2st.py --data ../shared/data/her2st --out results/stevs_her2st \
        --seeds 0 1 2 --threads 1

writes ``cross_slice.csv``, ``cross_slice.md`` (the table, plus mean +/- sd over pairs) and
``speed.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SECTIONS = ("C2", "C3", "C4")
METRICS = (
    "mse",
    "pcc_median",
    "scc_median",
    "pcc_median_depthnorm",
    "scc_median_depthnorm",
)

logger = logging.getLogger("stinfer.benchmarks")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def read_sections(root: Path, names: list[str]) -> dict:
    """Read the legacy-ST sections with stinfer's reader (what `stinfer prepare` writes)."""
    from stinfer.io import read_legacy_st

    slides = {}
    for name in names:
        slides[name] = read_legacy_st(
            counts=root / "counts" / f"{name}.tsv.gz",
            spots=root / "spots" / f"{name}_selection.tsv",
            image=root / "images" / f"{name}.jpg",
            sample_id=name,
        )
    return slides


def fast_config(epochs: int | None, patch_cache: str):
    from stinfer.models.stevs import fast_preset

    config = fast_preset()
    config.training.patch_cache_dir = patch_cache
    trainer = config.trainer
    config.trainer = dataclasses.replace(
        trainer, progress_bar=False, max_epochs=epochs or trainer.max_epochs
    )
    return config


def baseline_models(train, genes, patch_cache: str, skip_swin: bool) -> dict:
    """The baselines, untrained: name -> model with ``train()`` / ``predict(slide)``."""
    from stinfer.models.baselines import MeanExpression, PatchFeatureRidge, PatchFeatureRidgeConfig

    def ridge(**values):
        return PatchFeatureRidge(
            [train], genes, PatchFeatureRidgeConfig(patch_cache_dir=patch_cache, **values)
        )

    models = {
        "mean": MeanExpression([train], genes),
        "colour_ridge": ridge(features="color"),
        "ridge_frozen_cnn": ridge(features="backbone", backbone="stinfer_histology_cnn"),
    }
    if not skip_swin:
        models["ridge_frozen_swin_t"] = ridge(
            features="backbone", backbone="swin_tiny_patch4_window7_224"
        )
    return models


def cross_slice_from(train_name: str, slides: dict, genes: list[str], args) -> list[dict]:
    """Rows of the table for one training section: every model on every other section.

    Each model is one unit of :func:`stinfer.evaluate.protocols.run_unit` (train, predict the
    counts-stripped test sections, evaluate, time and memory), as in ``stinfer benchmark``.
    """
    from stinfer.evaluate.protocols import run_unit
    from stinfer.models.stevs import STEvs

    torch.set_num_threads(args.threads)
    cache = str(args.workdir / "patch_cache")
    train = slides[train_name]
    tests = [(name, slides[name]) for name in args.sections if name != train_name]
    units = []  # (name, seed, runner result)
    for name, model in baseline_models(train, genes, cache, args.skip_swin).items():
        units.append((name, None, run_unit(lambda model=model: model, tests, genes)))
    for seed in args.seeds:
        config = fast_config(args.epochs, cache)
        config.trainer = dataclasses.replace(config.trainer, seed=seed)
        unit = run_unit(
            lambda config=config: STEvs([train], genes, config),
            tests,
            genes,
            modes=("fused", "image"),
        )
        units.append(("stevs_fast", seed, unit))
    rows = []
    for name, seed, unit in units:
        for result in unit.rows:
            label = f"{name}_{result['mode']}" if name == "stevs_fast" else name
            row = {"train": train_name, "test": result["test_slice"], "model": label, "seed": seed}
            row.update({key: result[key] for key in METRICS})
            row.update(
                train_s=result["train_seconds"],
                peak_rss_mb=result["peak_rss_mb"],
                load_avg=load_average(),
            )
            rows.append(row)
            print(
                f"{train_name}->{row['test']} {label:22s}"
                + " ".join(f"{key} {row[key]:.3f}" for key in METRICS),
                flush=True,
            )
    return rows


def cross_slice(slides: dict, genes: list[str], args) -> pd.DataFrame:
    """The whole table; ``args.jobs`` training sections run in parallel processes."""
    if args.jobs <= 1:
        rows = [
            row for name in args.sections for row in cross_slice_from(name, slides, genes, args)
        ]
        return pd.DataFrame(rows)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [
            pool.submit(cross_slice_from, name, slides, genes, args) for name in args.sections
        ]
        rows = [row for future in futures for row in future.result()]
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (floats to 3 decimals), without extra packages."""

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def markdown(table: pd.DataFrame) -> str:
    """The per-pair table and the mean +/- sd over pairs per model, as Markdown."""
    shown = table[["train", "test", "model", "seed", *METRICS, "train_s", "peak_rss_mb"]]
    lines = ["## Per (train, test) pair", "", markdown_table(shown), ""]
    grouped = table.groupby("model", sort=False)[list(METRICS)]
    mean, sd = grouped.mean(), grouped.std()
    summary = mean.round(3).astype(str) + " +/- " + sd.round(3).astype(str)
    lines += [
        "## Mean +/- sd over the pairs (and training seeds)",
        "",
        markdown_table(summary.reset_index()),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- speed
def frozen_epoch_seconds(
    workdir: Path, preset: str = "fast", n_spots: int = 4000, n_genes: int = 300
) -> dict:
    """Seconds per epoch of ``preset`` with a frozen encoder and cached features.

    Trains 1 and 3 epochs (weight averaging off, so no extra pass) on a synthetic section of
    ``n_spots``; the difference over 2 is one epoch without the one-off feature computation.
    ``seconds_per_epoch_4000_spots`` scales it linearly to 4,000 spots.
    """
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
    from stinfer.models.stevs import STEvs, resolve_config

    slide = make_synthetic_sections(
        workdir / f"speed_images_{n_spots}",
        SyntheticConfig(seed=0, n_sections=1, target_spots=n_spots, n_genes=n_genes),
        overwrite=True,
    )[0]
    seconds = {}
    for epochs in (1, 3):
        config = resolve_config(preset)
        config.module.freeze_encoder = True
        config.training.patch_cache_dir = str(workdir / "patch_cache")
        config.trainer = dataclasses.replace(
            config.trainer, max_epochs=epochs, progress_bar=False, swa_epoch_start=None
        )
        model = STEvs([slide], list(slide.var_names), config)
        seconds[epochs] = model.train().train_seconds
    per_epoch = (seconds[3] - seconds[1]) / 2
    return {
        "preset": preset,
        "n_spots": slide.n_obs,
        "n_genes": slide.n_vars,
        "seconds_per_epoch": per_epoch,
        "seconds_per_epoch_4000_spots": per_epoch * 4000 / slide.n_obs,
        "seconds_3_epochs": seconds[3],
        "load_avg": load_average(),
    }


def paper_epoch_seconds(slide, genes: list[str], n_batches: int = 2, batch: int = 16) -> dict:
    """Seconds per epoch of the `paper` preset on ``slide``, from ``n_batches`` timed steps.

    Each step is a full training step (Swin-T forward, 160-px image decoder, all losses,
    backward, AdamW) on ``batch`` spots; the epoch estimate scales the mean step time to the
    slide's spots.
    """
    from stinfer.models.stevs import STEvs, STEvsTask, paper_preset

    config = paper_preset()
    config.module.freeze_encoder = False  # what a user without cached features trains
    model = STEvs([slide], genes, config)
    times = []
    with model._training_sources([slide], None) as sources:
        dataset, transforms = model._dataset([slide], sources, with_counts=True)
        spots = dataset.__getitems__(list(range(batch)))
        task = STEvsTask(model.module, config.training, colour_transforms=transforms)
        optimizer = task.configure_optimizers()
        model.module.train()
        for step in range(n_batches + 1):
            start = time.perf_counter()
            loss = task.training_step(spots, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step:
                times.append(time.perf_counter() - start)
    per_spot = float(np.mean(times)) / batch
    return {
        "batch": batch,
        "timed_batches": n_batches,
        "seconds_per_step": float(np.mean(times)),
        "n_spots": slide.n_obs,
        "seconds_per_epoch_estimate": per_spot * slide.n_obs,
        "load_avg": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/her2st"))
    parser.add_argument("--out", type=Path, default=Path("results/stevs_her2st"))
    parser.add_argument("--workdir", type=Path, help="patch cache and scratch (default: --out)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS))
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--epochs", type=int, help="override the fast preset's epochs")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="STEvs training seeds (0)"
    )
    parser.add_argument("--skip-swin", action="store_true", help="no ridge on random Swin-T")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    parser.add_argument("--no-cross-slice", action="store_true", help="speed only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="training sections run in parallel processes (1)"
    )
    args = parser.parse_args()
    args.workdir = args.workdir or args.out
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)

    from stinfer.io.atomic import write_text
    from stinfer.preprocess import select_genes

    slides = read_sections(args.data, args.sections)
    genes = select_genes(list(slides.values()), n_genes=args.n_genes)
    write_text(json.dumps(genes), args.out / "genes.json", overwrite=True)
    print(f"{len(genes)} genes; load average {load_average()}", flush=True)
    if not args.no_cross_slice:
        table = cross_slice(slides, genes, args)
        write_text(table.to_csv(index=False), args.out / "cross_slice.csv", overwrite=True)
        write_text(markdown(table), args.out / "cross_slice.md", overwrite=True)
        print(markdown(table))
    if not args.no_speed:
        speed = {
            "frozen_cached_fast": frozen_epoch_seconds(args.workdir),
            "frozen_cached_paper": frozen_epoch_seconds(args.workdir, "paper", n_spots=500),
            "paper_preset": paper_epoch_seconds(slides[args.sections[0]], genes),
            "peak_rss_mb": peak_rss_mb(),
        }
        write_text(json.dumps(speed, indent=2), args.out / "speed.json", overwrite=True)
        print(json.dumps(speed, indent=2))


if __name__ == "__main__":
    main()
