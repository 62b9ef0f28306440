"""The model registry: every registered model is created, trained, saved and loaded by path the
same way and predicts the same after loading; one saved-model format with a checked header."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import stinfer as st
from stinfer.cli import main
from stinfer.coexpression.synthetic import planted_module_corpus
from stinfer.data.patches import PatchSpec
from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections, planted_gene_embeddings
from stinfer.errors import InputError
from stinfer.io.atomic import write_h5ad
from stinfer.io.slide_data import prepare_for_h5ad
from stinfer.models import create_model, list_models, load, model_type
from stinfer.models.persistence import FORMAT_VERSION
from stinfer.models.stevs import STEvs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SMALL_PATCH = {"patch_size_px": 64}  # 64-px patches: the image models' cost, not their accuracy
COXFORMER_TINY = dict(
    module={
        "d_model": 32,
        "feedforward_dim": 64,
        "location_dim": 32,
        "image_dim": 32,
        "head_width": 32,
        "gene_hidden_dim": 32,
        "n_heads": 4,
        "rank": 8,
    },
    training={"min_steps_per_epoch": 2, "min_spot_fraction": 0.0},
    trainer={"max_epochs": 2, "progress_bar": False, "accelerator": "cpu"},
)
EMBEDDINGS_TINY = dict(
    graph={"top_k": 8, "min_cells": 1},
    completion={"n_node_features": 8, "hidden_dim": 16, "max_epochs": 2, "t_max": 2},
    autoencoder={
        "n_tokens": 4,
        "d_model": 16,
        "n_heads": 2,
        "feedforward_dim": 32,
        "latent_dim": 8,
        "max_epochs": 2,
        "t_max": 2,
    },
    trainer={"accelerator": "cpu", "progress_bar": False},
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two small synthetic sections (H&E image + counts) and planted gene embeddings."""
    folder = tmp_path_factory.mktemp("cohort")
    config = SyntheticConfig(seed=11, target_spots=90, n_genes=24, n_sections=2)
    sections = make_synthetic_sections(folder / "images", config)
    return {
        "sections": sections,
        "genes": list(sections[0].var_names[:8]),
        "embeddings": planted_gene_embeddings(config, dim=8),
        "folder": folder,
    }


# --------------------------------------------------------------------------- one per model
def expression(name: str, **options):
    """An expression model on section 1; its prediction on section 2 is what must survive."""

    def build(cohort):
        first, second = cohort["sections"]
        model = create_model(name, [first], cohort["genes"], seed=0, **options)
        return model, lambda m: np.asarray(m.predict(second).X)

    return build


def imputation(name: str, **options):
    """An imputation model trained on section 1's first genes, predicting others on section 2."""

    def build(cohort):
        first, second = cohort["sections"]
        train_genes = list(first.var_names[:16])
        query = list(first.var_names[16:20])
        model = create_model(name, first, cohort["embeddings"], train_genes=train_genes, **options)
        return model, lambda m: np.asarray(m.predict(second, query).X)

    return build


def gene_embeddings(cohort):
    corpus, _ = planted_module_corpus(n_cells=300, n_modules=3, genes_per_module=8, seed=0)
    model = create_model("coxformer_embeddings", **EMBEDDINGS_TINY)
    model.train({"synthetic": corpus})
    return model, lambda m: np.asarray(m.get_embeddings().X)


BUILDERS = {
    "mean": expression("mean"),
    "coordinate_knn": expression("coordinate_knn", n_neighbors=3),
    "feature_ridge": expression("feature_ridge", features="handcrafted", patch=SMALL_PATCH),
    "stnet": expression(
        "stnet",
        preset="fast",
        epochs=1,
        module={"backbone": "resnet10t"},
        training={"batch_size": 32, "patch": SMALL_PATCH},
        trainer={"accelerator": "cpu"},
    ),
    "stevs": expression(
        "stevs",
        preset="fast",
        epochs=1,
        training={"test_time_augmentation": False},
        trainer={"progress_bar": False},
    ),
    "coxformer_spatial": imputation("coxformer_spatial", preset="fast", **COXFORMER_TINY),
    "gene_mean_profile": imputation("gene_mean_profile"),
    "gene_knn": imputation("gene_knn", candidates=[2, 4]),
    "coxformer_embeddings": gene_embeddings,
}


def test_every_registered_model_has_a_round_trip_here():
    assert set(BUILDERS) == set(list_models())


@pytest.fixture(scope="module")
def saved(cohort, tmp_path_factory):
    """Every registered model trained and saved once: ``{name: (model, predict, folder)}``."""
    folder = tmp_path_factory.mktemp("models")
    models = {}
    for name in list_models():
        model, predict = BUILDERS[name](cohort)
        if model_type(name).task != "gene_embeddings":
            model.train()
        model.save(folder / name)
        models[name] = (model, predict, folder / name)
    return models


@pytest.mark.parametrize("name", list_models())
def test_a_saved_model_loads_by_path_as_its_class_and_predicts_the_same(name, saved):
    model, predict, folder = saved[name]
    header = json.loads((folder / "config.json").read_text())
    assert header["model_type"] == name and header["format_version"] == FORMAT_VERSION
    assert (folder / "weights.safetensors").is_file()
    loaded = load(folder)
    assert type(loaded) is type(model) is model_type(name).model_class
    np.testing.assert_allclose(predict(loaded), predict(model), rtol=1e-5, atol=1e-6)


def test_create_model_splits_constructor_arguments_from_config_overrides(cohort):
    first, _ = cohort["sections"]
    patches = [np.zeros((first.n_obs, 3, 16, 16), np.uint8)]
    model = create_model("feature_ridge", [first], cohort["genes"], patches=patches, n_components=4)
    assert model._train_patches is patches and model.config.n_components == 4
    stevs = st.models.model_config("stevs", "fast", seed=3, epochs=2)
    assert stevs.trainer.seed == 3 and stevs.trainer.max_epochs == 2
    assert isinstance(stevs.training.patch, PatchSpec)
    with pytest.raises(InputError, match=r"unknown options \['n_neigbors'\]"):
        create_model("coordinate_knn", [first], cohort["genes"], n_neigbors=3)
    with pytest.raises(InputError, match=r"module\.fusoin"):
        create_model("stevs", [first], cohort["genes"], module={"fusoin": "poe"})
    with pytest.raises(InputError, match="has no presets"):
        create_model("mean", [first], cohort["genes"], preset="fast")
    with pytest.raises(InputError, match="unknown model type 'ridge'"):
        create_model("ridge", [first], cohort["genes"])


# --------------------------------------------------------------------------- the header
def test_a_coxformer_folder_is_never_parsed_as_stevs(saved):
    folder = saved["coxformer_spatial"][2]
    with pytest.raises(
        InputError, match=r"config\.json: field 'model_type' is 'coxformer_spatial'"
    ):
        STEvs.load(folder)
    with pytest.raises(InputError, match="'stevs', not 'mean'"):
        st.models.MeanExpression.load(saved["stevs"][2])


def as_format_0(folder: Path, model_type: str) -> None:
    """Rewrite a saved folder in the layout of the stinfer before ``model_type`` existed."""
    from safetensors.torch import load_file, save_file

    header = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(header["config"]))
    weights = load_file(str(folder / "weights.safetensors"))
    if model_type == "stevs":
        (folder / "genes.json").write_text(json.dumps(header["state"]["genes"]))
    else:
        (folder / "state.json").write_text(json.dumps(header["state"]))
        np.save(folder / "embeddings.npy", weights.pop("embeddings").numpy())
    save_file(weights, str(folder / "weights.safetensors"))


@pytest.mark.parametrize("name", ["stevs", "coxformer_spatial"])
def test_folders_saved_before_the_header_still_load_as_their_own_type(name, saved, tmp_path):
    import shutil

    model, predict, folder = saved[name]
    old = tmp_path / name
    shutil.copytree(folder, old)
    as_format_0(old, name)
    loaded = load(old)
    assert type(loaded) is type(model)
    np.testing.assert_allclose(predict(loaded), predict(model), rtol=1e-5, atol=1e-6)
    other = STEvs if name == "coxformer_spatial" else st.models.CoxFormerSpatial
    with pytest.raises(InputError, match=rf"config\.json: holds a '{name}' model .*, not '"):
        other.load(old)


def old_config(name: str, config: dict) -> dict:
    """``config`` as stinfer wrote it before every model had ``module``, ``training`` and
    ``trainer`` (and before epochs and batch size had one place each)."""
    config = json.loads(json.dumps(config))
    trainer = config.pop("trainer")
    run = ("seed", "accelerator", "devices", "precision", "progress_bar")
    if name == "stevs":
        config["training"]["trainer"] = trainer
        config["module"].update(epochs=999, batch_size=7)  # never read: the training's win
        return config
    if name == "coxformer_embeddings":
        for stage in ("completion", "autoencoder"):
            config[stage]["learning_rate"] = config[stage].pop("lr")
        return {**config, **{key: trainer[key] for key in run}}
    if name == "coxformer_spatial":
        flat = {**config.pop("module"), **config.pop("training"), **config}
        return {**flat, **{key: trainer[key] for key in (*run, "max_epochs", "gradient_clip_val")}}
    config = {**config.pop("module"), **config.pop("training"), **config}
    config["learning_rate"] = config.pop("lr")
    config["epochs"] = trainer.pop("max_epochs")
    for key in run:
        config[key] = trainer.pop(key)
    config["early_stopping_patience"] = trainer.pop("early_stopping_patience")
    return config


@pytest.mark.parametrize("name", ["stevs", "stnet", "coxformer_spatial", "coxformer_embeddings"])
def test_configs_saved_with_the_old_field_names_still_load(name, saved, tmp_path):
    import shutil

    model, predict, folder = saved[name]
    old = tmp_path / name
    shutil.copytree(folder, old)
    header = json.loads((old / "config.json").read_text())
    header["config"] = old_config(name, header["config"])
    (old / "config.json").write_text(json.dumps(header))
    loaded = load(old)
    assert loaded.config == model.config
    np.testing.assert_allclose(predict(loaded), predict(model), rtol=1e-5, atol=1e-6)


def test_old_field_names_in_overrides_move_to_their_one_place():
    stevs = st.models.model_config("stevs", "fast", module={"epochs": 4, "batch_size": 16})
    assert stevs.trainer.max_epochs == 4 and stevs.training.batch_size == 16
    both = {"module": {"epochs": 4}, "training": {"trainer": {"max_epochs": 5}}}
    assert st.models.model_config("stevs", "fast", **both).trainer.max_epochs == 5
    nested = {"training": {"trainer": {"max_epochs": 5, "seed": 7}}, "trainer": {"seed": 8}}
    stevs = st.models.model_config("stevs", "fast", epochs=3, **nested)
    assert (stevs.trainer.max_epochs, stevs.trainer.seed) == (5, 8)  # the new place wins
    stnet = st.models.model_config("stnet", "fast", learning_rate=0.01, seed=2, epochs=3)
    assert (stnet.training.lr, stnet.trainer.seed, stnet.trainer.max_epochs) == (0.01, 2, 3)
    assert st.models.model_config("stnet", "fast", seed=2).trainer.seed == 2
    stnet = st.models.model_config(
        "stnet", "fast", backbone="resnet10t", patch={"patch_size_px": 64}
    )
    assert (stnet.module.backbone, stnet.training.patch.patch_size_px) == ("resnet10t", 64)
    coxformer = st.models.model_config("coxformer_spatial", "fast", max_epochs=3, seed=1, lr=0.1)
    assert (coxformer.trainer.max_epochs, coxformer.trainer.seed) == (3, 1)
    assert coxformer.training.lr == 0.1
    embeddings = st.models.model_config(
        "coxformer_embeddings", completion={"learning_rate": 0.1}, seed=4, progress_bar=False
    )
    assert embeddings.completion.lr == 0.1
    assert (embeddings.trainer.seed, embeddings.trainer.progress_bar) == (4, False)


def test_damaged_weights_a_foreign_config_and_unknown_options_are_one_line_errors(saved, tmp_path):
    import shutil

    source = saved["feature_ridge"][2]

    def copy(name):
        shutil.copytree(source, tmp_path / name)
        return tmp_path / name

    garbage = copy("garbage")
    (garbage / "weights.safetensors").write_bytes(b"\x07" * 100)
    with pytest.raises(InputError, match=r"garbage/weights\.safetensors: not a readable"):
        load(garbage)
    truncated = copy("truncated")
    weights = (source / "weights.safetensors").read_bytes()
    (truncated / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(InputError, match=r"truncated"):
        load(truncated)
    foreign = copy("foreign")  # a ridge's files under a STEvs header
    header = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**header, "model_type": "stevs"}))
    with pytest.raises(
        InputError, match=r"foreign: cannot load it as a saved 'stevs' model: .*state_dict"
    ):
        load(foreign)
    unknown = copy("unknown")
    header["config"] = {**header["config"], "bogus_field": 1}
    (unknown / "config.json").write_text(json.dumps(header))
    with pytest.raises(InputError, match=r"unknown/config\.json: .*bogus_field"):
        load(unknown)


def test_unknown_type_and_newer_format_name_config_json_and_the_field(saved, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    header = json.loads((saved["mean"][2] / "config.json").read_text())

    def write(**changes):
        (folder / "config.json").write_text(json.dumps({**header, **changes}))

    write(model_type="transformer_xl")
    with pytest.raises(InputError, match=r"config\.json: field 'model_type' is 'transformer_xl'"):
        load(folder)
    write(format_version=FORMAT_VERSION + 1)
    with pytest.raises(InputError, match=r"config\.json: field 'format_version' is .* newer"):
        load(folder)
    write(format_version="1")
    with pytest.raises(InputError, match=r"config\.json: field 'format_version' must be"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(InputError, match=r"config\.json: field 'model_type' is None"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({"n_neighbors": 3}))
    with pytest.raises(InputError, match=r"config\.json: no 'model_type' field"):
        load(folder)
    with pytest.raises(InputError, match=r"not a saved model; missing config\.json"):
        load(tmp_path / "nothing")


def test_import_stinfer_is_light_and_groups_the_api_by_task():
    import subprocess
    import sys

    code = (
        "import sys, stinfer as st; assert 'torch' not in sys.modules; "
        "assert st.pp is __import__('stinfer.preprocess').preprocess; "
        "assert st.pl.__name__ == 'stinfer.plot' and st.io.__name__ == 'stinfer.io'; "
        "assert 'stevs' in st.models.list_models('expression'); "
        "assert 'torch' not in sys.modules; st.models.STEvs; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def slide_files(cohort) -> list[Path]:
    paths = []
    for section in cohort["sections"]:
        path = cohort["folder"] / f"{section.uns['stinfer']['sample_id']}.h5ad"
        write_h5ad(prepare_for_h5ad(section), path)
        paths.append(path)
    return paths


CLI_OPTIONS = {
    "mean": [],
    "coordinate_knn": ["--option", "n_neighbors=3"],
    "feature_ridge": ["--option", "features=handcrafted", "--option", "patch.patch_size_px=64"],
    "stnet": [
        *("--preset", "fast", "--epochs", "1", "--accelerator", "cpu"),
        *("--option", "module.backbone=resnet10t", "--option", "training.patch.patch_size_px=64"),
    ],
    "stevs": ["--preset", "fast", "--epochs", "1", "--option", "training.augment=false"],
}


@pytest.mark.parametrize("name", list_models("expression"))
def test_stinfer_train_and_predict_take_every_registered_expression_model(
    name, slide_files, tmp_path
):
    assert set(CLI_OPTIONS) == set(list_models("expression"))
    run, pred = tmp_path / "run", tmp_path / "pred.h5ad"
    train = ["train", "--model", name, "--train", str(slide_files[0]), "--genes", "hvg"]
    status = main(
        [*train, "--n-genes", "6", "--no-progress", *CLI_OPTIONS[name], "--out", str(run)]
    )
    assert status == 0
    assert json.loads((run / "config.json").read_text())["model_type"] == name
    assert (
        main(["predict", "--run", str(run), "--slide", str(slide_files[1]), "--out", str(pred)])
        == 0
    )
    import anndata as ad

    assert ad.read_h5ad(pred).n_vars == 6


def test_flags_a_model_has_no_setting_for_are_refused_by_name(slide_files, tmp_path, capsys):
    train = ["train", "--train", str(slide_files[0]), "--out", str(tmp_path / "run")]
    assert main([*train, "--model", "coordinate_knn", "--freeze-encoder", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "--epochs, --freeze-encoder: model 'coordinate_knn' has no such setting" in err
    assert main([*train, "--model", "mean", "--preset", "paper"]) == 2
    assert "'mean' has no presets" in capsys.readouterr().err
    assert main([*train, "--model", "mean", "--option", "n_neighbors"]) == 2
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
