"""`stinfer train`: train an expression model on prepared slides and save the run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from stinfer.cli.options import (
    HelpFormatter,
    add_accelerator_argument,
    add_distributed_arguments,
    checked_output_folder,
    non_negative_int,
    positive_int,
)
from stinfer.errors import InputError
from stinfer.models import list_models, model_type

logger = logging.getLogger("stinfer")

EXAMPLES = (
    """\
examples:
  stinfer train --model stevs --train C2.h5ad --genes svg --n-genes 300 --preset fast --out runs/c2
  stinfer train --model stevs --train C2.h5ad C3.h5ad --genes genes.txt --preset paper \\
      --epochs 100 --devices 4 --strategy ddp --out runs/c23
  stinfer train --model stnet --train C2.h5ad --preset fast --epochs 5 --out runs/stnet
  stinfer train --model coordinate_knn --train C2.h5ad --option n_neighbors=5 --out runs/knn
  stinfer train --model feature_ridge --train C2.h5ad --option features=handcrafted --out runs/ridge

models:
"""
    + "\n".join(f"  {name:<16}{model_type(name).summary}" for name in list_models("expression"))
    + """

Flags that a model has no setting for are refused (e.g. --epochs for the closed-form
baselines, --freeze-encoder for anything but STEvs); --option FIELD=VALUE sets any field of the
model's config (dotted for nested fields: STEvs and ST-Net configs have module, training and
trainer sections, e.g. training.augment=false, trainer.max_epochs=5; the value is read as YAML). The run folder holds the model (config.json naming the model type,
weights.safetensors; `stinfer predict --run` and stinfer.models.load read it) and
train_history.json (per-epoch losses and validation metrics, training seconds).
"""
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an expression model (STEvs, ST-Net, baselines) and save the run folder",
        description="Train a histology-to-expression model on one or more prepared slides.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        choices=list_models("expression"),
        default="stevs",
        help="registered expression model type (default stevs; see the list below)",
    )
    parser.add_argument(
        "--train", nargs="+", required=True, metavar="H5AD", help="prepared training slides"
    )
    parser.add_argument(
        "--genes",
        default="svg",
        help="'svg' (Moran's I SVGs shared by the slides, STEvs D.1.4), 'hvg', or a text file "
        "with one gene per line (default svg)",
    )
    parser.add_argument(
        "--n-genes", type=positive_int, default=300, help="panel size for svg/hvg (300)"
    )
    parser.add_argument(
        "--preset",
        choices=["auto", "paper", "fast"],
        help="named config of models that have presets (stevs, stnet): paper (the paper's "
        "hyperparameters, for a GPU), fast (for a CPU) or auto (default): paper on a GPU, fast "
        "on a CPU (--accelerator, else whether a CUDA GPU is available)",
    )
    parser.add_argument(
        "--epochs", type=positive_int, help="override the preset's number of epochs (>= 1)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (0)")
    parser.add_argument(
        "--pretrained",
        help="'hub' (downloads) or a local backbone weights file (stevs, stnet, feature_ridge)",
    )
    parser.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="STEvs: freeze the image backbone and cache its features",
    )
    parser.add_argument(
        "--patch-cache", help="folder to cache spot patches across runs (image models)"
    )
    add_accelerator_argument(
        parser, "auto | cpu | gpu | mps (auto; stevs, stnet); gpu needs a visible CUDA GPU"
    )
    add_distributed_arguments(parser, "stevs, stnet")
    parser.add_argument(
        "--precision",
        choices=["auto", "32-true", "bf16-mixed"],
        help="'auto': the preset's (bf16 autocast on GPUs; on CPUs with native bf16 where the "
        "preset allows it, as `paper` does; else fp32); or force fp32 / bf16 autocast",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a field of the model's config (repeatable; dotted for nested fields)",
    )
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


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values read as YAML scalars)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            raise InputError(f"--option {item!r}: write FIELD=VALUE, e.g. n_neighbors=5.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InputError(
                f"--option {item!r}: the value is not valid YAML ({error})."
            ) from error
        *parents, leaf = field.strip().split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


def flag_overrides(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides of the model-specific flags, or an :class:`InputError` naming a
    flag that ``kind`` has no setting for."""
    devices = args.devices  # "auto", a count or "0,1" indices (checked by options.devices)
    precision = None if args.precision in (None, "auto") else args.precision
    given = {
        "--epochs": args.epochs,
        "--pretrained": args.pretrained,
        "--freeze-encoder": args.freeze_encoder or None,
        "--patch-cache": args.patch_cache,
        "--accelerator": args.accelerator,
        "--devices": devices,
        "--strategy": args.strategy,
        "--num-nodes": args.num_nodes,
        "--precision": args.precision,
    }
    fields = {
        "stevs": {
            "--epochs": "trainer.max_epochs",
            "--pretrained": "module.pretrained",
            "--freeze-encoder": "module.freeze_encoder",
            "--patch-cache": "training.patch_cache_dir",
            "--accelerator": "trainer.accelerator",
            "--devices": "trainer.devices",
            "--strategy": "trainer.strategy",
            "--num-nodes": "trainer.num_nodes",
            "--precision": "trainer.precision",
        },
        "stnet": {
            "--epochs": "trainer.max_epochs",
            "--pretrained": "module.pretrained",
            "--patch-cache": "training.patch_cache_dir",
            "--accelerator": "trainer.accelerator",
            "--devices": "trainer.devices",
            "--strategy": "trainer.strategy",
            "--num-nodes": "trainer.num_nodes",
            "--precision": "trainer.precision",
        },
        "feature_ridge": {"--pretrained": "pretrained", "--patch-cache": "patch_cache_dir"},
    }.get(kind, {})
    refused = [flag for flag, value in given.items() if value is not None and flag not in fields]
    if refused:
        raise InputError(
            f"{', '.join(refused)}: model {kind!r} has no such setting (flags it takes: "
            f"{', '.join(fields) or 'none besides --seed and --option'})."
        )
    values = {fields[flag]: value for flag, value in given.items() if value is not None}
    if "trainer.precision" in values:
        values["trainer.precision"] = precision
    if kind in ("stevs", "stnet"):
        values["trainer.progress_bar"] = not args.no_progress
    overrides: dict[str, Any] = {}
    for path, value in values.items():
        head, _, name = path.rpartition(".")
        (overrides.setdefault(head, {}) if head else overrides)[name] = value
    return overrides


def run(args: argparse.Namespace) -> None:
    from stinfer.evaluate.ablations import deep_merge_loose
    from stinfer.io.atomic import write_text
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.models import create_model, model_config
    from stinfer.models.configs import auto_preset
    from stinfer.models.persistence import check_model_destination, model_folder
    from stinfer.preprocess import select_genes
    from stinfer.train import check_accelerator, is_global_zero

    entry = model_type(args.model)
    if args.preset is not None and not entry.presets:
        raise InputError(f"--preset {args.preset}: model {args.model!r} has no presets.")
    preset = auto_preset(args.preset or "auto", args.accelerator) if entry.presets else None
    overrides = deep_merge_loose(flag_overrides(args.model, args), parse_options(args.option))
    config = model_config(args.model, preset, args.seed, **overrides)  # checked before reading
    if args.accelerator is not None:
        check_accelerator(args.accelerator)
    check_model_destination(args.out, args.overwrite)  # a saved model or nothing: see persistence
    checked_output_folder(args.out, args.overwrite)
    slides = [read_h5ad_slide(path) for path in args.train]
    if args.genes in ("svg", "hvg"):
        genes = select_genes(slides, method=args.genes, n_genes=args.n_genes)
    else:
        genes = read_gene_list(args.genes)
    label = f"{args.model} ({preset})" if preset else args.model
    if is_global_zero():  # a DDP run's other processes run this command again: say it once
        print(f"training {label} on {len(slides)} slide(s), {len(genes)} genes")
    model = create_model(args.model, slides, genes, config=config)
    result = model.train()
    if not is_global_zero():
        return  # another DDP process of this run: it trained alongside rank 0, which writes
    best_score = getattr(result, "best_score", None)
    score_name = {"stevs": "val median PCC", "stnet": "val MSE"}.get(args.model, "val score")
    # the validation metric each model logs per epoch: (name, label, which way is better)
    score = {
        "stevs": ("val/pcc_median", score_name, "max"),
        "stnet": ("val/mse", score_name, "min"),
    }
    history = {
        "model_type": args.model,
        "train_seconds": result.train_seconds,
        "best_epoch": getattr(result, "best_epoch", None),
        "best_score": best_score,  # the monitored validation metric (score_name), if any
        "best_score_name": score_name if best_score is not None else None,
        "train_slides": [str(Path(p).resolve()) for p in args.train],
        "history": getattr(result, "history", []),
    }
    if args.model == "stevs":  # the best logged, also when no monitor restored its epoch
        best_logged = result.best_logged("val/pcc_median")
        history["best_val_pcc_median"] = None if best_logged is None else best_logged[1]
    with model_folder(args.out, args.overwrite) as run_folder:  # the run appears whole or not
        model.save(run_folder, overwrite=True)
        write_text(json.dumps(history, indent=2), run_folder / "train_history.json")
    summary = f"wrote {args.out}: {result.train_seconds:.1f} s"
    if args.model in score:
        summary += f", {result.describe_best(*score[args.model])}"
    print(summary)
