"""stinfer at the sizes users work at: wall seconds, CPU seconds and peak RSS per stage.

One command for the evidence of issue 12. Every case runs in a fresh Python process (so its peak
RSS is its own) and reports one row per stage: ``case, spots, genes, stage, wall_s, cpu_s,
peak_rss_gib`` (``cpu_s``: user + system seconds of the process, all threads; ``peak_rss_gib``:
the process's peak resident memory up to the end of that stage, i.e. a running maximum).

Cases
-----
``stevs_fast_visium``
    A generated Visium-like pair of sections (synthetic generator, ~4,000 spots x 2,000 genes,
    hexagonal 100-um grid): the group's 2,000-gene panel (the paper's SVG rule), ``fast``
    training on section 1, fused prediction of section 2 (scored against its counts).
``stevs_fast_slides1`` / ``stevs_fast_slides3``
    Two ``fast`` epochs on one and on three such training slides: memory must not grow with
    the number of slides (patches are read per batch from the on-disk cache).
``stevs_paper_epoch``
    Seconds per epoch of the ``paper`` preset (Swin-T, 160-px image decoder) on HER2ST C2
    (187 spots) from timed steps: fine-tuned and frozen encoder, fp32 and bf16 autocast.
``visium_hd_predict``
    A generated Visium HD folder (``--hd-bins-side`` bins a side; 745 gives ~500,000 8-um bins
    under tissue) read with :func:`stinfer.io.read_visium_hd`; a ``fast`` model trained on
    4,000 of its bins predicts every bin, patches streamed from the tiled TIFF and predictions
    written chunk by chunk (:meth:`stinfer.models.stevs.STEvs.write_prediction`).
``her2st_fast``
    Real data: ``fast`` trained on HER2ST C2 (300- and 2,000-gene group panels) predicting C3.
CoxFormer (``--coxformer-cases``, run by ``benchmarks/coxformer_scale.py``, whose docstring
lists the stages): ``embed_her2st`` (``stinfer embed-genes --preset fast`` on the 12 HER2ST
counts-only sections), ``impute_synthetic`` (the held-out-genes protocol of ``stinfer impute
--test-fraction 0.2 --preset fast``, shuffled control included, on a generated 4,000-spot x
15,000-gene slide), ``impute_her2st`` (the same on HER2ST C2 with the ``embed_her2st``
embeddings).

Usage::

    python benchmarks/scale.py --out docs/results --threads 2 \\
        --her2st ../shared/data/her2st [--cases stevs_fast_visium visium_hd_predict ...]

writes ``scale.csv`` and ``scale.md`` (the table) into ``--out``. Report ``uptime``'s load with
the figures: the machine may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CASES = (
    "stevs_fast_visium",
    "stevs_fast_slides1",
    "stevs_fast_slides3",
    "stevs_paper_epoch",
    "visium_hd_predict",
    "her2st_fast",
)
ROW_PREFIX = "SCALE_ROW "


# --------------------------------------------------------------------------- measuring
def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` of ``/proc/self/status`` (its own
    address space), else ``ru_maxrss`` (which on Linux starts at the forking parent's RSS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class StageTimer:
    """Rows of ``(stage, wall_s, cpu_s, peak_rss_gib)`` for one case, printed as JSON lines."""

    def __init__(self, case: str) -> None:
        self.case = case

    def row(self, name: str, spots: int, genes: int, wall: float, cpu: float, **extra) -> dict:
        """The row of a stage that started at ``perf_counter() == wall``, ``process_time() ==
        cpu``."""
        return {
            "case": self.case,
            "spots": int(spots),
            "genes": int(genes),
            "stage": name,
            "wall_s": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "peak_rss_gib": round(peak_rss_kib() / 2**20, 3),
            **extra,
        }

    @contextmanager
    def stage(self, name: str, spots: int, genes: int, **extra):
        """Time the ``with`` block; the yielded dict takes extra columns (e.g. accuracy)."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield extra
        print(ROW_PREFIX + json.dumps(self.row(name, spots, genes, wall, cpu, **extra)), flush=True)


def quiet_trainer(config, **changes):
    config.trainer = dataclasses.replace(config.trainer, progress_bar=False, **changes)
    return config


def synthetic_visium(folder: Path, n_sections: int, n_spots: int, n_genes: int, seed: int = 1):
    from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections

    config = SyntheticConfig(
        seed=seed, n_sections=n_sections, target_spots=n_spots, n_genes=n_genes
    )
    return make_synthetic_sections(folder, config, overwrite=True)


# --------------------------------------------------------------------------- cases
def case_stevs_fast_visium(args, timer: StageTimer) -> None:
    from stinfer.metrics import evaluate_anndata
    from stinfer.models.stevs import STEvs, fast_preset
    from stinfer.preprocess import select_genes

    with timer.stage("generate 2 sections", args.spots, args.genes):
        sections = synthetic_visium(args.workdir / "visium", 2, args.spots, args.genes)
    n_spots = sections[0].n_obs
    with timer.stage("select SVG panel", n_spots, args.genes):
        genes = select_genes(sections, method="svg", n_genes=args.panel)
    model = STEvs([sections[0]], genes, quiet_trainer(fast_preset()))
    with timer.stage("train fast", n_spots, len(genes)):
        model.train()
    with timer.stage("predict fused", sections[1].n_obs, len(genes)) as extra:
        prediction = model.predict(sections[1])
        extra["pcc_median"] = round(evaluate_anndata(prediction, sections[1]).pcc_median, 4)


def case_stevs_fast_slides(args, timer: StageTimer, n_slides: int) -> None:
    from stinfer.models.stevs import STEvs, fast_preset

    with timer.stage(f"generate {n_slides} sections", args.spots, args.genes):
        sections = synthetic_visium(args.workdir / f"slides{n_slides}", n_slides, args.spots, 300)
    model = STEvs(sections, list(sections[0].var_names), quiet_trainer(fast_preset(), max_epochs=2))
    with timer.stage(
        f"train fast 2 epochs, {n_slides} slide(s)", sum(s.n_obs for s in sections), 300
    ):
        model.train()


def case_stevs_paper_epoch(args, timer: StageTimer) -> None:

    from stinfer.io import read_legacy_st
    from stinfer.models.stevs import STEvs, STEvsTask, paper_preset
    from stinfer.preprocess import select_genes

    root = args.her2st
    slide = read_legacy_st(
        root / "counts" / "C2.tsv.gz",
        root / "spots" / "C2_selection.tsv",
        image=root / "images" / "C2.jpg",
        sample_id="C2",
    )
    genes = select_genes([slide], method="svg", n_genes=300)
    for frozen in (False, True):
        for precision in ("fp32", "bf16"):
            config = paper_preset()
            config.module.freeze_encoder = frozen
            model = STEvs([slide], genes, config)
            name = f"paper epoch ({'frozen' if frozen else 'fine-tuned'} Swin-T, {precision})"
            with model._training_sources([slide], None) as sources:
                dataset, transforms = model._dataset([slide], sources, with_counts=True)
                task = STEvsTask(model.module, config.training, colour_transforms=transforms)
                task.log = lambda *a, **k: None
                optimizer = task.configure_optimizers()
                model.module.train()
                batch_size = config.training.batch_size
                batches = [
                    dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
                    for start in range(0, len(dataset), batch_size)
                ]

                train_step(task, optimizer, batches[0], precision)  # warm-up: oneDNN kernels
                with timer.stage(name, slide.n_obs, len(genes)):
                    for batch in batches:
                        train_step(task, optimizer, batch, precision)


def train_step(task, optimizer, batch, precision: str) -> None:
    """One STEvs training step, in fp32 or under CPU bf16 autocast."""
    import torch

    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        loss = task.training_step(batch, 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def case_visium_hd_predict(args, timer: StageTimer) -> None:
    from stinfer.data.synthetic_hd import make_visium_hd_folder
    from stinfer.io import read_visium_hd
    from stinfer.models.stevs import STEvs, fast_preset

    with timer.stage("generate HD folder", args.hd_bins_side**2, args.hd_genes):
        folder = make_visium_hd_folder(
            args.workdir / "hd",
            n_bins_side=args.hd_bins_side,
            n_genes=args.hd_genes,
            overwrite=True,
        )
    with timer.stage("read 8-um bins", folder.n_bins_in_tissue[8], args.hd_genes):
        slide = read_visium_hd(folder.outs_dir, 8, image=folder.image_path)
    rows = np.sort(np.random.default_rng(0).choice(slide.n_obs, 4000, replace=False))
    training = slide[rows].copy()
    genes = list(slide.var_names[np.argsort(-np.asarray(training.X.sum(0)).ravel())[:300]])
    config = quiet_trainer(fast_preset(), max_epochs=10)
    model = STEvs([training], genes, config)
    with timer.stage("train fast on 4,000 bins", 4000, len(genes)):
        model.train()
    model.config.training.test_time_augmentation = False
    del training
    with timer.stage("predict every bin (streamed)", slide.n_obs, len(genes)) as extra:
        start = time.perf_counter()
        model.write_prediction(slide, args.workdir / "hd_prediction.h5ad", overwrite=True)
        extra["bins_per_s"] = round(slide.n_obs / (time.perf_counter() - start), 1)


def case_her2st_fast(args, timer: StageTimer) -> None:
    from stinfer.io import read_legacy_st
    from stinfer.metrics import evaluate_anndata
    from stinfer.models.stevs import STEvs, fast_preset
    from stinfer.preprocess import select_genes

    root = args.her2st
    slides = [
        read_legacy_st(
            root / "counts" / f"{name}.tsv.gz",
            root / "spots" / f"{name}_selection.tsv",
            image=root / "images" / f"{name}.jpg",
            sample_id=name,
        )
        for name in ("C2", "C3", "C4")
    ]
    for panel in (300, 2000):
        with timer.stage(f"select {panel}-gene group panel", slides[0].n_obs, panel):
            genes = select_genes(slides, method="svg", n_genes=panel)
        model = STEvs([slides[0]], genes, quiet_trainer(fast_preset()))
        with timer.stage(f"train fast C2 ({panel} genes)", slides[0].n_obs, len(genes)):
            model.train()
        with timer.stage(f"predict C3 ({panel} genes)", slides[1].n_obs, len(genes)) as extra:
            extra["pcc_median"] = round(
                evaluate_anndata(model.predict(slides[1]), slides[1]).pcc_median, 4
            )


def run_case(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    timer = StageTimer(args.case)
    if args.case == "stevs_fast_visium":
        case_stevs_fast_visium(args, timer)
    elif args.case in ("stevs_fast_slides1", "stevs_fast_slides3"):
        case_stevs_fast_slides(args, timer, int(args.case[-1]))
    elif args.case == "stevs_paper_epoch":
        case_stevs_paper_epoch(args, timer)
    elif args.case == "visium_hd_predict":
        case_visium_hd_predict(args, timer)
    elif args.case == "her2st_fast":
        case_her2st_fast(args, timer)
    else:
        raise SystemExit(f"unknown case {args.case!r}; choose from {CASES}")


# --------------------------------------------------------------------------- driver
def markdown(rows: list[dict]) -> str:
    columns = ["case", "spots", "genes", "stage", "wall_s", "cpu_s", "peak_rss_gib", "extra"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in columns}
        values = [str(row.get(c, "")) for c in columns[:-1]]
        values.append(", ".join(f"{k} {v}" for k, v in extra.items()))
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spots", type=int, default=4000, help="spots per generated section")
    parser.add_argument("--genes", type=int, default=2500, help="genes per generated section")
    parser.add_argument("--panel", type=int, default=2000, help="STEvs gene panel size")
    parser.add_argument("--hd-bins-side", type=int, default=745)
    parser.add_argument("--hd-genes", type=int, default=2000)
    parser.add_argument("--her2st", type=Path, default=Path("../shared/data/her2st"))
    parser.add_argument(
        "--coxformer-cases",
        nargs="*",
        default=["embed_her2st", "impute_synthetic"],
        help="cases of benchmarks/coxformer_scale.py to run after the STEvs cases",
    )
    parser.add_argument("--slides", type=Path, help="prepared HER2ST <section>.h5ad folder")
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stinfer-scale-") as scratch:
        workdir = args.workdir or Path(scratch)
        for case in args.cases:
            if case in ("stevs_paper_epoch", "her2st_fast") and not args.her2st.is_dir():
                print(f"skipping {case}: no HER2ST data at {args.her2st}")
                continue
            command = [sys.executable, __file__, "--case", case, "--workdir", str(workdir)]
            for name in ("threads", "spots", "genes", "panel", "hd_bins_side", "hd_genes"):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            command += ["--her2st", str(args.her2st)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            print("running", case, flush=True)
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            for line in result.stdout.splitlines():
                if line.startswith(ROW_PREFIX):
                    rows.append(json.loads(line[len(ROW_PREFIX) :]))
                    print(rows[-1], flush=True)
            if result.returncode:
                print(result.stderr[-3000:])
                rows.append({"case": case, "stage": f"FAILED (exit {result.returncode})"})
        if args.coxformer_cases:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from coxformer_scale import run_cases

            rows += run_cases(
                args.coxformer_cases,
                threads=args.threads,
                data_root=args.her2st,
                work_dir=workdir / "coxformer",
                slides=args.slides,
            )
    load = os.getloadavg()
    header = f"threads {args.threads}; load average at the end {load[0]:.2f} / {load[1]:.2f}\n\n"
    import pandas as pd

    pd.DataFrame(rows).to_csv(args.out / "scale.csv", index=False)
    (args.out / "scale.md").write_text(header + markdown(rows) + "\n")
    print(header + markdown(rows))


if __name__ == "__main__":
    main()
