"""`stinfer train`: train an expression model on prepared slides and save the run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

EXAMPLES = """\
examples:
  stinfer train --model stevs --train C2.h5ad --genes svg --n-genes 300 --preset fast --out runs/c2
  stinfer train --model stevs --train C2.h5ad C3.h5ad --genes genes.txt --preset paper \\
      --epochs 100 --devices 4 --strategy ddp --out runs/c23

The run folder holds the model (config.json, weights.safetensors, genes.json) and
train_history.json (per-epoch losses and validation median PCC, training seconds).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train STEvs on prepared slides and save the run folder",
        description="Train a histology-to-expression model on one or more prepared slides.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=["stevs"], default="stevs", help="model (default stevs)")
    parser.add_argument(
        "--train", nargs="+", required=True, metavar="H5AD", help="prepared training slides"
    )
    parser.add_argument(
        "--genes",
        default="svg",
        help="'svg' (Moran's I SVGs shared by the slides, STEvs D.1.4), 'hvg', or a text file "
        "with one gene per line (default svg)",
    )
    parser.add_argument("--n-genes", type=int, default=300, help="panel size for svg/hvg (300)")
    parser.add_argument("--preset", choices=["paper", "fast"], default="fast", help="preset (fast)")
    parser.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--pretrained", help="'hub' (downloads) or a local backbone weights file")
    parser.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="freeze the image backbone and cache its features",
    )
    parser.add_argument("--patch-cache", help="folder to cache spot patches across runs")
    parser.add_argument("--accelerator", default="auto", help="auto | cpu | gpu | mps (auto)")
    parser.add_argument("--devices", default="auto", help="number of devices, e.g. 4 (auto)")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (auto)")
    parser.add_argument(
        "--precision",
        choices=["auto", "32-true", "bf16-mixed"],
        default="auto",
        help="'auto': the preset's (bf16 autocast on GPUs; on CPUs with native bf16 where the "
        "preset allows it, as `paper` does; else fp32); or force fp32 / bf16 autocast",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--out", required=True, type=Path, help="run folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace files of an existing run")
    parser.set_defaults(func=run)


def read_gene_list(path: str) -> list[str]:
    """Genes from a text file, one per line (blank lines and '#' comments ignored)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--genes {path}: not 'svg', 'hvg' or an existing gene-list file.")
    genes = [line.strip() for line in file.read_text().splitlines()]
    genes = [gene for gene in genes if gene and not gene.startswith("#")]
    if not genes:
        raise InputError(f"{path}: the gene list is empty.")
    return genes


def run(args: argparse.Namespace) -> None:
    import dataclasses

    from stinfer.io.atomic import write_text
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.models.stevs import STEvs, resolve_config
    from stinfer.preprocess import select_genes

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise InputError(f"{args.out}: run folder exists and is not empty; pass --overwrite.")
    slides = [read_h5ad_slide(path) for path in args.train]
    if args.genes in ("svg", "hvg"):
        genes = select_genes(slides, method=args.genes, n_genes=args.n_genes)
    else:
        genes = read_gene_list(args.genes)
    config = resolve_config(args.preset)
    trainer = dataclasses.replace(
        config.training.trainer,
        seed=args.seed,
        accelerator=args.accelerator,
        devices=int(args.devices) if str(args.devices).isdigit() else args.devices,
        strategy=args.strategy,
        precision=None if args.precision == "auto" else args.precision,
        progress_bar=not args.no_progress,
        max_epochs=args.epochs or config.training.trainer.max_epochs,
    )
    config.training.trainer = trainer
    config.training.patch_cache_dir = args.patch_cache
    if args.pretrained:
        config.module.pretrained = args.pretrained
    if args.freeze_encoder:
        config.module.freeze_encoder = True
    print(f"training STEvs ({args.preset}) on {len(slides)} slide(s), {len(genes)} genes")
    model = STEvs(slides, genes, config)
    result = model.train()
    model.save(args.out, overwrite=args.overwrite)
    history = {
        "train_seconds": result.train_seconds,
        "best_epoch": result.best_epoch,
        "best_val_pcc_median": result.best_score,
        "train_slides": [str(Path(p).resolve()) for p in args.train],
        "history": result.history,
    }
    write_text(json.dumps(history, indent=2), args.out / "train_history.json", args.overwrite)
    print(
        f"wrote {args.out}: {result.train_seconds:.1f} s, best epoch {result.best_epoch}, "
        f"val median PCC {result.best_score if result.best_score is None else round(result.best_score, 4)}"
    )
