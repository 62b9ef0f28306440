"""The model registry: every stinfer model by its type name, created and loaded through one door.

A model type is the name a benchmark YAML (``type: stevs``), the CLI (``stinfer train --model
stevs``) and a saved model's ``config.json`` (``"model_type": "stevs"``) use for one class;
:data:`MODEL_TYPES` maps each name to its class (imported when first used, so importing the
registry stays light) and says what the model is:

- expression models: ``mean`` (:class:`~stinfer.models.baselines.MeanExpression`),
  ``coordinate_knn`` (:class:`~stinfer.models.baselines.CoordinateKNN`), ``feature_ridge``
  (:class:`~stinfer.models.baselines.PatchFeatureRidge`, reads images, takes patches),
  ``stnet`` (:class:`~stinfer.models.baselines.STNet`, reads images, takes patches, presets
  ``paper``/``fast``), ``stevs`` (:class:`~stinfer.models.stevs.STEvs`, reads images, presets);
- imputation models: ``coxformer_spatial``
  (:class:`~stinfer.models.coxformer_spatial.CoxFormerSpatial`, presets), and the held-out
  genes baselines ``gene_mean_profile`` and ``gene_knn``
  (:mod:`stinfer.models.imputation_baselines`);
- gene embeddings: ``coxformer_embeddings``
  (:class:`~stinfer.models.gene_embeddings.CoxFormerEmbeddings`, presets).

``task``: ``"expression"`` models follow :class:`stinfer.evaluate.protocols.ExpressionModel`
(``Model(train_slides, genes, config)``, ``train()``, ``predict(slide)`` -> counts);
``"imputation"`` models predict genes from their embeddings on a slide
(``predict(slide, genes)`` -> log1p CP10k); ``"gene_embeddings"`` models learn gene vectors
from expression corpora (``train(corpora)``, ``get_embeddings()``).

Examples
--------
>>> from stinfer.models import create_model, load
>>> model = create_model("stevs", [slide], genes, preset="fast", epochs=5)  # doctest: +SKIP
>>> model.train(); model.save("runs/c2")                                      # doctest: +SKIP
>>> load("runs/c2").predict(other_slide)                                      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stinfer.errors import InputError
from stinfer.models.configs import override_config, resolve_preset

__all__ = [
    "MODEL_TYPES",
    "TASKS",
    "ModelType",
    "create_model",
    "list_models",
    "load",
    "model_config",
    "model_type",
    "override_config",
]

TASKS = ("expression", "imputation", "gene_embeddings")


@dataclass(frozen=True)
class ModelType:
    """One registered model type: its class and what it needs.

    Attributes
    ----------
    name
        The type name (``config.json``'s ``model_type``, the YAML's ``type``).
    class_path
        ``"module:Class"``, imported by :attr:`model_class` when first needed.
    task
        One of :data:`TASKS` (see the module docstring).
    summary
        One line for ``--help`` and the docs.
    reads_images
        Predictions can depend on the slide's H&E image.
    accepts_patches
        The constructor takes the training slides' patches (``patches=``, one uint8
        ``(n_spots, 3, H, W)`` array per slide) instead of extracting them.
    closed_form
        Trained without gradient descent (seconds, not minutes).
    presets
        Named configs (``preset=``); the first is the class's default.
    seed_field
        Dotted path of the config field :func:`model_config`'s ``seed`` sets (None: the model
        has no randomness).
    """

    name: str
    class_path: str
    task: str
    summary: str
    reads_images: bool = False
    accepts_patches: bool = False
    closed_form: bool = False
    presets: tuple[str, ...] = ()
    seed_field: str | None = "seed"
    base_config: Callable[[Any], Any] = dataclasses.field(default=None, repr=False)
    shorthands: Callable[[dict[str, Any]], dict[str, Any]] | None = dataclasses.field(
        default=None, repr=False
    )

    @property
    def model_class(self) -> type:
        """The model class (its module is imported on first use)."""
        module, _, name = self.class_path.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def expression(self) -> bool:
        """True for expression models (train slides + genes -> counts at every spot)."""
        return self.task == "expression"


# --------------------------------------------------------------------------- configs
def _nested(path: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _no_presets(name: str, config_class: str) -> Callable[[Any], Any]:
    """The base config of a model without presets: its config class's defaults."""

    def base(preset: Any) -> Any:
        module, _, class_name = config_class.partition(":")
        cls = getattr(importlib.import_module(module), class_name)
        if preset is None:
            return cls()
        if isinstance(preset, cls):
            return preset
        raise InputError(f"{name} has no presets; got preset {preset!r}.")

    return base


def _stnet_base(preset: Any) -> Any:
    from stinfer.models.baselines import STNET_PRESETS, STNetConfig

    return resolve_preset(STNET_PRESETS, preset, STNetConfig, "ST-Net")


def _trained_shorthands(upgrade: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The overrides of a model trained for epochs: the fields of its older config layouts
    moved to their place by ``upgrade`` (``"module:function"``), then ``epochs: N`` sets
    ``trainer.max_epochs`` unless that is given."""

    def shorthands(overrides: dict[str, Any]) -> dict[str, Any]:
        module, _, name = upgrade.partition(":")
        overrides = dict(overrides)
        epochs = overrides.pop("epochs", None)
        overrides = getattr(importlib.import_module(module), name)(overrides)
        if epochs is None:
            return overrides
        trainer = overrides.setdefault("trainer", {})
        if not isinstance(trainer, dict):
            raise InputError(
                f"epochs={epochs!r} and a whole trainer={trainer!r}: set max_epochs in the trainer."
            )
        trainer.setdefault("max_epochs", int(epochs))
        return overrides

    return shorthands


def _stevs_base(preset: Any) -> Any:
    from stinfer.models.stevs import resolve_config

    return copy.deepcopy(resolve_config(preset))


def _coxformer_spatial_base(preset: Any) -> Any:
    from stinfer.models.coxformer_spatial import coxformer_spatial_config

    return coxformer_spatial_config(preset)


def _gene_embeddings_base(preset: Any) -> Any:
    from stinfer.models.gene_embeddings import GeneEmbeddingConfig, gene_embedding_config

    if isinstance(preset, GeneEmbeddingConfig):
        return preset
    return gene_embedding_config(preset or "paper")


def _gene_embeddings_shorthands(overrides: dict[str, Any]) -> dict[str, Any]:
    """The stages' old ``learning_rate`` is ``lr``, the old flat run settings are the
    ``trainer``'s (:func:`stinfer.models.gene_embeddings.upgrade_gene_embedding_config_dict`);
    each stage has its own ``max_epochs``, so there is no ``epochs`` shorthand."""
    from stinfer.models.gene_embeddings import upgrade_gene_embedding_config_dict

    return upgrade_gene_embedding_config_dict(overrides)


MODEL_TYPES: dict[str, ModelType] = {
    entry.name: entry
    for entry in (
        ModelType(
            "mean",
            "stinfer.models.baselines:MeanExpression",
            "expression",
            "mean count profile of the training spots (the floor)",
            closed_form=True,
            seed_field=None,
            base_config=_no_presets("mean", "stinfer.models.baselines:MeanExpressionConfig"),
        ),
        ModelType(
            "coordinate_knn",
            "stinfer.models.baselines:CoordinateKNN",
            "expression",
            "k-nearest-neighbour regression on spot coordinates (spatial only)",
            closed_form=True,
            seed_field=None,
            base_config=_no_presets(
                "coordinate_knn", "stinfer.models.baselines:CoordinateKNNConfig"
            ),
        ),
        ModelType(
            "feature_ridge",
            "stinfer.models.baselines:PatchFeatureRidge",
            "expression",
            "HEST-Benchmark linear probe: patch features -> PCA -> ridge",
            reads_images=True,
            accepts_patches=True,
            closed_form=True,
            base_config=_no_presets(
                "feature_ridge", "stinfer.models.baselines:PatchFeatureRidgeConfig"
            ),
        ),
        ModelType(
            "stnet",
            "stinfer.models.baselines:STNet",
            "expression",
            "ST-Net: a CNN fine-tuned on the spot patch (He et al. 2020)",
            reads_images=True,
            accepts_patches=True,
            presets=("paper", "fast"),
            seed_field="trainer.seed",
            base_config=_stnet_base,
            shorthands=_trained_shorthands("stinfer.models.baselines:upgrade_stnet_config_dict"),
        ),
        ModelType(
            "stevs",
            "stinfer.models.stevs:STEvs",
            "expression",
            "STEvs: multimodal VAE, H&E + coordinates -> NB expression",
            reads_images=True,
            presets=("paper", "fast"),
            seed_field="trainer.seed",
            base_config=_stevs_base,
            shorthands=_trained_shorthands("stinfer.models.stevs:upgrade_config_dict"),
        ),
        ModelType(
            "coxformer_spatial",
            "stinfer.models.coxformer_spatial:CoxFormerSpatial",
            "imputation",
            "CoxFormer spatial model: any gene with an embedding at every spot",
            reads_images=True,
            presets=("paper", "fast"),
            seed_field="trainer.seed",
            base_config=_coxformer_spatial_base,
            shorthands=_trained_shorthands(
                "stinfer.models.coxformer_spatial:upgrade_coxformer_spatial_config_dict"
            ),
        ),
        ModelType(
            "gene_mean_profile",
            "stinfer.models.imputation_baselines:GeneMeanProfile",
            "imputation",
            "held-out genes baseline: the per-spot mean of the training genes",
            closed_form=True,
            seed_field=None,
            base_config=_no_presets(
                "gene_mean_profile", "stinfer.models.imputation_baselines:GeneMeanProfileConfig"
            ),
        ),
        ModelType(
            "gene_knn",
            "stinfer.models.imputation_baselines:GeneKNN",
            "imputation",
            "held-out genes baseline: the k most similar training genes by embedding",
            closed_form=True,
            base_config=_no_presets(
                "gene_knn", "stinfer.models.imputation_baselines:GeneKNNConfig"
            ),
        ),
        ModelType(
            "coxformer_embeddings",
            "stinfer.models.gene_embeddings:CoxFormerEmbeddings",
            "gene_embeddings",
            "CoxFormer gene embeddings from co-expression corpora",
            presets=("paper", "fast"),
            seed_field="trainer.seed",
            base_config=_gene_embeddings_base,
            shorthands=_gene_embeddings_shorthands,
        ),
    )
}
"""Every registered model type, by name (see the module docstring)."""


def list_models(task: str | None = None) -> list[str]:
    """Names of the registered model types, in registry order; only ``task``'s when given."""
    if task is not None and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {list(TASKS)}.")
    return [name for name, entry in MODEL_TYPES.items() if task in (None, entry.task)]


def model_type(name: str) -> ModelType:
    """The registry entry of ``name``; an :class:`InputError` listing the names otherwise."""
    if name not in MODEL_TYPES:
        raise InputError(f"unknown model type {name!r}; choose one of {list_models()}.")
    return MODEL_TYPES[name]


def model_config(name: str, preset: Any = None, seed: int | None = None, **overrides: Any) -> Any:
    """The config of model type ``name``: a preset, then ``seed``, then ``overrides``.

    Parameters
    ----------
    name
        A registered model type.
    preset
        A preset name (``"paper"``, ``"fast"``; see :attr:`ModelType.presets`), a config object
        of the model to start from, or ``None`` (the class's default).
    seed
        Sets the config's seed (:attr:`ModelType.seed_field`); ignored by models without one.
    **overrides
        Config fields, nested as the config is (``training={"augment": False}``,
        ``trainer={"max_epochs": 5}``, ``patch={"patch_size_px": 64}`` for a closed-form
        baseline); the models trained for epochs (STEvs, ST-Net, CoxFormer spatial) also take
        ``epochs=N`` for ``trainer.max_epochs``, and every model with an upgrade function takes
        the field names of its older configs (see
        :func:`stinfer.models.stevs.upgrade_config_dict`,
        :func:`stinfer.models.baselines.upgrade_stnet_config_dict`,
        :func:`stinfer.models.coxformer_spatial.upgrade_coxformer_spatial_config_dict`,
        :func:`stinfer.models.gene_embeddings.upgrade_gene_embedding_config_dict`). An unknown
        field is an :class:`InputError` naming its path.
    """
    entry = model_type(name)
    config = copy.deepcopy(entry.base_config(preset))  # the caller's config stays untouched
    if seed is not None and entry.seed_field is not None:
        config = override_config(config, _nested(entry.seed_field, int(seed)), name)
    if entry.shorthands is not None:
        overrides = entry.shorthands(overrides)
    return override_config(config, overrides, name) if overrides else config


def create_model(
    name: str,
    *args: Any,
    preset: Any = None,
    config: Any = None,
    seed: int | None = None,
    **kwargs: Any,
) -> Any:
    """Create a model of type ``name`` from its data and a config built by :func:`model_config`.

    Parameters
    ----------
    name
        A registered model type (:func:`list_models`).
    *args
        The class's data arguments in order: ``train_slides, genes`` for expression models,
        ``slide, gene_embeddings`` for ``coxformer_spatial``, none for gene embeddings.
    preset, seed
        As for :func:`model_config`.
    config
        A ready config object instead of ``preset`` / ``seed`` / overrides.
    **kwargs
        Keyword arguments of the class's constructor (``patches=``, ``train_genes=``,
        ``modality=``, ``image_features=``), the rest are config overrides. A config field
        named like a constructor argument (CoxFormer's ``image_features``) is set through
        ``config=model_config(name, ..., image_features="handcrafted")``.

    Examples
    --------
    >>> knn = create_model("coordinate_knn", slides, genes, n_neighbors=5)  # doctest: +SKIP
    >>> stevs = create_model("stevs", slides, genes, preset="fast", epochs=2)  # doctest: +SKIP
    """
    entry = model_type(name)
    parameters = inspect.signature(entry.model_class).parameters
    arguments = {key: kwargs.pop(key) for key in list(kwargs) if key in parameters}
    if config is None:
        config = model_config(name, preset, seed, **kwargs)
    elif preset is not None or seed is not None or kwargs:
        raise InputError(
            f"create_model({name!r}): give either config= or preset/seed/overrides, not both."
        )
    return entry.model_class(*args, config=config, **arguments)


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load any saved model: ``config.json``'s ``model_type`` picks the class.

    ``kwargs`` go to the class's ``load`` (e.g. ``slide=`` for ``coxformer_spatial``).

    Raises
    ------
    InputError
        ``config.json`` is missing or unreadable, its ``model_type`` is missing or not
        registered, or its ``format_version`` is newer than this stinfer reads (see
        :func:`stinfer.models.persistence.read_model_header`); or the folder's files do not
        make a model of that type (damaged weights, arrays of the wrong shape or names, a
        config of another model): one message naming the folder and what did not fit.
    """
    from stinfer.models.persistence import CONFIG_FILE, WEIGHTS_FILE, read_model_header

    saved = read_model_header(path)
    if saved.model_type not in MODEL_TYPES:
        raise InputError(
            f"{saved.directory / CONFIG_FILE}: field 'model_type' is {saved.model_type!r}, "
            f"not a model type of this stinfer ({list_models()}); was it saved by a newer one?"
        )
    try:
        return MODEL_TYPES[saved.model_type].model_class.load(path, **kwargs)
    except InputError as error:
        if str(saved.directory) in str(error):
            raise
        raise InputError(f"{saved.directory / CONFIG_FILE}: {error}") from error
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        # torch's load_state_dict (missing/unexpected keys, size mismatch), safetensors'
        # header errors and a config of another model surface as these; the files are the
        # user's input, so they get one line and not a traceback
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:2]) or type(error).__name__
        raise InputError(
            f"{saved.directory}: cannot load it as a saved {saved.model_type!r} model: "
            f"{detail[:300]} (is {WEIGHTS_FILE} damaged, or does {CONFIG_FILE} belong to "
            "another model?)"
        ) from error
