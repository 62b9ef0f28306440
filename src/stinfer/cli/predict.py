"""`stinfer predict`: predict expression on a slide with a trained run (any expression model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stinfer.cli.options import HelpFormatter, add_output_arguments, checked_output
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
            "  stinfer predict --run runs/c2 --slide C3.h5ad --out C3_pred.h5ad --uncertainty "
            "--levels 0.5,0.8,0.95"
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder from `stinfer train`")
    parser.add_argument("--slide", required=True, help="prepared slide (.h5ad)")
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
        "--samples", type=int, default=30, help="posterior samples of the latent per spot"
    )
    uncertainty.add_argument("--seed", type=int, default=0, help="seeds the posterior samples")
    uncertainty.add_argument(
        "--no-calibration",
        action="store_true",
        help="leave the intervals as the model states them (to see how far off they are)",
    )
    add_output_arguments(parser, "output .h5ad of predictions")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from stinfer.errors import InputError
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.io.slide_data import prepare_for_h5ad
    from stinfer.models import MODEL_TYPES, load
    from stinfer.models.persistence import read_model_header

    out = checked_output(args)
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
    uncertainty = _uncertainty_options(args) if args.uncertainty else None
    model = load(args.run)
    slide = read_h5ad_slide(args.slide)
    if kind != "stevs":
        write_h5ad(prepare_for_h5ad(model.predict(slide)), out, overwrite=args.overwrite)
        print(f"wrote {out}: {slide.n_obs} spots x {len(model.genes)} genes ({kind})")
        return
    if args.no_tta:
        model.config.training.test_time_augmentation = False
    model.write_prediction(
        slide, out, mode=args.mode, overwrite=args.overwrite, uncertainty=uncertainty
    )
    trust = ""
    if args.mode == "fused":
        import h5py

        with h5py.File(out, "r") as file:
            if "obs/stevs_image_expert_weight" in file:
                weight = float(file["obs/stevs_image_expert_weight"][()].mean())
                trust = f"; mean expert weight: image {weight:.2f}, coordinates {1 - weight:.2f}"
    print(f"wrote {out}: {slide.n_obs} spots x {len(model.genes)} genes ({args.mode}{trust})")


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
