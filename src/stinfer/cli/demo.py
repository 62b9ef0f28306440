"""`stinfer demo`: the main job on the built-in synthetic data, end to end."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate synthetic serial sections, prepare them and write an overview figure",
        description=(
            "Generate three synthetic serial sections with known domains (H&E-like images, "
            "spot grid, negative-binomial counts), write them as prepared .h5ad slides with "
            "cached spot patches, and draw an overview figure (image, spots by domain, one "
            "gene's counts). Needs no data and no internet."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("stinfer_demo"),
        help="output folder (default: ./stinfer_demo); must be new or empty unless --overwrite",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo's outputs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic tissue")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from stinfer.data.patches import PatchSpec, spot_patches
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.slide_data import prepare_for_h5ad
    from stinfer.plot import plot_slide_overview, save_figure

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise InputError(
            f"{out}: folder exists and is not empty; pass --overwrite or another --out."
        )
    out.mkdir(parents=True, exist_ok=True)

    print(f"[1/3] generating synthetic sections into {out}/images")
    slides = make_synthetic_sections(
        out / "images", SyntheticConfig(seed=args.seed), overwrite=True
    )
    print(f"[2/3] preparing {len(slides)} slides (validated .h5ad + cached 160-px patches)")
    for slide in slides:
        sample_id = slide.uns["stinfer"]["sample_id"]
        patches = spot_patches(slide, PatchSpec(), cache_dir=out / "patch_cache")
        write_h5ad(prepare_for_h5ad(slide), out / f"{sample_id}.h5ad", overwrite=args.overwrite)
        print(
            f"      {sample_id}: {slide.n_obs} spots x {slide.n_vars} genes, patches {patches.shape}"
        )

    print("[3/3] drawing the overview figure")
    first = slides[0]
    gene = str(
        first.var_names[first.var["program"].astype(str).str.startswith("domain")].to_numpy()[0]
    )
    save_figure(plot_slide_overview(first, gene), out / "overview.png", overwrite=args.overwrite)
    print(f"wrote {out / 'overview.png'}")
