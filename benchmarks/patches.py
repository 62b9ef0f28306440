"""Benchmark spot-patch extraction: patches per second and peak memory.

Cases (each in a fresh Python process, so peak RSS is that case's own):

- ``her2st_c2``: the HER2ST C2 section (JPEG, ~9,300 x 9,900 px) read with
  :func:`stinfer.io.read_legacy_st`, default :class:`~stinfer.data.patches.PatchSpec`
  (160 x 160 px, STEvs D.1.2);
- ``her2st_c2_1um``: the same at ``target_pixel_size_um=1.0`` (resampled patches);
- ``tiff_50k``: a generated 50,000 x 50,000 tiled (256 px, JPEG) pyramidal TIFF (levels at
  downsample 1, 4, 16; 0.25 um/px), 20,000 spots on a regular grid in raster order;
- ``tiff_50k_shuffled``: the same spots in random order (as Visium lists barcodes);
- ``tiff_50k_shuffled_cached``: the shuffled spots through
  :func:`~stinfer.data.patches.spot_patches` with a ``cache_dir`` (extracts in spatial order
  and writes the 1.5 GB ``.npy`` cache; the cache file is deleted afterwards; its checksum
  samples every 97th patch, since reading them all would count the whole memmap as RSS);
- ``tiff_50k_0.5um``: raster spots at ``target_pixel_size_um=0.5`` (read at level 0, halved).

Throughput is reported per wall-clock second and per CPU second of the process (user +
system, all threads), the latter being less sensitive to other load on a shared machine.
Except in the ``_cached`` case, patches are consumed from
:func:`~stinfer.data.patches.iter_spot_patches` (chunks of 256) and dropped, as a streaming
feature extractor would. The TIFF is generated once, tile by tile (its
memory stays bounded), into ``--workdir`` (reused when it exists there) or a temporary folder.

Usage::

    python benchmarks/patches.py --her2st ../shared/data/her2st --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 256
LEVEL_DOWNSAMPLES = (1, 4, 16)
PIXEL_SIZE_UM = 0.25
CASES = (
    "her2st_c2",
    "her2st_c2_1um",
    "tiff_50k",
    "tiff_50k_shuffled",
    "tiff_50k_shuffled_cached",
    "tiff_50k_0.5um",
)
TARGETS = {"patches_per_s": 500.0, "peak_rss_mib": 1536.0}  # issue "spine", 50k TIFF cases


def generate_tiff(path: Path, size: int) -> None:
    """Write a ``size`` x ``size`` H&E-like tiled pyramidal JPEG TIFF, one tile at a time.

    Painted by :func:`stinfer.data.synthetic_hd.he_like_tile`, written by
    :func:`stinfer.io.pyramidal_tiff.write_pyramidal_tiff` (the package's one TIFF writer).
    """
    from stinfer.data.synthetic_hd import he_like_tile
    from stinfer.io.pyramidal_tiff import write_pyramidal_tiff

    write_pyramidal_tiff(
        path,
        he_like_tile,
        size,
        size,
        pixel_size_um=PIXEL_SIZE_UM,
        tile_px=TILE,
        level_downsamples=LEVEL_DOWNSAMPLES,
        compression="jpeg",
        jpeg_quality=90,
    )


def grid_spots(size: int, n_spots: int) -> np.ndarray:
    """``n_spots`` spot centres on a regular grid covering the slide, raster order, (x, y)."""
    per_row = int(np.ceil(np.sqrt(n_spots)))
    pitch = size / per_row
    rows, cols = np.divmod(np.arange(n_spots), per_row)
    return np.stack([(cols + 0.5) * pitch, (rows + 0.5) * pitch], axis=1)


def build_her2st_slide(her2st: Path):
    """The C2 slide via the legacy ST reader."""
    from stinfer.io import read_legacy_st

    return read_legacy_st(
        her2st / "counts" / "C2.tsv.gz",
        her2st / "spots" / "C2_selection.tsv",
        image=her2st / "images" / "C2.jpg",
    )


def build_tiff_slide(tiff_path: Path, size: int, n_spots: int, shuffled: bool):
    """A counts-free slide AnnData over the generated TIFF."""
    import scipy.sparse as sp

    from stinfer.io.slide_data import make_slide

    spatial = grid_spots(size, n_spots)
    if shuffled:
        spatial = spatial[np.random.default_rng(0).permutation(n_spots)]
    return make_slide(
        sp.csr_matrix((n_spots, 1), dtype=np.float32),
        [f"spot{i}" for i in range(n_spots)],
        ["GENE"],
        spatial,
        sample_id="synthetic-50k",
        source_format="synthetic",
        source=str(tiff_path),
        image_path=str(tiff_path),
        pixel_size_um=PIXEL_SIZE_UM,
    )


def run_case(case: dict) -> dict:
    """Run one case in this process and return its figures (called in a fresh process)."""
    import psutil

    from stinfer.data.patches import PatchSpec, iter_spot_patches, spot_patches

    name = case["name"]
    if name.startswith("her2st"):
        slide = build_her2st_slide(Path(case["her2st"]))
    else:
        slide = build_tiff_slide(
            Path(case["tiff"]), case["size"], case["spots"], "shuffled" in name
        )
    spec = PatchSpec()
    if name == "her2st_c2_1um":
        spec = PatchSpec(target_pixel_size_um=1.0)
    elif name == "tiff_50k_0.5um":
        spec = PatchSpec(target_pixel_size_um=0.5)
    baseline_mib = psutil.Process().memory_info().rss / 2**20
    load_before = os.getloadavg()[0]
    cpu_start = os.times()
    start = time.perf_counter()
    n_patches, shape, checksum, first_chunk_s = 0, None, 0, None
    if name.endswith("_cached"):
        cache_dir = Path(case["cache_dir"])
        patches = spot_patches(slide, spec, cache_dir=cache_dir)
        n_patches, shape = len(patches), list(patches.shape[1:])
        # a sample of rows: summing every row would page the whole 1.5 GB memmap into RSS
        checksum = int(patches[::97, :, ::40, ::40].sum(dtype=np.int64))
        del patches
        shutil.rmtree(cache_dir, ignore_errors=True)
    else:
        for chunk in iter_spot_patches(slide, spec, chunk_size=256):
            if first_chunk_s is None:
                first_chunk_s = time.perf_counter() - start  # includes a JPEG's full decode
            n_patches += len(chunk)
            shape = list(chunk.shape[1:])
            checksum += int(chunk[:, :, ::40, ::40].sum())
    seconds = time.perf_counter() - start
    cpu_end = os.times()
    cpu_seconds = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "case": name,
        "image": slide.uns["stinfer"]["image_path"],
        "pixel_size_um": slide.uns["stinfer"]["pixel_size_um"],
        "spec": {
            key: value for key, value in dataclasses.asdict(spec).items() if value is not None
        },
        "n_patches": n_patches,
        "patch_shape": shape,
        "seconds": round(seconds, 3),
        "first_chunk_s": None if first_chunk_s is None else round(first_chunk_s, 3),
        "patches_per_s": round(n_patches / seconds, 1),
        "cpu_seconds": round(cpu_seconds, 2),
        "patches_per_cpu_s": round(n_patches / max(cpu_seconds, 1e-9), 1),
        "load_average_1min": round(load_before, 2),
        "rss_before_mib": round(baseline_mib, 1),
        "peak_rss_mib": round(peak_mib, 1),
        "checksum": checksum,
    }


def run_in_fresh_process(case: dict) -> dict:
    """Run ``case`` in a new interpreter so its peak RSS is not polluted by other cases."""
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return {"case": case["name"], "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    header = (
        f"{'case':<26}{'patches':>9}{'seconds':>10}{'patches/s':>11}"
        f"{'patches/cpu-s':>15}{'peak RSS MiB':>14}{'load':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        if "error" in row:
            print(f"{row['case']:<26} error: {row['error']}")
            continue
        print(
            f"{row['case']:<26}{row['n_patches']:>9}{row['seconds']:>10.1f}"
            f"{row['patches_per_s']:>11.0f}{row['patches_per_cpu_s']:>15.0f}"
            f"{row['peak_rss_mib']:>14.0f}{row['load_average_1min']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--her2st", type=Path, help="HER2ST folder (../shared/data/her2st)")
    parser.add_argument("--out", type=Path, default=Path("patches_benchmark.json"))
    parser.add_argument("--workdir", type=Path, help="where to keep the generated TIFF")
    parser.add_argument("--size", type=int, default=50_000, help="TIFF side in pixels")
    parser.add_argument("--spots", type=int, default=20_000, help="spots on the TIFF")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return 0

    cases = [name for name in args.cases.split(",") if name]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if args.her2st is None or not (args.her2st / "images" / "C2.jpg").is_file():
        skipped = [name for name in cases if name.startswith("her2st")]
        if skipped:
            print(f"HER2ST C2 not found (--her2st); skipping {', '.join(skipped)}")
        cases = [name for name in cases if not name.startswith("her2st")]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stinfer-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tiff_path = workdir / f"synthetic_{args.size}.tif"
    generation_s = None
    if any(name.startswith("tiff") for name in cases) and not tiff_path.is_file():
        print(f"generating {args.size} x {args.size} tiled pyramidal TIFF in {tiff_path} ...")
        start = time.perf_counter()
        generate_tiff(tiff_path, args.size)
        generation_s = round(time.perf_counter() - start, 1)
        print(f"  done in {generation_s} s, {tiff_path.stat().st_size / 2**30:.2f} GiB")

    results = []
    try:
        for name in cases:
            case = {"name": name, "her2st": str(args.her2st), "tiff": str(tiff_path)}
            case["cache_dir"] = str(workdir / "patch_cache")
            case.update(size=args.size, spots=args.spots)
            results.append(run_in_fresh_process(case))
            print(json.dumps(results[-1]))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(results)
    report = {
        "benchmark": "spot patches (stinfer.data.patches.iter_spot_patches, chunk 256)",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "tiff": {
            "size_px": args.size,
            "spots": args.spots,
            "tile_px": TILE,
            "compression": "jpeg",
            "level_downsamples": list(LEVEL_DOWNSAMPLES),
            "generation_s": generation_s,
        },
        "targets_tiff_50k": TARGETS,
        "results": results,
    }
    from stinfer.io.atomic import write_text

    write_text(json.dumps(report, indent=2) + "\n", args.out, overwrite=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
