"""`stinfer predict`: predict expression on a slide with a trained run (any expression model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stinfer.cli.options import HelpFormatter, checked_output, non_negative_int, positive_int
from stinfer.modalities import MODALITY_ALIASES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict expression on a slide from its H&E image and/or coordinates",
        description=(
            "Predict the run's genes at every spot of a prepared slide with the model the run "
            "folder holds (any expression model `stinfer train` saves: its config.json names "
            "the type). The output .h5ad holds, as every prediction stinfer writes: expected "
            "counts on the training slides' count scale in X; their log1p CP10k in "
            "layers['log1p_cp10k'], log1p(1e4 * X / library), the library (obs['library_size']) "
            "being each spot's predicted total over the predicted genes; and what X and each "
            "layer hold, with the gene panel the library sums over, in "
            "uns['stinfer']['expression']. A STEvs run also writes the NB inverse dispersion in "
            "layers['nb_theta'], the posterior mean in obsm['X_stevs'] and its variance in "
            "obsm['stevs_posterior_var'], and how much each spot trusted each expert (image, "
            "coordinates: their share of the fused posterior mean) in "
            "obs['stevs_image_expert_weight'] and obs['stevs_spatial_expert_weight']. The "
            "slide's counts are never read. Predictions are "
            "written to the file chunk by chunk and the image is read a chunk of spots at a "
            "time when the slide is large, so a Visium HD slide of 500,000 bins predicts in "
            "bounded memory (open the output with anndata.read_h5ad(path, backed='r'))."
        ),
        epilog=(
            "examples:\n"
            "  stinfer predict --run runs/c2 --slide C3.h5ad --out C3_pred.h5ad --mode fused\n"
            "  stinfer predict --run runs/hd --slide HD_008um.h5ad --out HD_pred.h5ad --no-tta\n"
            "  stinfer predict --run runs/c2 --slide C3.h5ad --out C3_pred.h5ad \\\n"
            "      --uncertainty --levels 0.5,0.8,0.95\n"
            "  stinfer predict --run runs/c2 --slides C3.h5ad C4.h5ad D1.h5ad --out-dir preds\n"
            "  stinfer predict --run runs/c2 --manifest slides.csv --out-dir preds --workers 8\n"
            "\n"
            "a cohort (--slides or --manifest, a CSV with a `path` column, relative to the "
            "manifest's folder, and an optional `name` column): one task per slide, each "
            "writing --out-dir/<name>.h5ad (name: the manifest's, or the file's stem; names "
            "must be unique). A slide whose output exists is skipped unless --overwrite, so a "
            "rerun does only what is left. A slide that fails (an unreadable file, a missing "
            "image) is reported with its error and the others go on; the exit status is then 1. "
            "--out-dir/summary.csv lists each slide (slide, path, output, spots, seconds, "
            "status: done, skipped or failed, error). --workers N > 1 runs N slides at a time as "
            "Ray tasks (one CPU and one torch thread each, the model loaded by each task; a "
            'local Ray unless one is already initialised): pip install -e ".[distributed]" '
            "(or pip install ray); without Ray, a warning and one slide after the other."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder from `stinfer train`")
    slides = parser.add_mutually_exclusive_group(required=True)
    slides.add_argument("--slide", help="prepared slide (.h5ad), predicted to --out")
    slides.add_argument(
        "--slides",
        nargs="+",
        metavar="SLIDE",
        help="a cohort of prepared slides (.h5ad), each predicted to --out-dir/<stem>.h5ad",
    )
    slides.add_argument(
        "--manifest",
        type=Path,
        metavar="CSV",
        help="a cohort listed in a CSV: a `path` column (relative to the CSV's folder) and an "
        "optional `name` column (the output's name; default the file's stem)",
    )
    parser.add_argument(
        "--mode",
        choices=["fused", "image", "spatial", *MODALITY_ALIASES],
        metavar="{fused,image,spatial}",
        default="fused",
        help="STEvs: both modalities (PoE), the image alone, or the coordinates alone (fused); "
        "the older names both and location are accepted",
    )
    parser.add_argument(
        "--no-tta",
        action="store_true",
        help="STEvs: skip test-time augmentation (the mean over 8 flips/rotations of each "
        "patch) even when the run's preset uses it: 8x less image work, e.g. for Visium HD bins",
    )
    uncertainty = parser.add_argument_group(
        "uncertainty (STEvs)",
        "The predictive distribution of each spot and gene: the NB likelihood integrated over "
        "posterior samples of the latent, calibrated on the training slides' validation spots "
        "(a dispersion scale and a quantile recalibration fitted when the run was trained). "
        "Written as layers (counts): predictive_mean, predictive_sd, and lower_<pct>/upper_<pct> "
        "per level (lower_50, upper_50, lower_90, upper_90 by default); "
        "uns['stinfer']['uncertainty'] records how.",
    )
    uncertainty.add_argument(
        "--uncertainty", action="store_true", help="also write the predictive uncertainty layers"
    )
    uncertainty.add_argument(
        "--levels",
        default="0.5,0.9",
        help="central interval levels, comma-separated, each in (0, 1)",
    )
    uncertainty.add_argument(
        "--samples", type=positive_int, default=30, help="posterior samples of the latent per spot"
    )
    uncertainty.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the posterior samples"
    )
    uncertainty.add_argument(
        "--no-calibration",
        action="store_true",
        help="leave the intervals as the model states them (to see how far off they are)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="PATH", help="output .h5ad of predictions (with --slide)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        metavar="DIR",
        help="folder of a cohort's predictions, <name>.h5ad each, and summary.csv (with "
        "--slides/--manifest); created if needed",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output if it exists (default: --slide refuses and exits with an "
        "error; a cohort skips the slide)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="a cohort's slides predicted at a time: 1 in this process, one after the other; "
        "N > 1 as Ray tasks on N CPUs (without Ray: a warning, then one after the other)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int | None:
    from stinfer.errors import InputError

    if args.slide is not None:
        if args.out is None or args.out_dir is not None or args.workers != 1:
            raise InputError(
                "--slide: give the output file with --out (--out-dir and --workers are for a "
                "cohort: --slides or --manifest)."
            )
        return _predict_one_slide(args)
    flag = "--slides" if args.slides is not None else "--manifest"
    if args.out_dir is None or args.out is not None:
        raise InputError(
            f"{flag}: give the output folder with --out-dir (--out is for one --slide)."
        )
    return _predict_cohort(args)


def _checked_run_kind(args: argparse.Namespace) -> str:
    """The run's model type, after refusing a non-expression run and STEvs-only options."""
    from stinfer.errors import InputError
    from stinfer.models import MODEL_TYPES
    from stinfer.models.persistence import read_model_header

    kind = read_model_header(args.run).model_type
    if kind in MODEL_TYPES and not MODEL_TYPES[kind].expression:
        raise InputError(
            f"{args.run}: holds a {kind} model, not an expression model; impute genes with "
            "`stinfer impute` or load it with stinfer.models.load."
        )
    if kind != "stevs" and (args.mode != "fused" or args.no_tta or args.uncertainty):
        flag = "--no-tta" if args.no_tta else f"--mode {args.mode}"
        if args.uncertainty:
            flag = "--uncertainty"
        raise InputError(
            f"{flag}: only STEvs runs have modes, test-time augmentation and uncertainty."
        )
    return kind


def _predict_one_slide(args: argparse.Namespace) -> None:
    from stinfer.cohort import write_slide_prediction
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.models import load

    out = checked_output(args)
    kind = _checked_run_kind(args)
    uncertainty = _uncertainty_options(args) if args.uncertainty else None
    model = load(args.run)
    slide = read_h5ad_slide(args.slide)
    if kind != "stevs":
        write_slide_prediction(model, slide, out, overwrite=args.overwrite)
        print(f"wrote {out}: {slide.n_obs} spots x {len(model.genes)} genes ({kind})")
        return
    if args.no_tta:
        model.config.training.test_time_augmentation = False
    write_slide_prediction(
        model, slide, out, mode=args.mode, overwrite=args.overwrite, uncertainty=uncertainty
    )
    trust = ""
    if args.mode == "fused":
        import h5py

        with h5py.File(out, "r") as file:
            if "obs/stevs_image_expert_weight" in file:
                weight = float(file["obs/stevs_image_expert_weight"][()].mean())
                trust = f"; mean expert weight: image {weight:.2f}, coordinates {1 - weight:.2f}"
    print(f"wrote {out}: {slide.n_obs} spots x {len(model.genes)} genes ({args.mode}{trust})")


def _predict_cohort(args: argparse.Namespace) -> int | None:
    """``--slides``/``--manifest``: :func:`stinfer.cohort.predict_cohort`; status 1 when a
    slide failed."""
    import sys

    from stinfer.cohort import SUMMARY_FILE, cohort_slides, predict_cohort, read_manifest

    slides = read_manifest(args.manifest) if args.manifest else cohort_slides(args.slides)
    _checked_run_kind(args)
    summary = predict_cohort(
        args.run,
        slides,
        args.out_dir,
        workers=args.workers,
        mode=args.mode,
        overwrite=args.overwrite,
        uncertainty=_uncertainty_options(args) if args.uncertainty else None,
        test_time_augmentation=False if args.no_tta else None,
    )
    counts = summary["status"].value_counts()
    print(
        f"wrote {args.out_dir / SUMMARY_FILE}: {len(summary)} slides, {counts.get('done', 0)} "
        f"predicted, {counts.get('skipped', 0)} skipped (output exists), "
        f"{counts.get('failed', 0)} failed"
    )
    failed = summary[summary["status"] == "failed"]
    for row in failed.itertuples():
        print(f"stinfer predict: failed: {row.slide} ({row.path}): {row.error}", file=sys.stderr)
    return 1 if len(failed) else None


def _uncertainty_options(args: argparse.Namespace):
    """The :class:`~stinfer.models.uncertainty.UncertaintyConfig` of ``--levels`` etc."""
    from stinfer.errors import InputError
    from stinfer.models.uncertainty import UncertaintyConfig

    try:
        levels = tuple(float(part) for part in args.levels.split(",") if part.strip())
    except ValueError:
        raise InputError(
            f"--levels {args.levels!r}: give comma-separated numbers in (0, 1), e.g. 0.5,0.9."
        ) from None
    try:
        return UncertaintyConfig(
            samples=args.samples,
            levels=levels,
            seed=args.seed,
            calibrated=not args.no_calibration,
        )
    except InputError as error:
        raise InputError(f"--levels/--samples: {error}") from None
