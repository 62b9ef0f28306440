"""The figures behind design decisions that no other benchmark regenerates (``docs/results.md``).

One function per figure, each returning a small table; every row records the machine, the
torch thread count, the load average and the date it was measured on.

- ``depth_oracle``: the observed spot depth (total counts over all genes) times the training
  section's mean expression profile, scored cross-section on HER2ST patient C (median
  per-gene Pearson / Spearman over spots, raw counts, 300-gene group panel). Needs the data.
- ``validation_vs_cross_section``: STEvs ``fast`` trained on one section for several epoch
  budgets (weight averaging off, so both columns score the same, last-epoch weights): the
  within-section validation median PCC against the median PCC on the other sections. Needs
  the data.
- ``stevs_step_profile``: one STEvs ``fast`` training step on the CPU, timed by section
  (forward + loss + backward, AdamW step), with the ``fast`` 40-px image decoder, the
  paper's full-size 160-px decoder (channels 256-32) and none; the decoder's share of a
  step is the difference to the step without one; AdamW fused against the for-each loop.
- ``mean_aggregation``: neighbour-mean aggregation forward + backward on a random graph:
  :class:`stinfer.coexpression.completion.MeanAdjacency` (CSR product, CSR transpose for the
  backward) against PyG's gather-scatter (``MeanAggregation``) and ``torch.sparse.mm(...,
  reduce="mean")``.
- ``jpeg_decode``: one HER2ST section's JPEG decoded whole, with imagecodecs and with Pillow
  plus the copy into a numpy array (what :mod:`stinfer.io.slide_image` does either way), each
  in a fresh process: CPU seconds and the peak resident memory the decode added. Needs the
  data.
- ``attention_dropout``: the CoxFormer spot attention (:class:`stinfer.nn.coxformer.SpotContext`
  at the ``fast`` preset's sizes) forward + backward with and without dropout on the
  attention probabilities.

Timings are medians over repeats after warm-up. Run it alone on the machine::

    python benchmarks/design_figures.py --threads 2 --her2st ../shared/data/her2st

writes ``docs/results/design_figures.md`` and ``design_figures.csv`` beside it. ``--only
NAME`` reruns some figures and keeps the others' rows of an existing CSV; ``--smoke`` runs
tiny sizes (a check that the script works, not figures to publish).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("C2", "C3", "C4")

logger = logging.getLogger("stinfer.benchmarks")


# --------------------------------------------------------------------------- helpers
def machine() -> str:
    """CPU model and core count, e.g. ``AMD EPYC 7B13 (2 cores)``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def median_ms(step: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall milliseconds of ``step()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def read_sections(root: Path, names=SECTIONS) -> dict:
    """The legacy-ST sections of HER2ST patient C, read with stinfer's reader."""
    from stinfer.io import read_legacy_st

    return {
        name: read_legacy_st(
            counts=root / "counts" / f"{name}.tsv.gz",
            spots=root / "spots" / f"{name}_selection.tsv",
            image=root / "images" / f"{name}.jpg",
            sample_id=name,
        )
        for name in names
    }


class MissingData(Exception):
    """A figure's input files are absent; the figure is skipped with this message."""


def require_her2st(root: Path) -> None:
    missing = [
        path
        for name in SECTIONS
        for path in (root / "counts" / f"{name}.tsv.gz", root / "images" / f"{name}.jpg")
        if not path.exists()
    ]
    if missing:
        raise MissingData(f"HER2ST patient C not found under {root} (no {missing[0]}); --her2st")


# --------------------------------------------------------------------------- figures
def depth_oracle(args) -> pd.DataFrame:
    """Median per-gene PCC / SCC of ``depth x mean profile`` for every ordered section pair.

    The per-gene Pearson of ``depth_s * profile_g`` over spots is the correlation of each
    gene's counts with the spot depth (the profile is one positive number per gene), so this
    is how far depth alone goes on raw counts: the floor every model's raw-count PCC sits on.
    """
    from stinfer.io.slide_data import as_dense, panel_counts_csr
    from stinfer.metrics import per_gene_pearson, per_gene_spearman
    from stinfer.preprocess import select_genes

    require_her2st(args.her2st)
    slides = read_sections(args.her2st)
    genes = select_genes(list(slides.values()), n_genes=args.n_genes)
    rows = []
    for train_name, train in slides.items():
        train_counts = as_dense(panel_counts_csr(train, genes), np.float64)
        train_depth = np.asarray(train.X.sum(1), dtype=np.float64).ravel()
        profile = train_counts.sum(0) / train_depth.sum()
        for test_name, test in slides.items():
            if test_name == train_name:
                continue
            truth = as_dense(panel_counts_csr(test, genes), np.float64)
            depth = np.asarray(test.X.sum(1), dtype=np.float64).ravel()
            prediction = depth[:, None] * profile[None, :]
            rows.append(
                {
                    "train": train_name,
                    "test": test_name,
                    "genes": len(genes),
                    "pcc_median": float(np.median(per_gene_pearson(prediction, truth)[0])),
                    "scc_median": float(np.median(per_gene_spearman(prediction, truth)[0])),
                }
            )
    return pd.DataFrame(rows)


def validation_vs_cross_section(args) -> pd.DataFrame:
    """STEvs ``fast`` on ``args.train_section`` for each of ``args.epochs`` budgets.

    ``val_pcc_last`` / ``val_pcc_best`` are the validation median PCC (the preset's 10 % of
    the section's spots, raw counts) at the last and the best epoch; ``cross_pcc_median`` is
    the mean over the other sections of the median per-gene PCC of the fused prediction (raw
    counts). Weight averaging is off so that the final weights are the last epoch's.
    """
    from stinfer.io.slide_data import as_dense, panel_counts_csr
    from stinfer.metrics import per_gene_pearson
    from stinfer.models.stevs import STEvs, fast_preset
    from stinfer.preprocess import select_genes

    require_her2st(args.her2st)
    slides = read_sections(args.her2st)
    genes = select_genes(list(slides.values()), n_genes=args.n_genes)
    train = slides[args.train_section]
    rows = []
    for epochs in args.epochs:
        config = fast_preset()
        config.training.patch_cache_dir = str(args.workdir / "patch_cache")
        config.trainer = dataclasses.replace(
            config.trainer, max_epochs=epochs, progress_bar=False, swa_epoch_start=None
        )
        model = STEvs([train], genes, config)
        result = model.train()
        validation = [row["val/pcc_median"] for row in result.history if "val/pcc_median" in row]
        cross = []
        for name, test in slides.items():
            if name == args.train_section:
                continue
            predicted = model.predict(test)
            truth = as_dense(panel_counts_csr(test, genes))
            cross.append(float(np.median(per_gene_pearson(predicted.X, truth)[0])))
        rows.append(
            {
                "train": args.train_section,
                "epochs": epochs,
                "val_pcc_last": validation[-1] if validation else float("nan"),
                "val_pcc_best": max(validation) if validation else float("nan"),
                "cross_pcc_median": float(np.mean(cross)),
                "train_s": result.train_seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return pd.DataFrame(rows)


def _step_timings(module_config, training, batch: tuple, repeats: int) -> dict:
    """Median ms of forward + loss + backward and of the AdamW step (fused and for-each)."""
    from stinfer.models.stevs import STEvsTask
    from stinfer.nn.stevs import STEvsModule

    torch.manual_seed(0)
    module = STEvsModule(batch[2].shape[1], module_config)
    module.train()
    task = STEvsTask(module, training)

    def backward() -> None:
        module.zero_grad(set_to_none=False)
        task.training_step(batch, 0).backward()

    backward_ms = median_ms(backward, repeats)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimiser_ms = {}
    for fused in (True, False):
        optimiser = torch.optim.AdamW(
            parameters, lr=module_config.lr, weight_decay=module_config.weight_decay, fused=fused
        )
        optimiser_ms[fused] = median_ms(optimiser.step, repeats)
    return {
        "forward_backward_ms": backward_ms,
        "adamw_fused_ms": optimiser_ms[True],
        "adamw_foreach_ms": optimiser_ms[False],
        "parameters": sum(p.numel() for p in parameters),
    }


def stevs_step_profile(args) -> pd.DataFrame:
    """Per-step milliseconds of a STEvs ``fast`` training step with three image decoders.

    A synthetic batch of ``args.batch`` random 160-px patches, coordinates and counts of
    ``args.n_genes`` genes through :class:`~stinfer.models.stevs.STEvsTask` (the step
    Lightning runs: augmentation, modality dropout drawn per step, subset ELBOs), timed as
    forward + loss + backward and, apart, the AdamW step. ``decoder_share`` is the step
    (with fused AdamW) minus the step without a decoder, over the step; ``adamw_share`` the
    fused AdamW step over the step.
    """
    from stinfer.models.stevs import fast_preset

    preset = fast_preset()
    generator = torch.Generator().manual_seed(0)
    size = preset.module.patch_size
    patches = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    coords = torch.rand(args.batch, 2, generator=generator) * 2 - 1
    counts = torch.poisson(torch.full((args.batch, args.n_genes), 2.0), generator=generator)
    batch = (patches, coords, counts, patches, torch.zeros(args.batch, dtype=torch.long))
    decoders = {
        "fast (8-64 ch, 40 px)": {},
        "full size (32-256 ch, 160 px)": {
            "decoder_channels": (256, 128, 64, 32),
            "image_recon_size": None,
        },
        "none": {"image_decoder": False},
    }
    timings = {}
    for name, changes in decoders.items():
        module_config = dataclasses.replace(preset.module, **changes)
        timings[name] = _step_timings(module_config, preset.training, batch, args.repeats)
    no_decoder = timings["none"]["forward_backward_ms"] + timings["none"]["adamw_fused_ms"]
    rows = []
    for name, timing in timings.items():
        step_ms = timing["forward_backward_ms"] + timing["adamw_fused_ms"]
        rows.append(
            {
                "image_decoder": name,
                "batch": args.batch,
                "genes": args.n_genes,
                "parameters": timing["parameters"],
                "step_ms": step_ms,
                "forward_backward_ms": timing["forward_backward_ms"],
                "adamw_fused_ms": timing["adamw_fused_ms"],
                "adamw_foreach_ms": timing["adamw_foreach_ms"],
                "decoder_share": (step_ms - no_decoder) / step_ms,
                "adamw_share": timing["adamw_fused_ms"] / step_ms,
                "adamw_foreach_share": timing["adamw_foreach_ms"]
                / (timing["forward_backward_ms"] + timing["adamw_foreach_ms"]),
            }
        )
    return pd.DataFrame(rows)


def mean_aggregation(args) -> pd.DataFrame:
    """Forward + backward ms of three neighbour-mean aggregations on one random graph.

    ``args.nodes`` nodes, each with ``args.neighbours`` random in-neighbours, ``args.features``
    float32 features; the loss is the sum of the output. The three agree (checked first).
    """
    from torch_geometric.nn.aggr import MeanAggregation

    from stinfer.coexpression.completion import MeanAdjacency

    generator = torch.Generator().manual_seed(0)
    n, k = args.nodes, args.neighbours
    target = torch.arange(n).repeat_interleave(k)
    source = torch.randint(0, n, (n * k,), generator=generator)
    edges = torch.unique(torch.stack([source, target]), dim=1)  # duplicates count once
    features = torch.randn(n, args.features, generator=generator, requires_grad=True)

    adjacency = MeanAdjacency(edges, n)
    gather_scatter = MeanAggregation()
    ones = torch.sparse_coo_tensor(edges.flip(0), torch.ones(edges.shape[1]), (n, n))
    ones = ones.coalesce().to_sparse_csr()
    methods = {
        "MeanAdjacency (CSR, CSR transpose backward)": lambda x: adjacency(x),
        "PyG gather-scatter (MeanAggregation)": lambda x: gather_scatter(
            x[edges[0]], edges[1], dim_size=n
        ),
        'torch.sparse.mm(..., reduce="mean")': lambda x: torch.sparse.mm(ones, x, reduce="mean"),
    }
    reference = methods["MeanAdjacency (CSR, CSR transpose backward)"](features)
    for aggregate in methods.values():
        torch.testing.assert_close(aggregate(features), reference, rtol=1e-4, atol=1e-5)
    rows = []
    for name, aggregate in methods.items():

        def forward(aggregate=aggregate) -> torch.Tensor:
            with torch.no_grad():
                return aggregate(features)

        def forward_backward(aggregate=aggregate) -> None:
            features.grad = None
            aggregate(features).sum().backward()

        rows.append(
            {
                "method": name,
                "nodes": n,
                "edges": edges.shape[1],
                "features": args.features,
                "forward_ms": median_ms(forward, args.repeats),
                "forward_backward_ms": median_ms(forward_backward, args.repeats),
            }
        )
    fastest = rows[0]["forward_backward_ms"]
    for row in rows:
        row["vs_mean_adjacency"] = row["forward_backward_ms"] / fastest
    return pd.DataFrame(rows)


_DECODE = """
import json, resource, sys, time
from pathlib import Path
from PIL import Image
import imagecodecs
from stinfer.io.slide_image import _pillow_pixels

def status_gb(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2**20

path, how = Path(sys.argv[1]), sys.argv[2]
Image.MAX_IMAGE_PIXELS = None
Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
before_gb = status_gb("VmRSS")
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
if how == "imagecodecs":
    pixels = imagecodecs.jpeg8_decode(path.read_bytes())
else:
    with Image.open(path) as image:
        image.load()
        pixels = _pillow_pixels(image)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "height": pixels.shape[0], "width": pixels.shape[1],
    "wall_s": time.perf_counter() - start,
    "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
    "pixels_gb": pixels.nbytes / 2**30,
    "peak_rss_added_gb": status_gb("VmHWM") - before_gb,
}))
"""


def jpeg_decode(args) -> pd.DataFrame:
    """CPU seconds and peak memory of decoding ``args.jpeg`` whole, each decoder in a fresh
    process after its imports: ``peak_rss_added_gb`` is the peak resident memory during the
    decode (Linux ``VmHWM``, reset just before it) minus the resident memory before it,
    ``pixels_gb`` the size of the decoded array. Best (least CPU) of ``args.jpeg_repeats``."""
    path = args.jpeg or args.her2st / "images" / f"{args.train_section}.jpg"
    if not path.exists():
        raise MissingData(f"no JPEG at {path}; --her2st or --jpeg")
    rows = []
    for how in ("imagecodecs", "pillow"):
        best = None
        for _ in range(args.jpeg_repeats):
            done = subprocess.run(
                [sys.executable, "-c", _DECODE, str(path), how],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if best is None or result["cpu_s"] < best["cpu_s"]:
                best = result
        rows.append({"decoder": how, "image": path.name, **best})
    return pd.DataFrame(rows)


def attention_dropout(args) -> pd.DataFrame:
    """Forward + backward ms of the spot attention with and without attention dropout.

    :class:`~stinfer.nn.coxformer.SpotContext` at the CoxFormer spatial ``fast`` preset's
    width, heads and layers, in training mode, over ``args.spots`` random tokens in groups of
    ``args.group_size``; the dropout of the residual and feed-forward branches stays at the
    preset's value in both rows. ``extra_vs_rest`` is the dropout's added time over the
    layer's time without it.
    """
    from stinfer.models.coxformer_spatial import fast_preset
    from stinfer.nn.coxformer import SpotContext

    preset = fast_preset().module
    tokens = torch.randn(args.spots, preset.d_model, requires_grad=True)
    rows = []
    for probability in (0.0, 0.1):
        torch.manual_seed(0)
        context = SpotContext(
            preset.d_model,
            preset.n_heads,
            preset.feedforward_dim,
            preset.dropout,
            preset.n_spot_layers,
            attention_dropout=probability,
        ).train()
        generator = torch.Generator().manual_seed(0)

        def step(context=context, generator=generator) -> None:
            tokens.grad = None
            context.zero_grad(set_to_none=True)
            context(tokens, args.group_size, generator).sum().backward()

        rows.append(
            {
                "attention_dropout": probability,
                "spots": args.spots,
                "group_size": args.group_size,
                "d_model": preset.d_model,
                "heads": preset.n_heads,
                "layers": preset.n_spot_layers,
                "forward_backward_ms": median_ms(step, args.repeats),
            }
        )
    without = rows[0]["forward_backward_ms"]
    for row in rows:
        row["extra_vs_rest"] = (row["forward_backward_ms"] - without) / without
    return pd.DataFrame(rows)


FIGURES: dict[str, Callable[[argparse.Namespace], pd.DataFrame]] = {
    "depth_oracle": depth_oracle,
    "validation_vs_cross_section": validation_vs_cross_section,
    "stevs_step_profile": stevs_step_profile,
    "mean_aggregation": mean_aggregation,
    "jpeg_decode": jpeg_decode,
    "attention_dropout": attention_dropout,
}

TITLES = {
    "depth_oracle": "Depth oracle: observed spot depth x training mean profile (HER2ST C, raw counts)",
    "validation_vs_cross_section": "STEvs `fast`: within-section validation vs cross-section PCC by epochs",
    "stevs_step_profile": "STEvs `fast` training step on the CPU: image decoder and AdamW shares",
    "mean_aggregation": "Neighbour-mean aggregation, forward + backward",
    "jpeg_decode": "Whole-JPEG decode: imagecodecs vs Pillow + copy",
    "attention_dropout": "CoxFormer spot attention with and without attention dropout",
}

SMOKE = {
    "batch": 4,
    "n_genes": 50,
    "repeats": 2,
    "nodes": 400,
    "neighbours": 8,
    "features": 16,
    "spots": 192,
    "group_size": 64,
    "epochs": [1, 2],
    "jpeg_repeats": 1,
}


# --------------------------------------------------------------------------- output
def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    header = "| " + " | ".join(str(column) for column in frame.columns) + " |"
    rule = "|" + "|".join(" --- " for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


HEADER = """# Figures behind design decisions

Written by `python benchmarks/design_figures.py` (see its docstring for what each figure
measures); `docs/results.md` "Figures behind design decisions" says what each supports.
"""


def section(name: str, frame: pd.DataFrame, provenance: dict) -> str:
    """A figure's Markdown: its title, where and when it was measured, its table."""
    return "\n".join(
        [
            f"## {name}: {TITLES[name]}",
            "",
            f"{provenance['machine']}, {provenance['threads']} torch threads, load average "
            f"{provenance['load_avg']}, {provenance['date']}; {provenance['sizes']} sizes.",
            "",
            markdown_table(frame),
            "",
        ]
    )


def long_rows(name: str, frame: pd.DataFrame, provenance: dict) -> pd.DataFrame:
    """``frame`` as CSV rows ``figure, row, field, value`` plus the provenance columns: one
    CSV holds every figure, whatever its columns."""
    rows = frame.reset_index(drop=True).reset_index(names="row")
    rows = rows.melt(id_vars="row", var_name="field", value_name="value", ignore_index=True)
    rows = rows.sort_values("row", kind="stable")
    rows.insert(0, "figure", name)
    return rows.assign(**provenance)


def sections_of(text: str) -> dict[str, str]:
    """The figure sections of a Markdown file :func:`section` wrote, by figure name."""
    found = {}
    for chunk in text.split("\n## ")[1:]:
        name = chunk.split(":", 1)[0]
        if name in FIGURES:
            found[name] = "## " + chunk.rstrip("\n") + "\n"
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(FIGURES),
        metavar="NAME",
        help=f"these figures only, of: {', '.join(FIGURES)}",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument(
        "--her2st",
        type=Path,
        default=REPO.parent / "shared" / "data" / "her2st",
        help="HER2ST folder (counts/, spots/, images/); figures that need it are skipped without it",
    )
    parser.add_argument("--jpeg", type=Path, help="JPEG to decode (default: the train section's)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "results" / "design_figures.md",
        help="Markdown written (the CSV goes beside it)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=REPO / "results" / "design_figures", help="patch cache"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--train-section", default="C2", choices=SECTIONS)
    parser.add_argument("--n-genes", type=int, default=300, help="gene panel (300 SVGs)")
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=[10, 30, 100, 300], help="STEvs epoch budgets"
    )
    parser.add_argument("--batch", type=int, default=32, help="STEvs step batch (fast: 32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per kernel")
    parser.add_argument("--nodes", type=int, default=10_000, help="graph nodes (10,000)")
    parser.add_argument("--neighbours", type=int, default=50, help="in-neighbours per node (50)")
    parser.add_argument("--features", type=int, default=128, help="completion hidden_dim")
    parser.add_argument("--spots", type=int, default=2048, help="fast max_spots_per_step")
    parser.add_argument("--group-size", type=int, default=1024, help="fast group_size")
    parser.add_argument("--jpeg-repeats", type=int, default=3, help="best of N processes")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    from stinfer.io.atomic import write_text

    csv_path = args.out.with_suffix(".csv")
    names = args.only or list(FIGURES)
    frames, rendered = [], {}
    if args.only and csv_path.exists() and args.out.exists():
        kept = pd.read_csv(csv_path)
        frames.append(kept[~kept["figure"].isin(names)])
        rendered = {
            name: text
            for name, text in sections_of(args.out.read_text()).items()
            if name not in names
        }
    for name in names:
        provenance = {
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "load_avg": load_average(),
            "date": datetime.date.today().isoformat(),
            "sizes": "smoke (tiny: not figures)" if args.smoke else "full",
        }
        start = time.perf_counter()
        try:
            frame = FIGURES[name](args)
        except MissingData as error:
            print(f"{name}: skipped, {error}", flush=True)
            continue
        frames.append(long_rows(name, frame, provenance))
        rendered[name] = section(name, frame, provenance)
        print(f"{name} ({time.perf_counter() - start:.1f} s)", flush=True)
        print(rendered[name], flush=True)
    if not rendered:
        print("no figure measured; nothing written", flush=True)
        return
    order = {name: index for index, name in enumerate(FIGURES)}
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values("figure", key=lambda column: column.map(order), kind="stable")
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    write_text(buffer.getvalue(), csv_path, overwrite=True)
    body = [rendered[name] for name in FIGURES if name in rendered]
    write_text("\n".join([HEADER, *body]), args.out, overwrite=True)
    print(f"wrote {args.out} and {csv_path}", flush=True)


if __name__ == "__main__":
    main()
