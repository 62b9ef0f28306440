"""`stinfer predict`: predict expression on a slide with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from stinfer.cli.options import add_output_arguments, checked_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict expression on a slide from its H&E image and/or coordinates",
        description=(
            "Predict the run's genes at every spot of a prepared slide. The output .h5ad has "
            "predicted NB means (raw-count scale) in X, the NB inverse dispersion in "
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
            "  stinfer predict --run runs/hd --slide HD_008um.h5ad --out HD_pred.h5ad --no-tta"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder from `stinfer train`")
    parser.add_argument("--slide", required=True, help="prepared slide (.h5ad)")
    parser.add_argument(
        "--mode",
        choices=["fused", "image", "spatial"],
        default="fused",
        help="both modalities (PoE), the image alone, or the coordinates alone (fused)",
    )
    parser.add_argument(
        "--no-tta",
        action="store_true",
        help="skip test-time augmentation (the mean over 8 flips/rotations of each patch) even "
        "when the run's preset uses it: 8x less image work, e.g. for Visium HD bins",
    )
    add_output_arguments(parser, "output .h5ad of predictions")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.models.stevs import STEvs

    out = checked_output(args)
    model = STEvs.load(args.run)
    if args.no_tta:
        model.config.training.test_time_augmentation = False
    slide = read_h5ad_slide(args.slide)
    model.write_prediction(slide, out, mode=args.mode, overwrite=args.overwrite)
    trust = ""
    if args.mode == "fused":
        import h5py

        with h5py.File(out, "r") as file:
            if "obs/stevs_image_expert_weight" in file:
                weight = float(file["obs/stevs_image_expert_weight"][()].mean())
                trust = f"; mean expert weight: image {weight:.2f}, coordinates {1 - weight:.2f}"
    print(f"wrote {out}: {slide.n_obs} spots x {len(model.genes)} genes ({args.mode}{trust})")
