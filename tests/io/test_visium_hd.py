"""read_visium_hd on generated Space Ranger HD folders: round trips, bins as patches, errors, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from stinfer import cli
from stinfer.data.patches import PatchSpec, iter_spot_patches
from stinfer.data.synthetic_hd import SyntheticHDFolder, make_visium_hd_folder, stroma_level
from stinfer.errors import InputError
from stinfer.io import read_slide, read_visium_hd
from stinfer.io.slide_data import slide_meta
from stinfer.io.slide_image import open_slide, round_half_up
from stinfer.io.visium import matrix_h5_writer

N_BINS_SIDE = 40
PIXEL_SIZE_UM = 0.5
BIN_PX = 8 / PIXEL_SIZE_UM
MARGIN_PX = 4 * BIN_PX  # the generator leaves 4 bins of margin around the grid


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> SyntheticHDFolder:
    """One tiny HD folder (40 x 40 8-um bins, 60 genes), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("hd") / "outs"
    return make_visium_hd_folder(out, N_BINS_SIDE, pixel_size_um=PIXEL_SIZE_UM, n_genes=60, seed=3)


@pytest.fixture
def outs(generated: SyntheticHDFolder, tmp_path: Path) -> Path:
    """A private copy of the generated outs folder, for tests that break it."""
    copy = tmp_path / "outs"
    shutil.copytree(generated.outs_dir, copy)
    return copy


@pytest.fixture
def stinfer(monkeypatch):
    """`stinfer` with just the command these tests run (others may be mid-edit)."""
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("prepare",))
    return cli.main


def read_h5_directly(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """A 10x h5 read with h5py alone: (barcodes x genes CSR, barcodes, gene ids)."""
    with h5py.File(path) as handle:
        group = handle["matrix"]
        n_genes, n_barcodes = group["shape"][()]
        counts = sp.csr_matrix(
            (group["data"][()], group["indices"][()], group["indptr"][()]),
            shape=(n_barcodes, n_genes),
        )
        barcodes = group["barcodes"][()].astype(str).tolist()
        gene_ids = group["features/id"][()].astype(str).tolist()
    return counts, barcodes, gene_ids


def rewrite_h5_data(path: Path, data: np.ndarray) -> None:
    with h5py.File(path, "r+") as handle:
        del handle["matrix/data"]
        handle["matrix/data"] = data


def test_8um_bins_round_trip_counts_positions_and_scales(generated: SyntheticHDFolder) -> None:
    slide = read_visium_hd(generated.outs_dir, bin_size_um=8, image=generated.image_path)
    bin_dir = generated.bin_dirs[8]
    counts, barcodes, gene_ids = read_h5_directly(bin_dir / "filtered_feature_bc_matrix.h5")
    positions = pd.read_parquet(bin_dir / "spatial/tissue_positions.parquet")

    assert sp.isspmatrix_csr(slide.X) and slide.X.dtype == np.float32
    # every matrix bin is under tissue, in matrix order
    assert list(slide.obs["spot_id"]) == barcodes
    assert list(slide.obs_names) == [f"outs_{barcode}" for barcode in barcodes]
    assert slide.n_obs == generated.n_bins_in_tissue[8] == int(positions["in_tissue"].sum())
    assert len(positions) == N_BINS_SIDE**2 > slide.n_obs  # bins off the tissue are left out
    np.testing.assert_array_equal(slide.X.toarray(), counts.toarray())
    assert list(slide.var["gene_ids"]) == gene_ids
    assert 50 < slide.X.sum() / slide.n_obs < 200  # ~100 UMIs per bin

    expected = positions.set_index("barcode").loc[barcodes]
    assert (expected["in_tissue"] == 1).all()
    rows, cols = expected["array_row"].to_numpy(), expected["array_col"].to_numpy()
    np.testing.assert_array_equal(slide.obs["array_row"], rows)
    np.testing.assert_array_equal(slide.obs["array_col"], cols)
    np.testing.assert_allclose(
        slide.obsm["spatial"], MARGIN_PX + (np.column_stack([cols, rows]) + 0.5) * BIN_PX
    )
    assert slide.obs_names[0] == f"outs_s_008um_{rows[0]:05d}_{cols[0]:05d}-1"

    meta = slide.uns["stinfer"]
    assert meta["source_format"] == "visium-hd"
    assert meta["sample_id"] == "outs"
    assert meta["image_path"] == str(generated.image_path.resolve())
    assert meta["image_scale"] == 1.0
    assert meta["pixel_size_um"] == pytest.approx(PIXEL_SIZE_UM)
    assert meta["spot_diameter_px"] == pytest.approx(BIN_PX)
    assert "square_008um" in meta["notes"][0]


def test_16um_bins_are_the_2x2_sums_of_the_8um_bins(generated: SyntheticHDFolder) -> None:
    fine = read_visium_hd(generated.outs_dir, bin_size_um=8)
    coarse = read_visium_hd(generated.outs_dir, bin_size_um=16)

    assert coarse.uns["stinfer"]["spot_diameter_px"] == pytest.approx(2 * BIN_PX)
    assert coarse.uns["stinfer"]["pixel_size_um"] == pytest.approx(PIXEL_SIZE_UM)
    assert coarse.n_obs == generated.n_bins_in_tissue[16]
    parent = pd.MultiIndex.from_arrays([fine.obs["array_row"] // 2, fine.obs["array_col"] // 2])
    coarse_index = pd.MultiIndex.from_arrays([coarse.obs["array_row"], coarse.obs["array_col"]])
    rows = coarse_index.get_indexer(parent)
    assert (rows >= 0).all()  # every in-tissue 8-um bin lies in an in-tissue 16-um bin
    summing = sp.csr_matrix((np.ones(fine.n_obs), (rows, np.arange(fine.n_obs))))
    summing.resize((coarse.n_obs, fine.n_obs))
    np.testing.assert_array_equal(coarse.X.toarray(), (summing @ fine.X).toarray())
    # a 16-um bin is centred on its four 8-um children
    np.testing.assert_allclose(
        coarse.obsm["spatial"],
        MARGIN_PX
        + (np.column_stack([coarse.obs["array_col"], coarse.obs["array_row"]]) + 0.5) * 2 * BIN_PX,
    )


def test_bin_patches_equal_crops_of_the_full_resolution_tiff(generated: SyntheticHDFolder) -> None:
    slide = read_visium_hd(generated.outs_dir, image=generated.image_path)
    some_bins = slide[:: max(1, slide.n_obs // 9)].copy()
    patches = np.concatenate(list(iter_spot_patches(some_bins, PatchSpec(patch_size_px=48), 4)))

    level0 = tifffile.imread(generated.image_path)  # series 0, level 0
    lefts, tops = round_half_up(some_bins.obsm["spatial"] - 24).T
    crops = np.stack(
        [level0[top : top + 48, left : left + 48] for left, top in zip(lefts, tops, strict=True)]
    )
    np.testing.assert_array_equal(patches, crops.transpose(0, 3, 1, 2))


def test_generated_tiff_is_tiled_pyramidal_and_knows_its_pixel_size(
    generated: SyntheticHDFolder,
) -> None:
    with tifffile.TiffFile(generated.image_path) as tiff:
        levels = tiff.series[0].levels
        assert tiff.pages.first.is_tiled and tiff.pages.first.tilewidth == 256
        assert levels[0].shape[2] == 3 and levels[0].dtype == np.uint8
    side = int(np.ceil(N_BINS_SIDE * BIN_PX + 2 * MARGIN_PX))
    assert [level.shape[:2] for level in levels] == [(side // d, side // d) for d in (1, 4, 16)]
    with open_slide(generated.image_path) as image:
        assert image.pixel_size_um == pytest.approx(PIXEL_SIZE_UM)


def test_stroma_genes_follow_the_image_stroma(generated: SyntheticHDFolder) -> None:
    slide = read_visium_hd(generated.outs_dir)
    is_stroma = generated.gene_program == "stroma"
    assert slide.var_names[is_stroma].str.startswith("STROMA_").all()
    totals = np.asarray(slide.X.sum(axis=1)).ravel()
    share = np.asarray(slide.X[:, np.flatnonzero(is_stroma)].sum(axis=1)).ravel() / totals
    x, y = slide.obsm["spatial"].T
    assert np.corrcoef(share, stroma_level(x, y))[0, 1] > 0.5


def test_default_image_is_the_bin_folder_hires_png_then_the_outs_one(outs: Path) -> None:
    meta = read_visium_hd(outs).uns["stinfer"]
    scalefactors = json.loads(
        (outs / "binned_outputs/square_008um/spatial/scalefactors_json.json").read_text()
    )
    assert meta["image_path"].endswith("square_008um/spatial/tissue_hires_image.png")
    assert meta["image_scale"] == pytest.approx(scalefactors["tissue_hires_scalef"])

    for png in (outs / "binned_outputs/square_008um/spatial").glob("*.png"):
        png.unlink()
    meta = read_visium_hd(outs).uns["stinfer"]
    assert meta["image_path"] == str((outs / "spatial/tissue_hires_image.png").resolve())
    assert meta["image_scale"] == pytest.approx(scalefactors["tissue_hires_scalef"])


def test_a_bin_folder_reads_directly_with_its_own_bin_size(generated: SyntheticHDFolder) -> None:
    slide = read_visium_hd(generated.bin_dirs[16])
    assert slide.n_obs == generated.n_bins_in_tissue[16]
    assert slide.uns["stinfer"]["sample_id"] == "outs"
    via_binned_outputs = read_visium_hd(generated.outs_dir / "binned_outputs", bin_size_um=16)
    assert list(via_binned_outputs.obs_names) == list(slide.obs_names)
    with pytest.raises(InputError, match=r"16-um bin folder but bin_size_um=8 was asked"):
        read_visium_hd(generated.bin_dirs[16], bin_size_um=8)


def test_read_slide_dispatches_visium_hd_with_the_bin_size(generated: SyntheticHDFolder) -> None:
    slide = read_slide("Visium_HD", path=generated.outs_dir, bin_size_um=16)
    assert slide.uns["stinfer"]["source_format"] == "visium-hd"
    assert slide.n_obs == generated.n_bins_in_tissue[16]


def test_missing_bin_size_names_the_bin_sizes_present(generated: SyntheticHDFolder) -> None:
    with pytest.raises(InputError, match=r"square_002um: no 2-um bins.*square_008um, square_016um"):
        read_visium_hd(generated.outs_dir, bin_size_um=2)
    with pytest.raises(InputError, match=r"whole number of microns"):
        read_visium_hd(generated.outs_dir, bin_size_um=7.5)


def test_a_folder_without_binned_outputs_is_not_hd(tmp_path: Path) -> None:
    (tmp_path / "spatial").mkdir()
    with pytest.raises(InputError, match=r"no binned_outputs/ folder.*holds: spatial"):
        read_visium_hd(tmp_path)
    with pytest.raises(InputError, match=r"Space Ranger HD output folder not found"):
        read_visium_hd(tmp_path / "missing")


def test_missing_files_are_named(outs: Path) -> None:
    bin_dir = outs / "binned_outputs/square_008um"
    (bin_dir / "spatial/tissue_positions.parquet").unlink()
    with pytest.raises(InputError, match=r"tissue_positions.parquet: the bin positions file"):
        read_visium_hd(outs)
    (bin_dir / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix.h5: the count matrix"):
        read_visium_hd(outs)


def test_missing_positions_column_is_named_with_the_file(outs: Path) -> None:
    path = outs / "binned_outputs/square_008um/spatial/tissue_positions.parquet"
    pd.read_parquet(path).drop(columns="pxl_col_in_fullres").to_parquet(path)
    with pytest.raises(InputError, match=r"tissue_positions.parquet: missing columns pxl_col_in"):
        read_visium_hd(outs)


@pytest.mark.parametrize(
    ("value", "message"), [(-1.0, "negative values"), (0.5, "non-integer values")]
)
def test_counts_that_are_not_raw_integers_name_the_matrix_file(
    outs: Path, value: float, message: str
) -> None:
    path = outs / "binned_outputs/square_008um/filtered_feature_bc_matrix.h5"
    with h5py.File(path) as handle:
        data = handle["matrix/data"][()].astype(np.float32)
    data[3] = value
    rewrite_h5_data(path, data)
    with pytest.raises(InputError, match=rf"filtered_feature_bc_matrix.h5: .*{message}"):
        read_visium_hd(outs)


def test_positions_of_another_bin_size_match_no_barcode(outs: Path) -> None:
    shutil.copy(
        outs / "binned_outputs/square_016um/spatial/tissue_positions.parquet",
        outs / "binned_outputs/square_008um/spatial/tissue_positions.parquet",
    )
    with pytest.raises(InputError, match=r"no barcode is both in the count matrix .*s_016um_"):
        read_visium_hd(outs)


def test_scale_factors_of_another_bin_size_or_without_a_pixel_size(outs: Path) -> None:
    path = outs / "binned_outputs/square_008um/spatial/scalefactors_json.json"
    scalefactors = json.loads(path.read_text())
    path.write_text(json.dumps({**scalefactors, "bin_size_um": 16.0}))
    with pytest.raises(InputError, match=r"scalefactors_json.json: 'bin_size_um' is 16"):
        read_visium_hd(outs)

    del scalefactors["microns_per_pixel"]
    path.write_text(json.dumps(scalefactors))  # the bin's pixel size then gives it
    assert read_visium_hd(outs).uns["stinfer"]["pixel_size_um"] == pytest.approx(PIXEL_SIZE_UM)
    del scalefactors["spot_diameter_fullres"]
    path.write_text(json.dumps(scalefactors))
    with pytest.raises(InputError, match=r"neither 'microns_per_pixel' .* nor 'spot_diameter"):
        read_visium_hd(outs)


def test_matrix_writer_leaves_no_file_when_rows_are_missing(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    with (
        pytest.raises(InputError, match=r"1 rows but 2 barcodes"),
        matrix_h5_writer(path, ["a", "b"], ["E1"], ["G1"]) as append,
    ):
        append(sp.csr_matrix(np.array([[3]])))
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_prepare_visium_hd_line_writes_a_readable_h5ad(
    stinfer, generated: SyntheticHDFolder, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    line = (
        f"prepare --format visium-hd --path {generated.outs_dir} --bin-size 8 "
        f"--image {generated.image_path} --out S.h5ad"
    )
    assert stinfer(line.split()) == 0
    assert f"{generated.n_bins_in_tissue[8]} spots" in capsys.readouterr().out

    written = ad.read_h5ad("S.h5ad")
    expected = read_visium_hd(generated.outs_dir, 8, image=generated.image_path)
    np.testing.assert_array_equal(written.obsm["spatial"], expected.obsm["spatial"])
    np.testing.assert_array_equal(written.X.toarray(), expected.X.toarray())
    meta = slide_meta(written)
    assert meta["source_format"] == "visium-hd"
    assert meta["spot_diameter_px"] == pytest.approx(BIN_PX)

    assert stinfer("prepare --format visium --path x --bin-size 8 --out V.h5ad".split()) == 2
    assert "--bin-size is for --format visium-hd" in capsys.readouterr().err
