"""docs/tutorial.md runs as written: every ```bash and ```python block, in order.

The blocks run in a temporary folder, each in its own process (a shell block through
``bash -euo pipefail``, a Python block as a script), with the tutorial's ``DATA=...`` line
pointed at the data: small generated sections written in the HER2ST legacy-ST layout by
default (CI-sized), the real HER2ST sections under ``-m slow`` when ``../shared/data`` (or
``STINFER_SHARED_DATA``) has them.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections

REPO_ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = REPO_ROOT / "docs" / "tutorial.md"
FENCE = re.compile(r"^```(bash|python)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
DATA_LINE = re.compile(r"^DATA=.*$", re.MULTILINE)
SECTIONS_WITH_IMAGE = ("C2", "C3")
SECTIONS_COUNTS_ONLY = ("A1", "D1")
MODELS = ("stevs", "ridge")
FIGURES = ("c2_section.png", "c3_prediction.png", "c3_imputed.png")


def tutorial_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced ``bash`` and ``python`` blocks of a markdown text, as (language, code), in order."""
    return [(match.group(1), match.group(2)) for match in FENCE.finditer(text)]


def write_legacy_st_sections(root: Path) -> Path:
    """Write four small generated sections in the HER2ST layout under ``root``; return it.

    ``counts/<S>.tsv.gz`` (spots x genes, rows ``<x>x<y>``), ``spots/<S>_selection.tsv``
    (``x``, ``y``, ``new_x``, ``new_y``, ``pixel_x``, ``pixel_y``, ``selected``) and, for C2
    and C3, ``images/<S>.jpg``: the names the tutorial reads.
    """
    names = SECTIONS_WITH_IMAGE + SECTIONS_COUNTS_ONLY
    config = SyntheticConfig(
        n_sections=len(names), grid="square", target_spots=120, n_genes=240, pixel_size_um=4.0
    )
    slides = make_synthetic_sections(root / "generated", config)
    for folder in ("counts", "spots", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, slide in zip(names, slides, strict=True):
        array_x = slide.obs["array_col"].to_numpy()
        array_y = slide.obs["array_row"].to_numpy()
        spot_ids = [f"{x}x{y}" for x, y in zip(array_x, array_y, strict=True)]
        counts = pd.DataFrame(
            slide.X.toarray().astype(np.int64), index=spot_ids, columns=slide.var_names
        )
        counts.to_csv(root / "counts" / f"{name}.tsv.gz", sep="\t")
        pixel_xy = np.asarray(slide.obsm["spatial"])
        pd.DataFrame(
            {
                "x": array_x,
                "y": array_y,
                "new_x": array_x.astype(float),
                "new_y": array_y.astype(float),
                "pixel_x": pixel_xy[:, 0],
                "pixel_y": pixel_xy[:, 1],
                "selected": 1,
            }
        ).to_csv(root / "spots" / f"{name}_selection.tsv", sep="\t", index=False)
        if name in SECTIONS_WITH_IMAGE:
            image = Image.open(slide.uns["stinfer"]["image_path"]).convert("RGB")
            image.save(root / "images" / f"{name}.jpg", quality=90)
    return root


def run_tutorial(data_root: Path, workdir: Path, timeout_s: float = 900) -> None:
    """Run every block of docs/tutorial.md in ``workdir``, with ``DATA`` set to ``data_root``.

    A failing block fails the test with the block and its output.
    """
    blocks = tutorial_blocks(TUTORIAL.read_text())
    assert [language for language, _ in blocks].count("bash") >= 4, "tutorial blocks not found"
    assert DATA_LINE.search(blocks[0][1]), "the first block must set DATA=..."
    env = {
        **os.environ,
        "DATA": str(data_root),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONWARNINGS": "ignore",
    }
    for number, (language, code) in enumerate(blocks, start=1):
        if language == "bash":
            code = DATA_LINE.sub(lambda _: f"DATA={data_root}", code)
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            script = workdir / f"tutorial_block_{number}.py"
            script.write_text(code)
            command = [sys.executable, str(script)]
        done = subprocess.run(
            command,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert done.returncode == 0, (
            f"tutorial block {number} ({language}) failed with status {done.returncode}:\n"
            f"{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


def check_outputs(workdir: Path) -> None:
    """The files each step promises exist, and every score is a finite number."""
    out = workdir / "runs" / "tutorial"
    for name in SECTIONS_WITH_IMAGE + SECTIONS_COUNTS_ONLY:
        assert (out / f"{name}.h5ad").is_file()
    for model in MODELS:
        assert (out / f"{model}_C2" / "config.json").is_file()
        assert (out / f"C3_{model}.h5ad").is_file()
        assert (out / f"C3_{model}.per_gene.csv").is_file()
        metrics = json.loads((out / f"C3_{model}.json").read_text())
        for key in ("mse", "pcc_median", "scc_median", "pcc_median_depthnorm"):
            assert math.isfinite(metrics[key]), (model, key, metrics[key])
        assert metrics["n_spots"] > 0 and metrics["n_genes"] > 0
    assert (out / "svd_genes.h5ad").is_file()
    assert (out / "C3_heldout.h5ad").is_file()
    record = json.loads((out / "C3_heldout.metrics.json").read_text())
    assert record["n_test_genes"] > 0
    for method, values in {"coxformer": record, **record["baselines"]}.items():
        assert math.isfinite(values["pcc_median"]), (method, values)
    for figure in FIGURES:
        path = workdir / "docs" / "tutorial_files" / figure
        assert path.is_file() and path.stat().st_size > 1000, path


def test_tutorial_blocks_are_found_and_its_figures_are_committed() -> None:
    text = TUTORIAL.read_text()
    languages = [language for language, _ in tutorial_blocks(text)]
    assert languages.count("bash") >= 4 and languages.count("python") >= 3
    for figure in FIGURES:
        assert f"(tutorial_files/{figure})" in text
        path = TUTORIAL.parent / "tutorial_files" / figure
        assert path.is_file() and path.stat().st_size < 300_000, path


def test_tutorial_runs_on_generated_sections(tmp_path: Path) -> None:
    data_root = write_legacy_st_sections(tmp_path / "her2st_like")
    workdir = tmp_path / "work"
    workdir.mkdir()
    run_tutorial(data_root, workdir)
    check_outputs(workdir)


@pytest.mark.slow
def test_tutorial_runs_on_real_her2st(her2st_dir: Path, tmp_path: Path) -> None:
    run_tutorial(her2st_dir, tmp_path)
    check_outputs(tmp_path)
