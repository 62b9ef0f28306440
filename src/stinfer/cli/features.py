"""`stinfer features`: frozen per-spot encoder features of slides, into a feature store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stinfer.cli.options import HelpFormatter, non_negative_int, positive_float, positive_int
from stinfer.errors import InputError

EXAMPLES = """\
examples:
  stinfer features --encoder vit_large_patch16_224 --encoder-kwargs '{"init_values": 1e-5}' \\
      --weights uni.safetensors --slides A1.h5ad B1.h5ad --out features.zarr \\
      --patch-um 112 --patch-px 224          # UNI on HEST's patches: 224 px at 0.5 um/px
  stinfer features --encoder vit_base_patch16_224 --weights phikon_timm.safetensors \\
      --slides C2.h5ad C3.h5ad --out features.zarr          # a ViT-B/16 (Phikon's shape)
  stinfer features --encoder resnet50 --pretrained hub --slides C2.h5ad --out features.zarr

The store (a zarr folder) holds one group per slide and feature key, STORE/<sample id>/<key>:
`features`, float32 (n_spots, n_features) in the slide's spot order, with the spots'
obs_names and everything the key is made of in the group's attributes. The key is
<encoder>-<digest> of: the encoder name and --encoder-kwargs; the weights (the SHA-256 of the
--weights file, `hub:<encoder>`, or `random-seed<N>` without weights); the patch in microns
(footprint and output pixel size, from the slide's pixel size); the encoder's input scaling.
A slide whose features are stored under the key is read, not recomputed, so a second run
prints `reused`. The same store serves `stinfer train --model feature_ridge --option
features=backbone --option feature_store=STORE` (same encoder, weights and patch), which then
reads these features. STEvs with a frozen encoder (`--option training.feature_store=STORE`)
writes and reads its own keys in the same store: it scales patches its own way
(patch_normalization, per-slide colour standardisation), so this command does not fill them.

Weights: --weights reads a local timm/torch state dict (.safetensors, or .pth/.pt/.bin/.ckpt
read with weights_only) into the timm architecture --encoder names, tensors matched by name
and shape (unmatched ones are logged); pass the architecture's extra timm arguments with
--encoder-kwargs (UNI: {"init_values": 1e-5}). Pathology foundation models whose weights are
not timm state dicts (e.g. Hugging Face transformers checkpoints) must be converted first.
Without --weights or --pretrained the encoder is randomly initialised (--seed): nothing
downloads.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "features",
        help="compute frozen per-spot encoder features (any timm encoder) into a feature store",
        description=(
            "Compute the pooled features of a frozen timm encoder (e.g. the ViT of a pathology "
            "foundation model whose weights you hold) for every spot patch of each slide, and "
            "keep them in a zarr feature store that the feature probe reads instead of "
            "recomputing. One line per slide: computed or reused, and the seconds it took."
        ),
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--encoder", required=True, help="timm model name (e.g. vit_large_patch16_224)"
    )
    parser.add_argument(
        "--encoder-kwargs",
        type=json.loads,
        default={},
        metavar="JSON",
        help="extra timm.create_model arguments as a JSON object (default {})",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, metavar="FILE", help="local encoder weights file")
    weights.add_argument(
        "--pretrained",
        choices=["hub"],
        help="hub: timm's hub weights of --encoder (downloads; needs internet or a cache)",
    )
    parser.add_argument(
        "--slides", nargs="+", required=True, type=Path, help="prepared slides (.h5ad)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="STORE", help="feature store folder (zarr)"
    )
    parser.add_argument(
        "--patch-um",
        type=positive_float,
        metavar="UM",
        help="patch side in microns (needs the slide's pixel size; default: 160 image pixels)",
    )
    parser.add_argument(
        "--patch-px",
        type=positive_int,
        metavar="PX",
        help="side of the patches read, in pixels (default: the patch in the slide's "
        "pixels); fixed-size encoders (ViTs) resize them to their input size anyway",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="patches per forward pass (64)"
    )
    parser.add_argument(
        "--device", help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cuda, mps, cpu)"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of a random initialisation (0)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from stinfer.data.feature_store import FeatureExtractor, FeatureExtractorSpec, FeatureStore
    from stinfer.data.patches import PatchSpec
    from stinfer.io.h5ad import read_h5ad_slide

    if not isinstance(args.encoder_kwargs, dict):
        raise InputError(f"--encoder-kwargs must be a JSON object, got {args.encoder_kwargs!r}")
    missing = [str(path) for path in args.slides if not path.is_file()]
    if missing:
        raise InputError(f"--slides: not found: {', '.join(missing)}")
    patch = PatchSpec(patch_size_um=args.patch_um, output_size_px=args.patch_px)
    weights = str(args.weights) if args.weights is not None else args.pretrained
    spec = FeatureExtractorSpec(
        encoder=args.encoder,
        encoder_kwargs=args.encoder_kwargs,
        weights=weights,
        seed=args.seed,
        patch=patch,
        batch_size=args.batch_size,
        device=args.device,
    )
    store = FeatureStore(args.out)
    extractor = FeatureExtractor(spec)  # one encoder for every slide
    for path in args.slides:
        slide = read_h5ad_slide(path)
        result = store.get_or_compute(slide, extractor)
        n_spots, n_features = result.features.shape
        print(
            f"{path.name}: {'computed' if result.computed else 'reused'} "
            f"{n_spots} x {n_features} in {result.seconds:.1f} s -> {result.path}",
            flush=True,
        )
