"""The benchmark YAML is checked key by key and type by type before any cell runs.

Each bad config fails in :func:`load_config` with an :class:`InputError` naming the file and
the key path (``x.yaml: cohorts[0].slides: expected a list, got 'A1'``); no data is read.
"""

from __future__ import annotations

import re

import pytest
import yaml

from stinfer.errors import InputError
from stinfer.evaluate.benchmark import load_config

COHORT = {"name": "syn", "format": "synthetic", "synthetic": {"target_spots": 60, "n_genes": 20}}
MODELS = [{"name": "Mean", "type": "mean"}]


def _config(**changes) -> dict:
    raw = {"name": "tiny", "cohorts": [dict(COHORT)], "models": list(MODELS)}
    raw.update(changes)
    return raw


def _cohort(**changes) -> list[dict]:
    return [{**COHORT, **changes}]


BAD_CONFIGS = {
    "slides_a_single_string": (
        _config(cohorts=_cohort(format="h5ad", slides="A1.h5ad")),
        "cohorts[0].slides: expected a list, got 'A1.h5ad'",
    ),
    "n_genes_a_string": (
        _config(cohorts=_cohort(genes={"method": "svg", "n_genes": "300"})),
        "cohorts[0].genes.n_genes: expected an integer, got '300'",
    ),
    "n_genes_a_float": (
        _config(cohorts=_cohort(genes={"n_genes": 12.5})),
        "cohorts[0].genes.n_genes: expected an integer, got 12.5",
    ),
    "gene_list_a_single_string": (
        _config(cohorts=_cohort(genes={"method": "list", "genes": "ERBB2"})),
        "cohorts[0].genes.genes: expected a list of strings, got 'ERBB2'",
    ),
    "misspelt_gene_key": (
        _config(cohorts=_cohort(genes={"n_gene": 12})),
        "cohorts[0].genes: unknown keys ['n_gene'] (did you mean 'n_genes'?)",
    ),
    "misspelt_cohort_key": (
        _config(cohorts=_cohort(slide=["a.h5ad"])),
        "cohorts[0]: unknown keys ['slide'] (did you mean 'slides'?)",
    ),
    "misspelt_top_level_key": (
        _config(protocol=["cross_slice"]),
        "unknown top-level keys ['protocol'] (did you mean 'protocols'?)",
    ),
    "cohort_not_a_mapping": (
        _config(cohorts=["patient_c"]),
        "cohorts[0]: expected a mapping",
    ),
    "cohorts_a_mapping": (
        _config(cohorts={"name": "syn"}),
        "cohorts: expected a list, got {'name': 'syn'}",
    ),
    "seeds_a_single_integer": (_config(seeds=0), "seeds: expected a list of integers, got 0"),
    "seed_a_string": (_config(seeds=[0, "one"]), "seeds[1]: expected an integer, got 'one'"),
    "protocols_a_single_string": (
        _config(protocols="cross_slice"),
        "protocols: expected a list of strings, got 'cross_slice'",
    ),
    "save_predictions_a_string": (
        _config(save_predictions="no"),
        "save_predictions: expected true or false, got 'no'",
    ),
    "name_a_number": (_config(name=12), "name: expected a string, got 12"),
    "model_modes_a_single_string": (
        _config(models=[{"name": "S", "type": "stevs", "modes": "fused"}]),
        "models[0].modes: expected a list of strings, got 'fused'",
    ),
    "model_type_misspelt": (
        _config(models=[{"type": "coordinate_kn"}]),
        "models[0].type 'coordinate_kn' is not one of",
    ),
    "model_option_unknown": (
        _config(models=[{"name": "kNN", "type": "coordinate_knn", "n_neighbours": 5}]),
        "models[0] (kNN): coordinate_knn: unknown options ['n_neighbours']",
    ),
    "robustness_alpha_a_string": (
        _config(robustness={"alphas": [0, "high"]}),
        "robustness.alphas[1]: expected a number, got 'high'",
    ),
    "figure_pair_of_three": (
        _config(figures={"pair": ["A", "B", "C"]}),
        "figures.pair: expected a list of 2 strings, got ['A', 'B', 'C']",
    ),
    "figure_umap_a_string": (
        _config(figures={"umap": "yes"}),
        "figures.umap: expected true or false, got 'yes'",
    ),
    "patch_size_a_string": (
        _config(patch={"patch_size_px": "160px"}),
        "patch.patch_size_px: expected an integer, got '160px'",
    ),
    "domains_a_string": (
        _config(domains="domain"),
        "domains: expected true, false or a mapping",
    ),
    "domains_unknown_method": (
        _config(domains={"method": "louvain"}),
        "domains.method 'louvain' is not one of ['kmeans', 'gmm', 'leiden']",
    ),
    "synthetic_field_misspelt": (
        _config(cohorts=_cohort(synthetic={"target_spot": 60})),
        "cohorts[0].synthetic: unknown keys ['target_spot'] (did you mean 'target_spots'?)",
    ),
    "legacy_slide_key_misspelt": (
        _config(
            cohorts=_cohort(
                format="legacy-st", slides=[{"counts": "c.tsv", "spots": "s.tsv", "imgae": "i"}]
            )
        ),
        "cohorts[0].slides[0]: unknown keys ['imgae'] (did you mean 'image'?)",
    ),
    "legacy_pixel_size_a_string": (
        _config(
            cohorts=_cohort(
                format="legacy-st",
                slides=[{"counts": "c.tsv", "spots": "s.tsv", "pixel_size_um": "1um"}],
            )
        ),
        "cohorts[0].slides[0].pixel_size_um: expected a number, got '1um'",
    ),
    "ablation_base_a_list": (
        _config(ablations={"base": ["fast"]}),
        "ablations.base: expected a string, got ['fast']",
    ),
    "ablation_key_misspelt": (
        _config(ablations={"variant": ["concat"]}),
        "ablations: unknown keys ['variant'] (did you mean 'variants'?)",
    ),
    "ablation_variant_field_unknown": (
        _config(ablations={"variants": [{"name": "x", "module": {"fusoin": "poe"}}]}),
        "ablations.variants[0]: stevs: unknown options ['module.fusoin']",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_fails_naming_the_file_and_the_key(tmp_path, case):
    raw, expected = BAD_CONFIGS[case]
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_types_are_converted_as_the_dataclasses_expect(tmp_path):
    path = tmp_path / "bench.yaml"
    raw = _config(
        robustness={"alphas": [0, 0.5], "models": ["Mean"]},
        figures={"pair": ["A", "B"], "metrics": ["mse"]},
        seeds=[0, 1],
        patch={"patch_size_um": 160},
    )
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert config.robustness.alphas == (0.0, 0.5)
    assert config.figures.pair == ("A", "B") and config.figures.metrics == ("mse",)
    assert config.seeds == (0, 1)
    assert config.patch.patch_size_um == 160.0
    assert config.models[0].modes == ("fused",)


def test_a_bad_file_is_named_even_when_it_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(InputError, match=re.escape(f"{path}: the config must be a YAML mapping")):
        load_config(path)


def _io_test_helper(module: str, name: str):
    """A builder of ``tests/io/<module>.py`` (the tiny Visium and HEST layouts built there)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "io" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"_stinfer_tests_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, name)


def test_cohorts_read_every_reader_format_visium_and_hest_included(tmp_path):
    from stinfer.evaluate.benchmark import COHORT_FORMATS, load_cohort
    from stinfer.io import READERS

    assert set(READERS) <= set(COHORT_FORMATS)
    _io_test_helper("test_visium", "write_spaceranger")(tmp_path / "visium" / "V1")
    _io_test_helper("test_h5ad", "write_hest_sample")(tmp_path / "hest", "TENX99")
    raw = _config(
        cohorts=[
            {"name": "v", "format": "visium", "root": str(tmp_path / "visium"),
             "slides": [{"path": "V1", "sample_id": "V1"}]},
            {"name": "h", "format": "hest", "root": str(tmp_path / "hest"), "slides": ["TENX99"]},
        ]
    )  # fmt: skip
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    visium, hest = load_config(path).cohorts
    (slide,) = load_cohort(visium, tmp_path / "data")
    assert slide.uns["stinfer"]["source_format"] == "visium"
    assert slide.uns["stinfer"]["sample_id"] == "V1" and slide.n_obs > 0
    (slide,) = load_cohort(hest, tmp_path / "data")
    assert slide.uns["stinfer"]["source_format"] == "hest" and slide.n_obs == 30


def test_a_slide_entry_missing_its_readers_required_argument_is_named(tmp_path):
    path = tmp_path / "bench.yaml"
    raw = _config(cohorts=_cohort(format="legacy-st", slides=[{"counts": "c.tsv"}]))
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=r"slides\[0\]: a legacy-st slide needs spots"):
        load_config(path)
