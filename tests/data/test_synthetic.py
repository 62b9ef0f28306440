"""Synthetic serial sections: the contract, determinism, and that the planted structure is there."""

from __future__ import annotations

import functools
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy.spatial import cKDTree
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor

from stinfer.data.synthetic import (
    SyntheticConfig,
    make_synthetic_sections,
    planted_gene_embeddings,
    planted_gene_programs,
)
from stinfer.errors import InputError
from stinfer.io.atomic import write_h5ad
from stinfer.io.slide_data import SLIDE_META_KEYS, check_counts, prepare_for_h5ad

SMALL = {"target_spots": 150, "n_sections": 2, "n_genes": 60}


@pytest.fixture(scope="module")
def sections(tmp_path_factory) -> list[ad.AnnData]:
    """The default data: three ~1,000-spot Visium-like sections (generated once per module)."""
    return make_synthetic_sections(tmp_path_factory.mktemp("synthetic"), SyntheticConfig())


def image_of(slide: ad.AnnData) -> np.ndarray:
    return read_rgb(slide.uns["stinfer"]["image_path"])


@functools.lru_cache(maxsize=4)
def read_rgb(path: str) -> np.ndarray:
    """The written image as an (height, width, 3) uint8 array (cached: tests read it often)."""
    return np.asarray(Image.open(path).convert("RGB"))


def program_score(slide: ad.AnnData, program: str) -> np.ndarray:
    """Mean log1p-CP10k expression of a program's genes, per spot."""
    counts = slide.X.toarray()
    normalised = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    return normalised[:, (slide.var["program"] == program).to_numpy()].mean(axis=1)


def r_squared(truth: np.ndarray, prediction: np.ndarray) -> float:
    return 1.0 - np.sum((truth - prediction) ** 2) / np.sum((truth - truth.mean()) ** 2)


def window_colour(slide: ad.AnnData, side_px: int = 66) -> np.ndarray:
    """Mean RGB of the written image in a square window around each spot, (n_spots, 3)."""
    image = image_of(slide).astype(np.float64)
    half = side_px // 2
    centres = np.round(slide.obsm["spatial"]).astype(int)
    return np.array(
        [
            image[y - half : y + half + 1, x - half : x + half + 1].reshape(-1, 3).mean(axis=0)
            for x, y in centres
        ]
    )


def domain_one_hot(slide: ad.AnnData) -> np.ndarray:
    return np.eye(len(slide.obs["domain"].cat.categories))[slide.obs["domain"].cat.codes]


# ----------------------------------------------------------------------------- contract


def test_same_seed_gives_identical_counts_and_images(tmp_path: Path) -> None:
    first = make_synthetic_sections(tmp_path / "a", SyntheticConfig(seed=7, **SMALL))
    second = make_synthetic_sections(tmp_path / "b", SyntheticConfig(seed=7, **SMALL))
    for one, two in zip(first, second, strict=True):
        assert (one.X != two.X).nnz == 0
        np.testing.assert_array_equal(one.obsm["spatial"], two.obsm["spatial"])
        np.testing.assert_array_equal(one.layers["true_mean"], two.layers["true_mean"])
        np.testing.assert_array_equal(image_of(one), image_of(two))
        assert list(one.obs_names) == list(two.obs_names)


def test_different_seeds_give_different_counts_and_images(tmp_path: Path) -> None:
    first = make_synthetic_sections(tmp_path / "a", SyntheticConfig(seed=1, **SMALL))[0]
    second = make_synthetic_sections(tmp_path / "b", SyntheticConfig(seed=2, **SMALL))[0]
    assert first.shape != second.shape or (first.X != second.X).nnz > 0
    assert not np.array_equal(image_of(first), image_of(second))


def test_slides_follow_the_make_slide_contract(sections: list[ad.AnnData]) -> None:
    for number, slide in enumerate(sections, start=1):
        assert sp.issparse(slide.X) and slide.X.dtype == np.float32
        check_counts(slide.X, "synthetic")  # raw, non-negative whole numbers
        assert slide.X.min() >= 0
        assert 850 <= slide.n_obs <= 1150 and slide.n_vars == 200
        assert slide.obs_names.is_unique and slide.var_names.is_unique
        meta = slide.uns["stinfer"]
        assert set(meta) == set(SLIDE_META_KEYS)
        assert meta["source_format"] == "synthetic"
        assert meta["sample_id"] == f"synthetic_section{number}"
        assert all(name.startswith(f"synthetic_section{number}_") for name in slide.obs_names)
        assert set(slide.obs["sample_id"]) == {meta["sample_id"]}
        assert slide.obs["spot_id"].is_unique
        assert Path(meta["image_path"]).is_absolute() and Path(meta["image_path"]).is_file()
        assert meta["pixel_size_um"] == 2.0
        assert meta["spot_diameter_px"] == pytest.approx(55.0 / 2.0)
        assert meta["image_scale"] == 1.0
        assert slide.obsm["spatial"].shape == (slide.n_obs, 2)
        assert slide.obs["array_row"].dtype == np.int64
        assert slide.obs["array_col"].dtype == np.int64


def test_ground_truth_is_stored(sections: list[ad.AnnData]) -> None:
    slide = sections[0]
    names = slide.uns["synthetic"]["program_names"]
    assert len(names) == SyntheticConfig().n_programs == 8
    assert list(slide.obsm["program_activity"].columns) == list(names)
    assert slide.layers["true_mean"].shape == slide.shape
    assert np.all(slide.layers["true_mean"] > 0)
    assert slide.obs["domain"].dtype == "category"
    assert slide.obs["domain"].cat.categories.tolist() == [f"domain_{k}" for k in range(4)]
    assert {"nuclei_density", "nuclear_fraction", "stroma_eosin_od", "size_factor"} <= set(
        slide.obs
    )
    assert slide.obsm["tissue_um"].shape == (slide.n_obs, 2)
    sizes = slide.var["program"].value_counts()
    assert sizes.min() >= 2 and set(sizes.index) == {*names, "housekeeping"}
    housekeeping = slide.var["program"] == "housekeeping"
    assert np.all(slide.var.loc[housekeeping, "program_loading"] == 0)
    assert np.all(slide.var.loc[~housekeeping, "program_loading"] > 0)
    assert slide.uns["synthetic"]["config"]["seed"] == 0
    assert planted_gene_programs(SyntheticConfig())["program"].equals(slide.var["program"])


def test_spots_lie_inside_the_image_with_room_for_a_patch(sections: list[ad.AnnData]) -> None:
    for slide in sections:
        height, width = image_of(slide).shape[:2]
        x, y = slide.obsm["spatial"].T
        assert x.min() >= 80 and y.min() >= 80  # a 160 px patch fits around every spot
        assert x.max() <= width - 80 and y.max() <= height - 80


def test_hex_grid_is_visium_like(sections: list[ad.AnnData]) -> None:
    slide = sections[0]
    distances, _ = cKDTree(slide.obsm["spatial"]).query(slide.obsm["spatial"], k=2)
    assert np.median(distances[:, 1]) == pytest.approx(100.0 / 2.0)  # 100 um pitch at 2 um/px
    parity = (slide.obs["array_row"] % 2) == (slide.obs["array_col"] % 2)
    assert parity.all()


def test_square_grid_is_st_like(tmp_path: Path) -> None:
    slide = make_synthetic_sections(tmp_path, SyntheticConfig(grid="square", **SMALL))[0]
    distances, _ = cKDTree(slide.obsm["spatial"]).query(slide.obsm["spatial"], k=2)
    assert np.median(distances[:, 1]) == pytest.approx(200.0 / 2.0)
    assert slide.uns["stinfer"]["spot_diameter_px"] == pytest.approx(50.0)
    assert 100 <= slide.n_obs <= 200


def test_existing_images_are_not_overwritten_unless_asked(tmp_path: Path) -> None:
    config = SyntheticConfig(**SMALL)
    make_synthetic_sections(tmp_path, config)
    with pytest.raises(InputError, match="already exists"):
        make_synthetic_sections(tmp_path, config)
    assert len(make_synthetic_sections(tmp_path, config, overwrite=True)) == 2


def test_bad_config_values_raise_input_error() -> None:
    with pytest.raises(InputError, match="grid"):
        SyntheticConfig(grid="round")
    with pytest.raises(InputError, match="n_genes"):
        SyntheticConfig(n_genes=10)


def test_slide_survives_an_h5ad_round_trip(sections: list[ad.AnnData], tmp_path: Path) -> None:
    path = write_h5ad(prepare_for_h5ad(sections[0]), tmp_path / "section.h5ad")
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.layers["true_mean"], sections[0].layers["true_mean"])
    assert back.uns["synthetic"]["section"] == 1
    assert (
        list(back.obsm["program_activity"].columns) == sections[0].uns["synthetic"]["program_names"]
    )


# ----------------------------------------------------------------------------- sections


def test_sections_differ_in_image_stain_and_domain_proportions(
    sections: list[ad.AnnData],
) -> None:
    meta = [slide.uns["synthetic"] for slide in sections]
    assert len({round(m["rotation_deg"], 3) for m in meta}) == 3
    tissue_colours = []
    for slide in sections:
        image = image_of(slide)
        tissue = image.mean(axis=2) < 230
        tissue_colours.append(image[tissue].mean(axis=0))
    for one, two in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(tissue_colours[one] - tissue_colours[two]).max() > 2.0
    proportions = [
        slide.obs["domain"].value_counts(normalize=True).sort_index() for slide in sections
    ]
    assert not proportions[0].equals(proportions[1])
    assert max(np.abs(p - proportions[0]).max() for p in proportions[1:]) < 0.15


def test_domain_layout_is_shared_across_sections_in_tissue_coordinates(
    sections: list[ad.AnnData],
) -> None:
    reference = sections[0]
    tree = cKDTree(reference.obsm["tissue_um"])
    for slide in sections[1:]:
        distance, nearest = tree.query(slide.obsm["tissue_um"])
        assert np.median(distance) < 60.0  # same tissue, different spot positions
        same = reference.obs["domain"].to_numpy()[nearest] == slide.obs["domain"].to_numpy()
        assert 0.8 < same.mean() < 1.0  # shared anatomy, moving boundaries


# ----------------------------------------------------------------------------- expression


def test_domain_labels_explain_domain_genes_across_sections(sections: list[ad.AnnData]) -> None:
    train, test = sections[0], sections[1]
    for program in [f"domain_{k}" for k in range(4)]:
        model = Ridge(alpha=1.0).fit(domain_one_hot(train), program_score(train, program))
        prediction = model.predict(domain_one_hot(test))
        assert r_squared(program_score(test, program), prediction) > 0.8, program
    model = Ridge(alpha=1.0).fit(domain_one_hot(train), program_score(train, "gradient_0"))
    prediction = model.predict(domain_one_hot(test))
    assert r_squared(program_score(test, "gradient_0"), prediction) < 0.3


def test_coordinates_explain_gradient_genes_but_not_texture_genes(
    sections: list[ad.AnnData],
) -> None:
    train, test = sections[0], sections[1]

    def cross_section_r2(program: str) -> float:
        model = KNeighborsRegressor(n_neighbors=10).fit(
            train.obsm["spatial"], program_score(train, program)
        )
        return r_squared(program_score(test, program), model.predict(test.obsm["spatial"]))

    assert cross_section_r2("gradient_0") > 0.5
    assert cross_section_r2("gradient_1") > 0.5
    assert cross_section_r2("texture_0") < 0.5
    assert cross_section_r2("texture_1") < 0.5


def test_window_colour_predicts_texture_genes_but_not_gradient_genes(
    sections: list[ad.AnnData],
) -> None:
    train, test = sections[0], sections[1]
    colour_train, colour_test = window_colour(train), window_colour(test)

    def cross_section_r(program: str) -> float:
        model = LinearRegression().fit(colour_train, program_score(train, program))
        return np.corrcoef(model.predict(colour_test), program_score(test, program))[0, 1]

    assert cross_section_r("texture_0") > 0.6
    assert cross_section_r("texture_1") > 0.6
    assert abs(cross_section_r("gradient_0")) < 0.4


def test_counts_scatter_around_the_true_negative_binomial_mean(
    sections: list[ad.AnnData],
) -> None:
    slide = sections[0]
    counts, mean = slide.X.toarray(), slide.layers["true_mean"].astype(np.float64)
    assert counts.mean() / mean.mean() == pytest.approx(1.0, abs=0.03)
    per_gene = counts.mean(axis=0) / mean.mean(axis=0)
    assert np.median(per_gene) == pytest.approx(1.0, abs=0.05)
    theta = slide.uns["synthetic"]["config"]["nb_theta"]
    pearson_residuals = (counts - mean) / np.sqrt(mean + mean**2 / theta)
    assert np.median(pearson_residuals.var(axis=0)) == pytest.approx(1.0, abs=0.1)
    assert abs(pearson_residuals.mean()) < 0.05
    assert counts.sum(axis=1).mean() == pytest.approx(3000.0, rel=0.05)


def test_genes_of_a_program_correlate_more_than_genes_of_different_programs(
    sections: list[ad.AnnData],
) -> None:
    slide = sections[0]
    counts = slide.X.toarray()
    correlation = np.corrcoef(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).T)
    program = slide.var["program"].to_numpy()
    same = (program[:, None] == program[None, :]) & (program[:, None] != "housekeeping")
    np.fill_diagonal(same, False)
    different = program[:, None] != program[None, :]
    assert correlation[same].mean() > correlation[different].mean() + 0.3


# ----------------------------------------------------------------------------- embeddings


def test_planted_gene_embeddings_cluster_by_program(sections: list[ad.AnnData]) -> None:
    embedding = planted_gene_embeddings(sections[0], dim=32)
    assert embedding.shape == (200, 32)
    assert list(embedding.index) == list(sections[0].var_names)
    from_config = planted_gene_embeddings(SyntheticConfig(), dim=32)
    np.testing.assert_allclose(embedding.to_numpy(), from_config.to_numpy())
    unit = embedding.to_numpy() / np.linalg.norm(embedding.to_numpy(), axis=1, keepdims=True)
    cosine = unit @ unit.T
    program = sections[0].var["program"].to_numpy()
    same = program[:, None] == program[None, :]
    np.fill_diagonal(same, False)
    different = program[:, None] != program[None, :]
    assert cosine[same].mean() > 0.6 and abs(cosine[different].mean()) < 0.1
    noisier = planted_gene_embeddings(sections[0], dim=32, noise=2.0).to_numpy()
    noisier /= np.linalg.norm(noisier, axis=1, keepdims=True)
    assert (noisier @ noisier.T)[same].mean() < cosine[same].mean()


def test_planted_gene_embeddings_do_not_depend_on_which_genes_are_kept(
    sections: list[ad.AnnData],
) -> None:
    kept = sections[0][:, 20:].copy()
    full = planted_gene_embeddings(sections[0])
    subset = planted_gene_embeddings(kept)
    np.testing.assert_array_equal(subset.to_numpy(), full.loc[kept.var_names].to_numpy())
