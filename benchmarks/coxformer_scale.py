"""CoxFormer at scale: wall time, CPU time and peak memory per stage, one subprocess per case.

Cases (each runs in its own Python process, so its peak resident memory is its own):

- ``embed_her2st``: ``CoxFormerEmbeddings`` (``--preset``, default ``fast``) on the HER2ST
  counts-only sections A1-A6 and D1-D6 (the corpus of issue 12): stages ``read``, ``graph``
  (standardisation + top-K correlation graph), ``features_and_targets`` (SVD node features,
  label-corpus edge correlations), ``completion`` (GraphSAGE), ``autoencoder`` and ``total``;
  the total row's ``notes`` hold the completion test R2 and the gene-level AUCs (LR/SVM,
  collagen genes vs random genes, the built-in label of ``benchmarks/embeddings_her2st.py``).
- ``synthetic_generate``: a 4,000-spot x 15,000-gene synthetic slide
  (:class:`stinfer.data.synthetic.SyntheticConfig`) and its planted embeddings, written to
  ``--work-dir`` for the next case.
- ``impute_synthetic``: the held-out-genes protocol of ``stinfer impute --test-fraction 0.2``
  (:func:`stinfer.evaluate.held_out_genes.held_out_genes_evaluation`: the model, the mean
  profile and k-NN baselines, the shuffled-embedding control) on that slide.
- ``impute_her2st``: the same protocol on a prepared HER2ST slide (``--slides``/``--section``,
  default C2) with a gene embedding table (``--embeddings``, default the one ``embed_her2st``
  wrote into ``--work-dir``); skipped without slides or embeddings.

Rows: ``{case, spots, genes, stage, wall_s, cpu_s, peak_rss_gib, notes}``. ``cpu_s`` is the
process's CPU time (all threads) in the stage; ``peak_rss_gib`` the process's peak resident
set so far (the ``total`` row: the whole case, from ``os.wait4`` on the subprocess). The
protocol's inner steps (``model``, ``knn``, ``control``) come from its own timers: wall time
only.

    python benchmarks/coxformer_scale.py --threads 1 --out coxformer_scale.csv
    python benchmarks/coxformer_scale.py --cases impute_her2st --slides /tmp/her2st \\
        --embeddings genes.h5ad --threads 2 --out c2.csv

From Python (e.g. ``benchmarks/scale.py``): ``rows = run_cases(["embed_her2st"], threads=2)``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

CASES = ("embed_her2st", "synthetic_generate", "impute_synthetic", "impute_her2st")
EMBEDDINGS_FILE = "her2st_embeddings.h5ad"  # written by embed_her2st into the work folder
EMBED_SECTIONS = [f"{p}{i}" for p in "AD" for i in range(1, 7)]
SYNTHETIC_SPOTS, SYNTHETIC_GENES = 4000, 15000
ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent.parent / "shared" / "data" / "her2st"


def _peak_rss_gib(usage: resource.struct_rusage) -> float:
    return usage.ru_maxrss / 2**20  # Linux reports kibibytes


class StageTimer:
    """Collects ``{stage, wall_s, cpu_s, peak_rss_gib}`` rows for one case (in its process)."""

    def __init__(self, case: str) -> None:
        self.case = case
        self.rows: list[dict] = []
        self.spots = self.genes = 0

    @contextmanager
    def stage(self, name: str, notes: str = ""):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.add(name, time.perf_counter() - wall, time.process_time() - cpu, notes)

    def add(self, name: str, wall_s: float, cpu_s: float | None, notes: str = "") -> None:
        self.rows.append(
            {
                "case": self.case,
                "spots": self.spots,
                "genes": self.genes,
                "stage": name,
                "wall_s": round(wall_s, 2),
                "cpu_s": None if cpu_s is None else round(cpu_s, 2),
                "peak_rss_gib": round(_peak_rss_gib(resource.getrusage(resource.RUSAGE_SELF)), 3),
                "notes": notes,
            }
        )


# --------------------------------------------------------------------------- cases (child)
def case_embed_her2st(timer: StageTimer, args: argparse.Namespace) -> None:
    import numpy as np

    from stinfer.evaluate.gene_level import gene_level_auc
    from stinfer.io import read_legacy_st
    from stinfer.models.gene_embeddings import CoxFormerEmbeddings, gene_embedding_config

    sys.path.insert(0, str(ROOT))
    from embeddings_her2st import family_labels

    root = Path(args.data_root)
    with timer.stage("read"):
        corpora = {
            name: read_legacy_st(
                counts=root / "counts" / f"{name}.tsv.gz",
                spots=root / "spots" / f"{name}_selection.tsv",
                sample_id=name,
            )
            for name in EMBED_SECTIONS
        }
    timer.spots = int(sum(c.n_obs for c in corpora.values()))
    config = gene_embedding_config(
        args.preset, trainer={"seed": args.seed, "accelerator": "cpu", "progress_bar": False}
    )
    wall, cpu = time.perf_counter(), time.process_time()
    model = CoxFormerEmbeddings(config).train(corpora)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    timer.genes = model.graph.n_genes
    timings = model.timings
    for stage, key in (
        ("graph", "graph_seconds"),
        ("features_and_targets", "features_and_targets_seconds"),
        ("completion", "completion_seconds"),
        ("autoencoder", "autoencoder_seconds"),
    ):
        timer.add(stage, timings[key], None)
    embeddings = model.get_embeddings()
    labels = family_labels(list(embeddings.obs_names), seed=args.seed)
    auc = gene_level_auc(embeddings, labels, seed=args.seed)
    notes = {
        "completion_r2": round(model.completion.scores["r2"], 4),
        "autoencoder_mse": float(np.float32(model.autoencoder_result.final_mse)),
        "auc_lr": round(auc["lr"]["auc_mean"], 4),
        "auc_svm": round(auc["svm"]["auc_mean"], 4),
        "n_positive": auc["n_positive"],
    }
    timer.add("train_total", wall, cpu, json.dumps(notes))
    from stinfer.io.gene_embeddings import write_gene_embeddings

    write_gene_embeddings(embeddings, Path(args.work_dir) / EMBEDDINGS_FILE, overwrite=True)


def case_synthetic_generate(timer: StageTimer, args: argparse.Namespace) -> None:
    from stinfer.data.synthetic import (
        SyntheticConfig,
        make_synthetic_sections,
        planted_gene_embeddings,
    )

    work = Path(args.work_dir)
    config = SyntheticConfig(
        target_spots=SYNTHETIC_SPOTS, n_genes=SYNTHETIC_GENES, n_sections=1, seed=args.seed
    )
    with timer.stage("generate"):
        (slide,) = make_synthetic_sections(work / "images", config, overwrite=True)
        embeddings = planted_gene_embeddings(slide)
    timer.spots, timer.genes = slide.n_obs, slide.n_vars
    with timer.stage("write"):
        slide.write_h5ad(work / "synthetic.h5ad")
        embeddings.to_parquet(work / "synthetic_embeddings.parquet")


def _held_out_protocol(timer: StageTimer, slide, table, args: argparse.Namespace) -> None:
    from stinfer.evaluate.held_out_genes import held_out_genes_evaluation
    from stinfer.models.coxformer_spatial import coxformer_spatial_config

    timer.spots, timer.genes = slide.n_obs, slide.n_vars
    config = coxformer_spatial_config(
        args.preset, trainer={"progress_bar": False, "accelerator": "cpu"}
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = held_out_genes_evaluation(slide, table, "spatial", config, 0.2, args.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    metrics = result["metrics"]
    for method, stage in (
        ("coxformer", "model"),
        ("knn", "knn"),
        ("coxformer_shuffled", "control"),
    ):
        values = metrics[method]
        notes = {"pcc_median": round(values["pcc_median"], 4), "mse": round(values["mse"], 4)}
        if method == "coxformer":
            notes["best_epoch"] = values.get("best_epoch")
            notes["train_s"] = round(result["model"].fit_result.train_seconds, 1)
        timer.add(stage, values["seconds"], None, json.dumps(notes))
    notes = {"train_genes": len(result["train_genes"]), "test_genes": len(result["test_genes"])}
    timer.add("held_out_protocol", wall, cpu, json.dumps(notes))


def case_impute_synthetic(timer: StageTimer, args: argparse.Namespace) -> None:
    import anndata as ad
    import pandas as pd

    work = Path(args.work_dir)
    with timer.stage("read"):
        slide = ad.read_h5ad(work / "synthetic.h5ad")
        table = pd.read_parquet(work / "synthetic_embeddings.parquet")
    _held_out_protocol(timer, slide, table, args)


def case_impute_her2st(timer: StageTimer, args: argparse.Namespace) -> None:
    from stinfer.io.h5ad import read_h5ad_slide
    from stinfer.models.coxformer_spatial import embedding_table

    embeddings = args.embeddings or Path(args.work_dir) / EMBEDDINGS_FILE
    with timer.stage("read"):
        slide = read_h5ad_slide(Path(args.slides) / f"{args.section}.h5ad")
        table = embedding_table(embeddings)
    _held_out_protocol(timer, slide, table, args)


CASE_FUNCTIONS = {
    "embed_her2st": case_embed_her2st,
    "synthetic_generate": case_synthetic_generate,
    "impute_synthetic": case_impute_synthetic,
    "impute_her2st": case_impute_her2st,
}


def run_in_this_process(case: str, args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    timer = StageTimer(case)
    CASE_FUNCTIONS[case](timer, args)
    for row in timer.rows:  # the size is known once the data are read
        row["spots"], row["genes"] = timer.spots, timer.genes
    return timer.rows


# --------------------------------------------------------------------------- driver (parent)
def _case_arguments(
    threads: int,
    preset: str,
    seed: int,
    data_root: Path,
    work_dir: Path,
    slides: Path | None,
    embeddings: Path | None,
    section: str,
) -> list[str]:
    arguments = [
        f"--threads={threads}",
        f"--preset={preset}",
        f"--seed={seed}",
        f"--data-root={data_root}",
        f"--work-dir={work_dir}",
        f"--section={section}",
    ]
    if slides is not None:
        arguments.append(f"--slides={slides}")
    if embeddings is not None:
        arguments.append(f"--embeddings={embeddings}")
    return arguments


def run_cases(
    cases: list[str] | tuple[str, ...] = CASES,
    threads: int = 1,
    preset: str = "fast",
    seed: int = 0,
    data_root: str | os.PathLike = DEFAULT_DATA,
    work_dir: str | os.PathLike | None = None,
    slides: str | os.PathLike | None = None,
    embeddings: str | os.PathLike | None = None,
    section: str = "C2",
) -> list[dict]:
    """Run each case in its own subprocess with ``threads`` BLAS/torch threads; return rows.

    ``impute_synthetic`` needs ``synthetic_generate`` first (same ``work_dir``; it is added
    when missing); ``impute_her2st`` needs ``slides`` and ``embeddings`` (or ``embed_her2st``
    earlier in the same run, whose embeddings it then uses), else it is skipped. The
    ``total`` row of a case is its whole subprocess: wall time, user + system CPU time and
    peak resident memory from ``os.wait4``.
    """
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {CASES}")
    cases = list(cases)
    if "impute_synthetic" in cases and "synthetic_generate" not in cases:
        cases.insert(cases.index("impute_synthetic"), "synthetic_generate")
    if "impute_her2st" in cases and (
        slides is None or (embeddings is None and "embed_her2st" not in cases)
    ):
        print(
            "impute_her2st: skipped (needs --slides, and --embeddings or embed_her2st)",
            file=sys.stderr,
        )
        cases.remove("impute_her2st")
    work = Path(work_dir or tempfile.mkdtemp(prefix="coxformer_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    arguments = _case_arguments(
        threads, preset, seed, Path(data_root), work, slides, embeddings, section
    )
    rows: list[dict] = []
    for case in cases:
        out = work / f"{case}.rows.json"
        command = [sys.executable, __file__, "--run-case", case, f"--rows-out={out}", *arguments]
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(f"case {case} failed (exit {process.returncode}): {command}")
        case_rows = json.loads(out.read_text())
        spots = case_rows[-1]["spots"] if case_rows else 0
        genes = case_rows[-1]["genes"] if case_rows else 0
        case_rows.append(
            {
                "case": case,
                "spots": spots,
                "genes": genes,
                "stage": "total",
                "wall_s": round(wall, 2),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "peak_rss_gib": round(_peak_rss_gib(usage), 3),
                "notes": json.dumps({"threads": threads, "load_1min": os.getloadavg()[0]}),
            }
        )
        rows.extend(case_rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--threads", type=int, default=1, help="BLAS and torch threads")
    parser.add_argument("--preset", default="fast", choices=["fast", "paper"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="HER2ST folder")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a new temp)")
    parser.add_argument("--slides", type=Path, help="folder of prepared <section>.h5ad")
    parser.add_argument("--embeddings", type=Path, help="gene embeddings for impute_her2st")
    parser.add_argument("--section", default="C2")
    parser.add_argument("--out", type=Path, help="rows as .csv (and .json beside it)")
    parser.add_argument("--run-case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_case:  # child process: one case
        rows = run_in_this_process(args.run_case, args)
        args.rows_out.write_text(json.dumps(rows))
        return
    rows = run_cases(
        args.cases,
        args.threads,
        args.preset,
        args.seed,
        args.data_root,
        args.work_dir,
        args.slides,
        args.embeddings,
        args.section,
    )
    import pandas as pd

    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    if args.out:
        frame.to_csv(args.out, index=False)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
