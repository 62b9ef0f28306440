"""GPU check: the figures to take when a CUDA machine is lent (issue 18, point 4).

On a CUDA machine, in this order:

1. **environment**: Python, torch, CUDA, cuDNN, Lightning and timm versions; every GPU's name,
   memory and compute capability; bf16 support;
2. **stevs_paper**: STEvs with the ``paper`` preset (frozen Swin-T on 160-px patches, random
   initialisation: nothing downloads; image decoder; NB decoder) trained for at least
   ``--steps`` optimiser steps (whole epochs, validation included) in bf16 autocast on one GPU,
   on one synthetic Visium-size section (``--spots`` spots x ``--genes`` genes, generated in a
   few seconds by :mod:`stinfer.data.synthetic`);
3. **stevs_paper_ddp**: the same with ``devices=<all GPUs>, strategy="ddp"`` (skipped with one
   GPU); the batch size is per process (Lightning's convention), so the global batch grows
   with the GPUs;
4. **features**: frozen-encoder feature extraction (:func:`stinfer.data.features.backbone_features`,
   the extractor behind the feature store) in bf16 autocast: a ViT-L/16 (the UNI shape,
   LayerScale on) and a ViT-B/16, random initialisation, on 160-px uint8 patches resized to
   224 px.

Each training figure: wall seconds of ``STEvs.train()`` (patch extraction, the frozen
backbone's feature cache, Lightning's fit, calibration), the fit's seconds, optimiser steps,
steps/s and spots/s over the whole fit, the steady-state step time (median interval between
consecutive training steps within an epoch, the GPU synchronised at each step) and the peak
GPU memory (``torch.cuda.max_memory_allocated``; rank 0's device under DDP). Under DDP the
fit's seconds include starting ranks 1.. (Lightning launches them inside the fit), so compare
runs by the steady-state figure. Figures are printed as a table and written as JSON to
``--out``.

Without a CUDA GPU the script says so and exits 0. ``--cpu-smoke`` runs the same code paths on
the CPU at tiny sizes (60 spots, 30 genes, 2 steps, batch 8, a ViT-Ti/16 for the features; bf16
autocast where the CPU has bf16 in hardware, else fp32) and ``--ddp-cpu 2`` adds a DDP run of
two gloo processes, so the script is tested without a GPU (``tests/test_gpu_check.py``).

DDP: Lightning starts ranks 1.. by running the launching command again. The DDP run is
therefore a separate process (this script with ``--ddp-worker FOLDER``) that reads the section
the parent wrote into ``FOLDER`` before starting it, so every rank trains on the same data and
nothing is generated twice; only rank 0 writes the figures (``FOLDER/ddp.json``).

Usage::

    python benchmarks/gpu_check.py --out gpu_check.json            # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke --ddp-cpu 2 --out smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

NO_GPU_MESSAGE = "no CUDA GPU: nothing to check (use --cpu-smoke to exercise the script on the CPU)"
GIB = 2**30
SEED = 1

# (timm name, extra timm arguments, what it stands for)
GPU_ENCODERS = (
    ("vit_large_patch16_224", {"init_values": 1e-5}, "ViT-L/16, the UNI shape"),
    ("vit_base_patch16_224", {}, "ViT-B/16, the Phikon shape"),
)
SMOKE_ENCODERS = (("vit_tiny_patch16_224", {}, "ViT-Ti/16, CPU smoke"),)


# --------------------------------------------------------------------------- environment
def environment() -> dict:
    """Versions, GPUs (name, memory, compute capability) and bf16 support."""
    import lightning
    import timm

    from stinfer.train import cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    gpus = []
    for index in range(torch.cuda.device_count() if cuda else 0):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": properties.name,
                "memory_gib": round(properties.total_memory / GIB, 1),
                "compute_capability": f"{properties.major}.{properties.minor}",
            }
        )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "cuda_available": cuda,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": gpus,
        "gpu_bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# --------------------------------------------------------------------------- measurement
def synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak GPU memory allocated by tensors (current device) and this process's peak RSS."""
    gpu = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
    return {
        "peak_gpu_memory_gib": None if gpu is None else round(gpu, 3),
        "peak_rss_gib": round(rss_gib, 3),
    }


@contextlib.contextmanager
def timed_training_steps():
    """Record ``(epoch, start time, spots)`` of every STEvs training step in the block.

    Wraps :meth:`STEvsTask.training_step` for the duration (restored afterwards); the GPU is
    synchronised before each timestamp, so the interval between two consecutive steps of an
    epoch is one whole step (forward, backward, optimiser) on the device.
    """
    from stinfer.models.stevs import STEvsTask

    original = STEvsTask.training_step
    steps: list[tuple[int, float, int]] = []

    def timed(task, batch, batch_idx):
        synchronise()
        steps.append((int(task.current_epoch), time.perf_counter(), len(batch[1])))
        return original(task, batch, batch_idx)

    STEvsTask.training_step = timed
    try:
        yield steps
    finally:
        STEvsTask.training_step = original


def steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps of one epoch on each rank (STEvs drops the last partial batch when the
    training spots fill more than one batch; Lightning shards them over the ranks first)."""
    per_rank = math.ceil(n_train / world_size)
    if n_train > batch_size:
        return per_rank // batch_size
    return math.ceil(per_rank / batch_size)


def train_stevs_paper(slide, batch_size: int, steps: int, trainer: dict) -> dict:
    """Train the ``paper`` preset for at least ``steps`` steps; its throughput figures.

    ``trainer`` holds the :class:`~stinfer.train.TrainerConfig` fields of the run (accelerator,
    devices, strategy, precision); the epochs are chosen to give ``steps`` steps per rank.
    """
    from stinfer.models import create_model
    from stinfer.models.stevs import paper_preset, validation_split
    from stinfer.train import default_precision

    preset = paper_preset()
    world_size = int(trainer.get("devices", 1))
    n_train = len(validation_split([slide], preset.training.val_fraction, preset.trainer.seed)[0])
    per_epoch = steps_per_epoch(n_train, batch_size, world_size)
    if per_epoch < 1:
        raise SystemExit(
            f"{n_train} training spots on {world_size} process(es) fill no batch of "
            f"{batch_size}; use more --spots."
        )
    epochs = max(1, math.ceil(steps / per_epoch))
    model = create_model(
        "stevs",
        [slide],
        list(slide.var_names),
        preset="paper",
        training={"batch_size": batch_size},
        trainer={**trainer, "max_epochs": epochs, "progress_bar": False},
    )
    precision = model.config.trainer.precision or default_precision(
        model.config.trainer.accelerator, model.config.trainer.cpu_bf16
    )
    reset_peak_memory()
    with timed_training_steps() as timeline:
        start = time.perf_counter()
        result = model.train()
        synchronise()
        wall = time.perf_counter() - start
    intervals = [
        later[1] - earlier[1]
        for earlier, later in itertools.pairwise(timeline)
        if earlier[0] == later[0]
    ]
    step_seconds = statistics.median(intervals) if intervals else None
    spots_per_step = batch_size * result.world_size
    fit_seconds = result.train_seconds
    return {
        "backbone": model.config.module.backbone,
        "pretrained": model.config.module.pretrained,
        "precision": precision,
        "world_size": result.world_size,
        "spots": slide.n_obs,
        "genes": slide.n_vars,
        "training_spots": n_train,
        "batch_size_per_process": batch_size,
        "epochs": epochs,
        "steps_per_rank": len(timeline),
        "wall_seconds": round(wall, 3),
        "fit_seconds": round(fit_seconds, 3),
        "before_fit_seconds": round(wall - fit_seconds, 3),
        "steps_per_s": round(len(timeline) / fit_seconds, 3),
        "spots_per_s": round(
            sum(spots for *_, spots in timeline) * result.world_size / fit_seconds, 1
        ),
        "steady_step_seconds": None if step_seconds is None else round(step_seconds, 4),
        "steady_spots_per_s": None
        if step_seconds is None
        else round(spots_per_step / step_seconds, 1),
        **peak_memory(),
    }


def feature_throughput(
    encoder: str,
    encoder_kwargs: dict,
    note: str,
    n_patches: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> dict:
    """Patches/s of a frozen, randomly initialised timm encoder over uint8 160-px patches."""
    from stinfer.data.features import backbone_data_config, backbone_features
    from stinfer.nn.encoders import create_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = create_backbone(encoder, None, **encoder_kwargs)
    patches = np.random.default_rng(SEED).integers(0, 256, (n_patches, 3, 160, 160), np.uint8)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        backbone_features(patches[:batch_size], model, batch_size=batch_size, device=device)
    reset_peak_memory()
    with autocast:
        start = time.perf_counter()
        features = backbone_features(patches, model, batch_size=batch_size, device=device)
        seconds = time.perf_counter() - start
    fixed_size = backbone_data_config(model)["fixed_size"]
    return {
        "encoder": encoder,
        "note": note,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "n_features": int(features.shape[1]),
        "input_px": list(fixed_size) if fixed_size else [160, 160],
        "patches": n_patches,
        "batch_size": batch_size,
        "dtype": "bf16-autocast" if bf16 else "fp32",
        "seconds": round(seconds, 3),
        "patches_per_s": round(n_patches / seconds, 1),
        **peak_memory(),
    }


# --------------------------------------------------------------------------- data
def synthetic_section(folder: Path, spots: int, genes: int):
    """One synthetic Visium-like section (hex grid, 55-um spots) with its image in ``folder``."""
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections

    config = SyntheticConfig(n_sections=1, target_spots=spots, n_genes=genes, seed=SEED)
    return make_synthetic_sections(folder, config, overwrite=True)[0]


# --------------------------------------------------------------------------- DDP
def sizes(args: argparse.Namespace) -> dict:
    """Run sizes: the flags, or the CPU smoke's tiny defaults for those not given."""
    smoke = args.cpu_smoke
    pick = lambda value, gpu, cpu: value if value is not None else (cpu if smoke else gpu)  # noqa: E731
    return {
        "steps": pick(args.steps, 20, 2),
        "spots": pick(args.spots, 4000, 60),
        "genes": pick(args.genes, 2000, 30),
        "batch_size": pick(args.batch_size, 128, 8),
        "patches": pick(args.patches, 4096, 32),
        "feature_batch_size": pick(args.feature_batch_size, 256, 16),
    }


def trainer_fields(cpu: bool, devices: int) -> dict:
    """TrainerConfig fields: bf16 autocast on GPUs (fp16 where bf16 is missing); on the CPU
    the preset's own choice (bf16 autocast with bf16 in hardware, else fp32)."""
    fields: dict = {"accelerator": "cpu" if cpu else "gpu", "devices": devices}
    if devices > 1:
        fields["strategy"] = "ddp"
    if not cpu:
        fields["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return fields


def run_ddp(args: argparse.Namespace, slide, folder: Path, devices: int) -> dict:
    """Train with ``devices`` DDP processes in a child process; rank 0's figures."""
    from stinfer.io.atomic import write_h5ad
    from stinfer.io.slide_data import prepare_for_h5ad

    write_h5ad(prepare_for_h5ad(slide), folder / "section.h5ad", overwrite=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", str(folder)]
    command += ["--devices", str(devices)]
    for flag in ("steps", "batch_size"):
        command += [f"--{flag.replace('_', '-')}", str(sizes(args)[flag])]
    if args.cpu_smoke:
        command.append("--cpu-smoke")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.ddp_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"DDP worker still running after --ddp-timeout {args.ddp_timeout} s"}
    if done.returncode != 0:
        return {"error": f"DDP worker exited {done.returncode}", "stderr": done.stderr[-3000:]}
    return json.loads((folder / "ddp.json").read_text())


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of the DDP run (``--ddp-worker FOLDER``); rank 0 writes ``FOLDER/ddp.json``."""
    from stinfer.io.atomic import write_text
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.train import is_global_zero

    if args.cpu_smoke:
        torch.set_num_threads(1)
    folder = Path(args.ddp_worker)
    slide = read_h5ad_slide(folder / "section.h5ad")
    run_sizes = sizes(args)
    figures = train_stevs_paper(
        slide,
        run_sizes["batch_size"],
        run_sizes["steps"],
        trainer_fields(args.cpu_smoke, args.devices),
    )
    if is_global_zero():
        write_text(json.dumps(figures), folder / "ddp.json", overwrite=True)


# --------------------------------------------------------------------------- report
def print_table(results: dict) -> None:
    """The figures, one line per run."""
    env = results["environment"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env["gpus"]) or "none"
    print(
        f"torch {env['torch']} (CUDA {env['cuda_runtime']}), Lightning {env['lightning']}, "
        f"timm {env['timm']}; GPUs: {gpus}; GPU bf16: {env['gpu_bf16_supported']}; "
        f"CPU bf16: {env['cpu_native_bf16']}; mode: {results['mode']}"
    )
    print(
        f"{'run':<22}{'precision':<12}{'procs':>6}{'steps':>7}{'wall s':>9}{'fit s':>8}"
        f"{'steps/s':>9}{'spots/s':>10}{'steady':>10}{'GPU GiB':>9}"
    )
    for name in ("stevs_paper", "stevs_paper_ddp"):
        run = results[name]
        if "skipped" in run or "error" in run:
            print(f"{name:<22}{run.get('skipped') or run['error']}")
            continue
        gpu = run["peak_gpu_memory_gib"]
        steady = run["steady_spots_per_s"]
        print(
            f"{name:<22}{run['precision']:<12}{run['world_size']:>6}{run['steps_per_rank']:>7}"
            f"{run['wall_seconds']:>9.1f}{run['fit_seconds']:>8.1f}{run['steps_per_s']:>9.2f}"
            f"{run['spots_per_s']:>10.1f}{'-' if steady is None else f'{steady:.1f}':>10}"
            f"{'-' if gpu is None else f'{gpu:.2f}':>9}"
        )
    print(
        f"{'features':<24}{'dtype':<15}{'input':>9}{'patches':>9}{'batch':>7}"
        f"{'patches/s':>11}{'GPU GiB':>9}"
    )
    for run in results["features"]:
        gpu = run["peak_gpu_memory_gib"]
        print(
            f"{run['encoder']:<24}{run['dtype']:<15}{run['input_px'][0]:>9}{run['patches']:>9}"
            f"{run['batch_size']:>7}{run['patches_per_s']:>11.1f}"
            f"{'-' if gpu is None else f'{gpu:.2f}':>9}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "GPU check: STEvs paper preset in bf16 on a synthetic Visium-size section (one GPU, "
            "then DDP on all GPUs), and frozen ViT-L/16 and ViT-B/16 feature extraction; prints "
            "the figures and writes them as JSON. Without a CUDA GPU it exits 0 unless "
            "--cpu-smoke runs the same code paths on the CPU at tiny sizes."
        )
    )
    parser.add_argument(
        "--steps", type=int, help="least optimiser steps (whole epochs; 20, smoke 2)"
    )
    parser.add_argument("--spots", type=int, help="spots of the synthetic section (4000, smoke 60)")
    parser.add_argument("--genes", type=int, help="genes of the section and panel (2000, smoke 30)")
    parser.add_argument(
        "--batch-size", type=int, help="STEvs spots per step per process (128, smoke 8)"
    )
    parser.add_argument("--patches", type=int, help="patches for the feature runs (4096, smoke 32)")
    parser.add_argument(
        "--feature-batch-size", type=int, help="patches per forward (256, smoke 16)"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run every code path on the CPU at tiny sizes"
    )
    parser.add_argument(
        "--ddp-cpu",
        type=int,
        default=0,
        metavar="N",
        help="with --cpu-smoke: also a DDP run of N gloo processes (0: skipped)",
    )
    parser.add_argument("--ddp-timeout", type=int, default=900, help="seconds for the DDP run")
    parser.add_argument("--ddp-worker", metavar="FOLDER", help="internal: one rank of the DDP run")
    parser.add_argument("--devices", type=int, default=1, help="internal: processes of the DDP run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stinfer.logs import quiet_third_party

    if args.ddp_worker:
        with quiet_third_party():
            ddp_worker(args)
        return 0
    env = environment()
    if not env["cuda_available"] and not args.cpu_smoke:
        print(NO_GPU_MESSAGE)
        return 0
    cpu = args.cpu_smoke
    if cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    run_sizes = sizes(args)
    results: dict = {"mode": "cpu-smoke" if cpu else "gpu", "sizes": run_sizes, "environment": env}
    with tempfile.TemporaryDirectory(prefix="stinfer-gpu-check-") as workdir, quiet_third_party():
        folder = Path(workdir)
        start = time.perf_counter()
        slide = synthetic_section(folder / "images", run_sizes["spots"], run_sizes["genes"])
        results["synthetic_seconds"] = round(time.perf_counter() - start, 2)
        results["stevs_paper"] = train_stevs_paper(
            slide, run_sizes["batch_size"], run_sizes["steps"], trainer_fields(cpu, 1)
        )
        devices = args.ddp_cpu if cpu else torch.cuda.device_count()
        if devices > 1:
            torch.cuda.empty_cache()
            results["stevs_paper_ddp"] = run_ddp(args, slide, folder, devices)
        elif cpu:
            results["stevs_paper_ddp"] = {"skipped": "DDP skipped (--ddp-cpu 2 runs it)"}
        else:
            results["stevs_paper_ddp"] = {"skipped": "1 GPU: DDP skipped"}
    device = torch.device("cpu" if cpu else "cuda")
    bf16 = env["cpu_native_bf16"] if cpu else env["gpu_bf16_supported"]
    results["features"] = []
    for encoder, kwargs, note in SMOKE_ENCODERS if cpu else GPU_ENCODERS:
        results["features"].append(
            feature_throughput(
                encoder,
                kwargs,
                note,
                run_sizes["patches"],
                run_sizes["feature_batch_size"],
                device,
                bf16,
            )
        )
        if not cpu:
            torch.cuda.empty_cache()
    print_table(results)
    if args.out is not None:
        from stinfer.io.atomic import write_text

        write_text(json.dumps(results, indent=2) + "\n", args.out, overwrite=True)
        print(f"figures written to {args.out}")
    return 1 if "error" in results["stevs_paper_ddp"] else 0


if __name__ == "__main__":
    sys.exit(main())
