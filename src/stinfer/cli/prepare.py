"""`stinfer prepare`: read any supported input into a validated slide `.h5ad`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stinfer.cli.options import (
    HelpFormatter,
    add_output_arguments,
    checked_output,
    checked_output_folder,
    positive_float,
    positive_int,
)
from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

EXAMPLES = """\
examples:
  stinfer prepare --format legacy-st --counts C2.tsv.gz --spots C2_selection.tsv \\
      --image C2.jpg --sample-id C2 --out C2.h5ad
  stinfer prepare --format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv \\
      --sample-id A1 --out A1.h5ad            # counts-only slide (no image)
  stinfer prepare --format visium --path SPACERANGER_DIR [--image FULLRES.tif] --out S.h5ad
  stinfer prepare --format visium-hd --path OUTS --bin-size 8 [--image FULLRES.tif] --out S.h5ad
  stinfer prepare --format h5ad --path S.h5ad --image S.tif --out S_prepared.h5ad
  stinfer prepare --format hest --path HEST_ROOT --sample-id TENX95 --out TENX95.h5ad
  stinfer prepare --format image --image SLIDE.svs --grid visium --out SLIDE.h5ad
  stinfer prepare --format image --image SLIDE.jpg --pixel-size-um 0.5 --grid 50 --out S.h5ad

The output holds raw counts in X, spot centres in full-resolution image pixels in
obsm["spatial"] (x, y), grid coordinates in obs["array_row"/"array_col"], and the sample id,
image path, image scale, microns per pixel and spot diameter in uns["stinfer"]. What the
reader dropped or assumed is printed and kept in uns["stinfer"]["notes"].

Visium HD (--format visium-hd): --path is the Space Ranger outs/ folder (or one
binned_outputs/square_XXXum folder); --bin-size picks square_002um, square_008um or
square_016um. Each bin is one spot: its diameter is the bin size, and the microns per pixel
come from microns_per_pixel in the bin folder's scalefactors_json.json.

H&E only (--format image): for a whole-slide image (SVS, NDPI, tiled TIFF, JPEG, PNG) without
counts. The tissue is found on a ~10 um/px thumbnail (Otsu threshold on HSV saturation, specks
removed, small holes filled) and virtual spots are laid over it (--grid): visium = 55-um spots
on a 100-um hexagonal pitch with Visium's array_row/array_col; st = 100-um spots on a 200-um
square pitch; a number = a square grid of that pitch in microns with spots half as wide. A spot
is kept when its centre is on tissue. The microns per pixel come from --pixel-size-um, else the
file's OME/SVS/TIFF metadata (a JPEG or PNG has none: give --pixel-size-um). The output has 0
genes; predict on it with `stinfer predict --mode image` (or fused) to get expression.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="read Visium / Visium HD / legacy ST / h5ad / HEST-1k input, or an H&E image alone, "
        "into a validated .h5ad",
        description="Read a slide in any supported format, validate it, and write a .h5ad.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=["visium", "visium-hd", "legacy-st", "h5ad", "hest", "image"],
        help="input format (image: an H&E whole-slide image without counts; virtual spots)",
    )
    parser.add_argument(
        "--path",
        help="Space Ranger folder (visium), Space Ranger HD outs/ or square_XXXum folder "
        "(visium-hd), .h5ad file (h5ad) or HEST-1k root folder (hest)",
    )
    parser.add_argument(
        "--bin-size",
        dest="bin_size_um",
        type=positive_int,
        metavar="UM",
        help="visium-hd: bin side in microns, 2, 8 or 16 (default 8, or the size of the "
        "square_XXXum folder given as --path)",
    )
    parser.add_argument("--counts", help="legacy-st: spots x genes counts .tsv(.gz)")
    parser.add_argument("--spots", help="legacy-st: spot selection .tsv (x, y, pixel_x, pixel_y)")
    parser.add_argument(
        "--image",
        help="H&E image (full resolution); without it a Visium (HD) folder uses its hires/lowres "
        "PNG and a legacy-st slide is counts-only; the input itself for --format image",
    )
    parser.add_argument(
        "--grid",
        metavar="visium|st|UM",
        help="image: the virtual spot grid laid over the tissue: visium (55-um spots, 100-um "
        "hexagonal pitch), st (100-um spots, 200-um square pitch) or a spacing in microns "
        "(square grid, spots half as wide) (default visium)",
    )
    parser.add_argument("--sample-id", help="slide name (default: derived from the input)")
    parser.add_argument(
        "--pixel-size-um",
        type=positive_float,
        help="microns per full-resolution pixel (default: from the metadata or the spot grid)",
    )
    parser.add_argument(
        "--patch-cache",
        metavar="DIR",
        help="also extract the 160x160 spot patches into this cache folder (reused by "
        "`stinfer train --patch-cache DIR`)",
    )
    parser.add_argument(  # the flag's name before the CLI vocabulary was unified (issue 17)
        "--cache-patches", dest="patch_cache", metavar="DIR", help=argparse.SUPPRESS
    )
    add_output_arguments(parser, "output .h5ad")
    parser.set_defaults(func=run)


def read_input(args: argparse.Namespace):
    """Dispatch to the reader of ``args.format`` with the arguments it takes."""
    from stinfer import io

    if args.grid is not None and args.format != "image":
        raise InputError("--grid is for --format image.")
    if args.format == "image":
        if not args.image:
            raise InputError("--format image needs --image (the H&E whole-slide image).")
        if args.path or args.bin_size_um is not None:
            raise InputError("--format image reads --image; --path and --bin-size are not used.")
        return io.read_image_slide(
            args.image,
            pixel_size_um=args.pixel_size_um,
            grid=args.grid or "visium",
            sample_id=args.sample_id,
        )
    if args.format == "legacy-st":
        if not args.counts or not args.spots:
            raise InputError("--format legacy-st needs --counts and --spots.")
        return io.read_legacy_st(
            args.counts,
            args.spots,
            image=args.image,
            sample_id=args.sample_id,
            pixel_size_um=args.pixel_size_um,
        )
    if args.bin_size_um is not None and args.format != "visium-hd":
        raise InputError("--bin-size is for --format visium-hd.")
    if not args.path:
        raise InputError(f"--format {args.format} needs --path.")
    if args.format == "visium-hd":
        return io.read_visium_hd(
            args.path, bin_size_um=args.bin_size_um, image=args.image, sample_id=args.sample_id
        )
    if args.format == "visium":
        return io.read_visium(args.path, image=args.image, sample_id=args.sample_id)
    if args.format == "h5ad":
        return io.read_h5ad_slide(
            args.path, image=args.image, sample_id=args.sample_id, pixel_size_um=args.pixel_size_um
        )
    if not args.sample_id:
        raise InputError("--format hest needs --sample-id (the HEST-1k sample, e.g. TENX95).")
    return io.read_hest(args.path, args.sample_id)


def run(args: argparse.Namespace) -> None:
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.slide_data import prepare_for_h5ad, slide_meta

    out = checked_output(args)
    if args.patch_cache:
        checked_output_folder(Path(args.patch_cache), overwrite=True, flag="--patch-cache")
    slide = read_input(args)
    meta = slide_meta(slide)
    if args.patch_cache:
        from stinfer.data.patches import PatchSpec, spot_patches

        if meta["image_path"] is None:
            raise InputError("--patch-cache needs a slide with an image (--image).")
        patches = spot_patches(slide, PatchSpec(), cache_dir=args.patch_cache)
        logger.info(
            "cached %d patches of shape %s in %s",
            len(patches),
            patches.shape[1:],
            args.patch_cache,
        )
    write_h5ad(prepare_for_h5ad(slide), out, overwrite=args.overwrite)
    pixel = f"{meta['pixel_size_um']:.3f} um/px" if meta["pixel_size_um"] else "unknown um/px"
    print(
        f"wrote {out}: {slide.n_obs} spots x {slide.n_vars} genes, sample {meta['sample_id']}, "
        f"image {meta['image_path'] or 'none'} (scale {meta['image_scale']:g}), {pixel}"
    )
    for note in meta["notes"]:
        print(f"note: {note}")
