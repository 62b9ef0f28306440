"""`stinfer prepare`: the documented command lines, and how it treats outputs and user errors."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import tifffile
from PIL import Image

from stinfer import cli
from stinfer.io import read_h5ad_slide, read_legacy_st, read_visium
from stinfer.io.slide_data import slide_meta

GENES = ["ERBB2", "GRB7", "ACTB", "KRT8"]


@pytest.fixture
def stinfer(monkeypatch):
    """`stinfer` with just the commands these tests run (others may be mid-edit)."""
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("prepare", "demo"))
    return cli.main


def write_legacy_section(folder: Path, name: str, with_image: bool) -> None:
    """A 4 x 5 legacy ST section (``<name>.tsv.gz``, ``<name>_selection.tsv``, ``<name>.jpg``)."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(3, 8), np.arange(10, 14), indexing="ij")
    array_xy = np.column_stack([xs.ravel(), ys.ravel()])
    pixel_xy = 60.0 + (array_xy - [3, 10]) * 80.0 + rng.normal(0, 1, array_xy.shape)
    spots = pd.DataFrame(
        {
            "x": array_xy[:, 0],
            "y": array_xy[:, 1],
            "pixel_x": pixel_xy[:, 0],
            "pixel_y": pixel_xy[:, 1],
            "selected": 1,
        }
    )
    spots.to_csv(folder / f"{name}_selection.tsv", sep="\t", index=False)
    names = [f"{x}x{y}" for x, y in array_xy]
    counts = pd.DataFrame(rng.poisson(3, (len(names), len(GENES))), index=names, columns=GENES)
    counts.to_csv(folder / f"{name}.tsv.gz", sep="\t")
    if with_image:
        pixels = rng.integers(0, 256, (420, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=95)


def write_space_ranger(folder: Path) -> None:
    """A Space Ranger 2.x folder (Matrix Market, positions with header) and a full-res TIFF."""
    barcodes = [f"AAAC{index:04d}-1" for index in range(6)]
    (folder / "filtered_feature_bc_matrix").mkdir(parents=True)
    (folder / "spatial").mkdir()
    counts = np.arange(18).reshape(6, 3)
    scipy.io.mmwrite(
        folder / "filtered_feature_bc_matrix/matrix.mtx", sp.coo_matrix(counts.T), field="integer"
    )
    pd.Series(barcodes).to_csv(
        folder / "filtered_feature_bc_matrix/barcodes.tsv", header=False, index=False
    )
    pd.DataFrame({"id": ["E1", "E2", "E3"], "name": GENES[:3], "type": "Gene Expression"}).to_csv(
        folder / "filtered_feature_bc_matrix/features.tsv", sep="\t", header=False, index=False
    )
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": [0, 0, 1, 1, 2, 2],
            "array_col": [0, 2, 1, 3, 0, 2],
            "pxl_row_in_fullres": [100.0, 100.0, 300.0, 300.0, 500.0, 500.0],
            "pxl_col_in_fullres": [100.0, 500.0, 300.0, 700.0, 100.0, 500.0],
        }
    ).to_csv(folder / "spatial/tissue_positions.csv", index=False)
    (folder / "spatial/scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 60.0, "tissue_hires_scalef": 0.2})
    )
    Image.new("RGB", (160, 120), "white").save(folder / "spatial/tissue_hires_image.png")
    tifffile.imwrite(
        folder.parent / "FULLRES.tif", np.zeros((640, 800, 3), np.uint8), tile=(256, 256)
    )


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files an interrupted atomic write could leave behind."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_legacy_st_line_as_documented_writes_the_reader_slide(stinfer, tmp_path, monkeypatch):
    write_legacy_section(tmp_path, "C2", with_image=True)
    monkeypatch.chdir(tmp_path)
    line = (
        "prepare --format legacy-st --counts C2.tsv.gz --spots C2_selection.tsv --image C2.jpg "
        "--sample-id C2 --out C2.h5ad"
    )
    assert stinfer(line.split()) == 0

    written = ad.read_h5ad("C2.h5ad")
    expected = read_legacy_st("C2.tsv.gz", "C2_selection.tsv", image="C2.jpg", sample_id="C2")
    np.testing.assert_array_equal(written.X.toarray(), expected.X.toarray())
    assert list(written.obs_names) == list(expected.obs_names)
    assert all(name.startswith("C2_") for name in written.obs_names)
    assert list(written.obs["spot_id"]) == list(expected.obs["spot_id"])
    assert set(written.obs["sample_id"]) == {"C2"}
    # reading the prepared file back keeps its names (the sample id is not prefixed twice)
    assert list(read_h5ad_slide("C2.h5ad").obs_names) == list(written.obs_names)
    np.testing.assert_array_equal(written.obsm["spatial"], expected.obsm["spatial"])
    meta = slide_meta(written)
    assert meta["sample_id"] == "C2"
    assert meta["image_path"] == str((tmp_path / "C2.jpg").resolve())
    assert meta["pixel_size_um"] == pytest.approx(2.5, rel=0.01)  # 200 um / 80 px
    # outputs get the usual permissions, not mkstemp's owner-only 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat("C2.h5ad").st_mode) == 0o666 & ~umask
    assert leftovers(tmp_path) == []


def test_counts_only_legacy_st_line_has_no_image(stinfer, tmp_path, monkeypatch, capsys):
    write_legacy_section(tmp_path, "A1", with_image=False)
    monkeypatch.chdir(tmp_path)
    line = (
        "prepare --format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv --sample-id A1 "
        "--out A1.h5ad"
    )
    assert stinfer(line.split()) == 0
    meta = slide_meta(ad.read_h5ad("A1.h5ad"))
    assert meta["image_path"] is None
    assert meta["sample_id"] == "A1"
    assert "image none" in capsys.readouterr().out


def test_visium_line_with_and_without_a_full_resolution_image(stinfer, tmp_path, monkeypatch):
    write_space_ranger(tmp_path / "outs")
    monkeypatch.chdir(tmp_path)
    assert stinfer("prepare --format visium --path outs --out S.h5ad".split()) == 0
    hires = slide_meta(ad.read_h5ad("S.h5ad"))
    assert hires["image_path"].endswith("tissue_hires_image.png")
    assert hires["image_scale"] == pytest.approx(0.2)

    line = "prepare --format visium --path outs --image FULLRES.tif --out S_full.h5ad"
    assert stinfer(line.split()) == 0
    written = ad.read_h5ad("S_full.h5ad")
    expected = read_visium("outs", image="FULLRES.tif")
    np.testing.assert_array_equal(written.X.toarray(), expected.X.toarray())
    np.testing.assert_array_equal(written.obsm["spatial"], expected.obsm["spatial"])
    assert slide_meta(written)["image_scale"] == 1.0


def test_h5ad_line_attaches_the_named_image(stinfer, tmp_path, monkeypatch):
    write_space_ranger(tmp_path / "outs")
    plain = read_visium(tmp_path / "outs")
    bare = ad.AnnData(X=plain.X.copy(), obs=plain.obs[[]].copy(), var=plain.var[[]].copy())
    bare.obsm["spatial"] = plain.obsm["spatial"]
    bare.write_h5ad(tmp_path / "S.h5ad")
    (tmp_path / "FULLRES.tif").rename(tmp_path / "S.tif")
    monkeypatch.chdir(tmp_path)

    line = "prepare --format h5ad --path S.h5ad --image S.tif --out S_prepared.h5ad"
    assert stinfer(line.split()) == 0
    written = ad.read_h5ad("S_prepared.h5ad")
    np.testing.assert_array_equal(written.X.toarray(), plain.X.toarray())
    assert slide_meta(written)["image_path"] == str((tmp_path / "S.tif").resolve())
    again = read_h5ad_slide("S_prepared.h5ad")  # the prepared file reads back as a slide
    assert again.n_obs == plain.n_obs


def test_existing_output_is_refused_without_overwrite(stinfer, tmp_path, monkeypatch, capsys):
    write_legacy_section(tmp_path, "A1", with_image=False)
    monkeypatch.chdir(tmp_path)
    line = "prepare --format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv --out A1.h5ad"
    Path("A1.h5ad").write_text("earlier result")

    assert stinfer(line.split()) == 2
    assert "A1.h5ad: already exists; pass --overwrite" in capsys.readouterr().err
    assert Path("A1.h5ad").read_text() == "earlier result"

    assert stinfer([*line.split(), "--overwrite"]) == 0
    assert ad.read_h5ad("A1.h5ad").n_obs == 20


def test_interrupted_write_leaves_no_output(stinfer, tmp_path, monkeypatch, capsys):
    write_legacy_section(tmp_path, "A1", with_image=False)
    monkeypatch.chdir(tmp_path)

    def write_half_then_interrupt(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half an h5ad")
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", write_half_then_interrupt)
    line = "prepare --format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv --out A1.h5ad"
    assert stinfer(line.split()) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not Path("A1.h5ad").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("--format legacy-st --counts A1.tsv.gz --out x.h5ad", "needs --counts and --spots"),
        (
            "--format legacy-st --counts nope.tsv.gz --spots A1_selection.tsv --out x.h5ad",
            "nope.tsv.gz: the legacy ST count table not found",
        ),
        ("--format visium --out x.h5ad", "--format visium needs --path"),
        (
            "--format legacy-st --counts A1.tsv.gz --spots A1.tsv.gz --out x.h5ad",
            "A1.tsv.gz: missing columns x, y; found",
        ),
        (
            "--format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv --out A1.tsv.gz/x.h5ad",
            "is not a folder stinfer may write to",
        ),
        (
            "--format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv --image A1.tsv.gz "
            "--out x.h5ad",
            "A1.tsv.gz: not a readable JPEG/PNG image",
        ),
        (
            "--format legacy-st --counts A1.tsv.gz --spots A1_selection.tsv --patch-cache DIR "
            "--out x.h5ad",
            "--patch-cache needs a slide with an image",
        ),
    ],
)
def test_user_errors_are_one_line_with_status_2(
    stinfer, tmp_path, monkeypatch, capsys, arguments, message
):
    write_legacy_section(tmp_path, "A1", with_image=False)
    monkeypatch.chdir(tmp_path)
    assert stinfer(["prepare", *arguments.split()]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("stinfer prepare: error: ")
    assert len(error.splitlines()) == 1
    assert re.search(message, error), error
    assert not Path("x.h5ad").exists()


def test_cache_patches_are_written_and_reused(stinfer, tmp_path, monkeypatch, caplog):
    write_legacy_section(tmp_path, "C2", with_image=True)
    monkeypatch.chdir(tmp_path)
    line = (
        "prepare --format legacy-st --counts C2.tsv.gz --spots C2_selection.tsv --image C2.jpg "
        "--patch-cache cache --out C2.h5ad"
    ).split()
    assert stinfer(line) == 0
    cached = sorted(Path("cache").glob("patches-*.npy"))
    assert len(cached) == 1
    patches = np.load(cached[0])
    assert patches.shape == (20, 3, 160, 160) and patches.dtype == np.uint8
    with caplog.at_level("INFO", logger="stinfer"):
        assert stinfer([*line, "--overwrite"]) == 0
    assert "reusing" in caplog.text
    assert sorted(Path("cache").glob("patches-*.npy")) == cached


def test_prepare_and_train_name_the_patch_cache_alike_and_the_old_flag_still_works():
    from stinfer.cli import build_parser

    parser = build_parser()
    common = ["--format", "h5ad", "--path", "S.h5ad", "--out", "o.h5ad"]
    new = parser.parse_args(["prepare", *common, "--patch-cache", "cache"])
    old = parser.parse_args(["prepare", *common, "--cache-patches", "cache"])
    assert new.patch_cache == old.patch_cache == "cache"
    train = parser.parse_args(["train", "--train", "S.h5ad", "--out", "r", "--patch-cache", "c"])
    assert train.patch_cache == "c"


def test_python_dash_m_stinfer_prints_user_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stinfer",
            "prepare",
            "--format",
            "visium",
            "--path",
            "missing",
            "--out",
            str(tmp_path / "x.h5ad"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing: the Space Ranger output folder not found" in result.stderr
    assert not (tmp_path / "x.h5ad").exists()
