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
            "obsm['stevs_posterior_var']. The slide's counts are never read."
        ),
        epilog="example:\n  stinfer predict --run runs/c2 --slide C3.h5ad --out C3_pred.h5ad --mode fused",
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
    add_output_arguments(parser, "output .h5ad of predictions")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.io.slide_data import prepare_for_h5ad
    from stinfer.models.stevs import STEvs

    out = checked_output(args)
    model = STEvs.load(args.run)
    slide = read_h5ad_slide(args.slide)
    prediction = model.predict(slide, mode=args.mode)
    write_h5ad(prepare_for_h5ad(prediction), out, overwrite=args.overwrite)
    print(f"wrote {out}: {prediction.n_obs} spots x {prediction.n_vars} genes ({args.mode})")
