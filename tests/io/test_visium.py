"""read_visium: generated Space Ranger folders in every layout, and the real sample folders."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from stinfer.errors import InputError
from stinfer.io import read_slide, read_visium

HIRES_SCALEF = 0.1
LOWRES_SCALEF = 0.05
SPOT_DIAMETER_FULLRES = 110.0
POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def make_positions(n_rows: int = 6, n_cols: int = 8, seed: int = 0) -> pd.DataFrame:
    """A small Visium-like grid: every third spot outside the tissue, full-res px up to ~1400."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    return pd.DataFrame(
        {
            "barcode": [f"AAAC{index:06d}-1" for index in range(rows.size)],
            "in_tissue": (np.arange(rows.size) % 3 != 0).astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": 100.0 + 130.0 * rows + rng.uniform(0, 1, rows.size),
            "pxl_col_in_fullres": 120.0 + 150.0 * cols + rng.uniform(0, 1, rows.size),
        }
    )


def write_positions(spatial: Path, positions: pd.DataFrame, layout: str) -> None:
    """Write positions as Space Ranger 1.x csv (no header), 2.x csv (header) or 3.x parquet."""
    if layout == "1.x":
        positions.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    elif layout == "2.x":
        positions.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        positions.to_parquet(spatial / "tissue_positions.parquet", index=False)


def write_matrix(
    folder: Path,
    counts: np.ndarray,
    barcodes: list[str],
    gene_ids: list[str],
    gene_names: list[str],
    feature_types: list[str],
    layout: str,
) -> None:
    """Write a barcodes x features count matrix as a 10x h5, or as a Matrix Market folder."""
    if layout == "h5":
        csc = sp.csr_matrix(counts)  # barcodes x genes CSR == genes x barcodes CSC
        with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as handle:
            group = handle.create_group("matrix")
            group["data"] = csc.data.astype(np.int32)
            group["indices"] = csc.indices.astype(np.int64)
            group["indptr"] = csc.indptr.astype(np.int64)
            group["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
            group["barcodes"] = np.array(barcodes, dtype="S")
            features = group.create_group("features")
            features["id"] = np.array(gene_ids, dtype="S")
            features["name"] = np.array(gene_names, dtype="S")
            features["feature_type"] = np.array(feature_types, dtype="S")
            features["genome"] = np.array(["GRCh38"] * len(gene_ids), dtype="S")
        return
    matrix_folder = folder / "filtered_feature_bc_matrix"
    matrix_folder.mkdir()
    gz = layout == "mtx.gz"
    suffix = ".gz" if gz else ""
    scipy.io.mmwrite(matrix_folder / "matrix.mtx", sp.coo_matrix(counts.T), field="integer")
    pd.Series(barcodes).to_csv(
        matrix_folder / f"barcodes.tsv{suffix}", sep="\t", header=False, index=False
    )
    pd.DataFrame({"id": gene_ids, "name": gene_names, "type": feature_types}).to_csv(
        matrix_folder / f"features.tsv{suffix}", sep="\t", header=False, index=False
    )
    if gz:
        raw = (matrix_folder / "matrix.mtx").read_bytes()
        (matrix_folder / "matrix.mtx.gz").write_bytes(gzip.compress(raw))
        (matrix_folder / "matrix.mtx").unlink()


def write_spaceranger(
    folder: Path,
    positions_layout: str = "2.x",
    matrix_layout: str = "h5",
    hires: bool = True,
    seed: int = 0,
) -> dict:
    """Write a complete small Space Ranger folder; return what was written, for comparisons."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    spatial = folder / "spatial"
    spatial.mkdir()
    positions = make_positions(seed=seed)
    write_positions(spatial, positions, positions_layout)
    in_tissue = positions[positions["in_tissue"] == 1]
    barcodes = list(in_tissue["barcode"].iloc[::-1])  # matrix order differs from file order
    gene_names = ["GENEA", "GENEB", "GENEC", "GENEB", "GENED", "CD3-TotalSeqB"]
    gene_ids = [f"ENSG{index:011d}" for index in range(len(gene_names))]
    feature_types = ["Gene Expression"] * 5 + ["Antibody Capture"]
    counts = rng.poisson(3.0, size=(len(barcodes), len(gene_names))).astype(np.int64)
    counts[0, :] = [0, 0, 7, 0, 0, 5]
    write_matrix(folder, counts, barcodes, gene_ids, gene_names, feature_types, matrix_layout)
    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER_FULLRES,
        "tissue_hires_scalef": HIRES_SCALEF,
        "tissue_lowres_scalef": LOWRES_SCALEF,
        "fiducial_diameter_fullres": 170.0,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    full_width, full_height = 1500, 1000
    if hires:
        Image.new("RGB", (int(full_width * HIRES_SCALEF), int(full_height * HIRES_SCALEF))).save(
            spatial / "tissue_hires_image.png"
        )
    Image.new("RGB", (int(full_width * LOWRES_SCALEF), int(full_height * LOWRES_SCALEF))).save(
        spatial / "tissue_lowres_image.png"
    )
    return {
        "positions": positions.set_index("barcode"),
        "barcodes": barcodes,
        "counts": counts,
        "gene_ids": gene_ids,
        "full_size": (full_width, full_height),
    }


@pytest.mark.parametrize("matrix_layout", ["h5", "mtx.gz", "mtx"])
@pytest.mark.parametrize("positions_layout", ["1.x", "2.x", "3.x"])
def test_generated_folder_round_trips_counts_positions_and_scales(
    tmp_path: Path, positions_layout: str, matrix_layout: str
) -> None:
    written = write_spaceranger(tmp_path / "outs", positions_layout, matrix_layout)
    slide = read_visium(tmp_path / "outs")

    assert list(slide.obs_names) == [f"outs_{barcode}" for barcode in written["barcodes"]]
    assert list(slide.obs["spot_id"]) == written["barcodes"]
    assert set(slide.obs["sample_id"]) == {"outs"}
    assert list(slide.var_names) == ["GENEA", "GENEB", "GENEC", "GENEB-1", "GENED"]
    assert list(slide.var["gene_ids"]) == written["gene_ids"][:5]
    assert sp.isspmatrix_csr(slide.X) or sp.issparse(slide.X)
    np.testing.assert_array_equal(slide.X.toarray(), written["counts"][:, :5])

    expected = written["positions"].loc[written["barcodes"]]
    np.testing.assert_array_equal(
        slide.obsm["spatial"], expected[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    )
    np.testing.assert_array_equal(slide.obs["array_row"], expected["array_row"])
    np.testing.assert_array_equal(slide.obs["array_col"], expected["array_col"])

    meta = slide.uns["stinfer"]
    assert meta["source_format"] == "visium"
    assert meta["sample_id"] == "outs"
    assert meta["image_path"] == str((tmp_path / "outs/spatial/tissue_hires_image.png").resolve())
    assert meta["image_scale"] == pytest.approx(HIRES_SCALEF)
    assert meta["spot_diameter_px"] == pytest.approx(SPOT_DIAMETER_FULLRES)
    assert meta["pixel_size_um"] == pytest.approx(55.0 / SPOT_DIAMETER_FULLRES)
    notes = " ".join(meta["notes"])
    assert "1 features that are not 'Gene Expression' (1 Antibody Capture)" in notes
    assert "duplicated gene names" in notes


def test_lowres_png_is_used_when_there_is_no_hires(tmp_path: Path) -> None:
    write_spaceranger(tmp_path / "s1", hires=False)
    meta = read_visium(tmp_path / "s1", sample_id="patient-1").uns["stinfer"]
    assert meta["image_path"].endswith("tissue_lowres_image.png")
    assert meta["image_scale"] == pytest.approx(LOWRES_SCALEF)
    assert meta["sample_id"] == "patient-1"


def test_named_full_resolution_image_has_scale_one(tmp_path: Path) -> None:
    written = write_spaceranger(tmp_path / "s1")
    image = tmp_path / "fullres.jpg"
    Image.new("RGB", written["full_size"]).save(image)
    meta = read_visium(tmp_path / "s1", image=image).uns["stinfer"]
    assert meta["image_path"] == str(image.resolve())
    assert meta["image_scale"] == 1.0


def test_no_image_gives_counts_only_slide_with_a_note(tmp_path: Path) -> None:
    write_spaceranger(tmp_path / "s1", hires=False)
    (tmp_path / "s1/spatial/tissue_lowres_image.png").unlink()
    slide = read_visium(tmp_path / "s1")
    assert slide.uns["stinfer"]["image_path"] is None
    assert any("no image" in note for note in slide.uns["stinfer"]["notes"])
    assert slide.obsm["spatial"].shape == (slide.n_obs, 2)


def test_barcode_mismatch_keeps_the_intersection_and_reports_both_sides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written = write_spaceranger(tmp_path / "s1", positions_layout="2.x")
    positions = written["positions"].reset_index()
    # drop two matrix barcodes from the positions and mark one matrix barcode outside tissue
    missing = written["barcodes"][:2]
    outside = written["barcodes"][2]
    positions = positions[~positions["barcode"].isin(missing)]
    positions.loc[positions["barcode"] == outside, "in_tissue"] = 0
    extra = positions.iloc[:1].assign(barcode="TTTT000000-1", in_tissue=1)
    pd.concat([positions, extra]).to_csv(tmp_path / "s1/spatial/tissue_positions.csv", index=False)

    with caplog.at_level(logging.WARNING, logger="stinfer"):
        slide = read_visium(tmp_path / "s1")

    assert list(slide.obs["spot_id"]) == written["barcodes"][3:]
    assert list(slide.obs_names) == [f"s1_{barcode}" for barcode in written["barcodes"][3:]]
    note = next(note for note in slide.uns["stinfer"]["notes"] if note.startswith("kept"))
    assert f"kept {len(written['barcodes']) - 3} spots" in note
    assert "dropped 1 of" in note and "not in the count matrix" in note
    assert "dropped 2 matrix barcodes without a position" in note
    assert "dropped 1 matrix barcodes outside the tissue" in note
    assert "kept" in caplog.text


def test_read_slide_dispatches_to_visium(tmp_path: Path) -> None:
    write_spaceranger(tmp_path / "s1")
    slide = read_slide("Visium", path=tmp_path / "s1")
    assert slide.uns["stinfer"]["source_format"] == "visium"


def test_hires_png_named_as_full_resolution_is_a_scale_mix_up(tmp_path: Path) -> None:
    write_spaceranger(tmp_path / "s1")
    with pytest.raises(InputError, match=r"looks like the hires PNG \(tissue_hires_scalef=0.1\)"):
        read_visium(tmp_path / "s1", image=tmp_path / "s1/spatial/tissue_hires_image.png")


@pytest.mark.slow
def test_real_cytassist_mtx_and_v2_positions(visium_dir: Path) -> None:
    folder = visium_dir / "cytassist_mouse_embryo"
    slide = read_visium(folder)

    assert slide.shape == (2898, 19465)
    assert slide.var["gene_ids"].str.startswith("ENSMUSG").all()
    meta = slide.uns["stinfer"]
    assert meta["image_path"].endswith("tissue_lowres_image.png")
    assert meta["image_scale"] == pytest.approx(0.2)
    assert meta["spot_diameter_px"] == pytest.approx(14.964878633873417)
    assert meta["pixel_size_um"] == pytest.approx(55 / 14.964878633873417)

    positions = pd.read_csv(folder / "spatial/tissue_positions.csv").set_index("barcode")
    expected = positions.loc[slide.obs_names]
    assert (expected["in_tissue"] == 1).all()
    np.testing.assert_allclose(
        slide.obsm["spatial"], expected[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    )
    np.testing.assert_array_equal(slide.obs["array_row"], expected["array_row"])

    # the Matrix Market values, read independently, for the first barcodes
    reference = sp.csc_matrix(scipy.io.mmread(folder / "filtered_feature_bc_matrix/matrix.mtx.gz"))
    np.testing.assert_array_equal(slide.X[:50].toarray(), reference[:, :50].T.toarray())


@pytest.mark.slow
def test_real_v1_small_h5_and_v1_positions_reports_dropped_positions(visium_dir: Path) -> None:
    folder = visium_dir / "v1_small"
    slide = read_visium(folder)

    assert slide.n_obs == 100
    assert slide.n_vars == 100
    note = next(note for note in slide.uns["stinfer"]["notes"] if note.startswith("kept"))
    assert "kept 100 spots" in note
    assert "dropped 4135 of 4235 in-tissue positions" in note
    meta = slide.uns["stinfer"]
    assert meta["image_path"].endswith("tissue_hires_image.png")
    assert meta["image_scale"] == pytest.approx(0.150015)

    with h5py.File(folder / "filtered_feature_bc_matrix.h5") as handle:
        group = handle["matrix"]
        n_genes, n_barcodes = group["shape"][()]
        reference = sp.csr_matrix(
            (group["data"][()], group["indices"][()], group["indptr"][()]),
            shape=(n_barcodes, n_genes),
        )
        barcodes = group["barcodes"][()].astype(str)
    order = pd.Index(barcodes).get_indexer(slide.obs_names)
    np.testing.assert_array_equal(slide.X.toarray(), reference[order].toarray())

    positions = pd.read_csv(
        folder / "spatial/tissue_positions_list.csv", header=None, names=POSITION_COLUMNS
    ).set_index("barcode")
    expected = positions.loc[slide.obs_names]
    np.testing.assert_array_equal(
        slide.obsm["spatial"], expected[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    )
    np.testing.assert_array_equal(slide.obs["array_col"], expected["array_col"])
