"""stinfer: spatial omics inference from histology and co-expression.

The public API is grouped by what the user is doing, as scanpy's is::

    import stinfer as st

    slide = st.io.read_visium("outs", image="slide.tif")      # read: slide AnnData
    genes = st.pp.select_genes([slide], method="svg")         # preprocess
    model = st.models.create_model("stevs", [slide], genes, preset="fast")
    model.train(); model.save("run")                          # model
    prediction = st.models.load("run").predict(new_slide)     # AnnData of predicted counts
    st.evaluate.evaluate_anndata(prediction, truth).summary()  # evaluate
    st.pl.plot_spatial_maps(truth, {"STEvs": prediction}, ["ERBB2"])  # plot

- :mod:`stinfer.io` reads slides (10x Visium, legacy ST, h5ad, HEST-1k) into AnnData and
  gives lazy access to their H&E images;
- ``stinfer.pp`` (:mod:`stinfer.preprocess`) normalises counts and selects genes;
- :mod:`stinfer.data` extracts spot patches and generates synthetic tissue;
- :mod:`stinfer.models` holds the user-facing models (STEvs, CoxFormer, baselines), created
  by name through one registry and loaded from any saved folder;
- :mod:`stinfer.evaluate` computes the papers' metrics and runs their protocols;
- :mod:`stinfer.cohort` predicts a cohort of slides with one run, one task per slide (on Ray
  with ``workers > 1``);
- ``stinfer.pl`` (:mod:`stinfer.plot`) draws slides, expression maps and comparisons.

Each is imported on first access (PEP 562), so ``import stinfer`` stays light (no torch).
"""

import importlib
from typing import Any

from stinfer.errors import InputError

__version__ = "0.1.0"

_SUBMODULES = {
    "io": "stinfer.io",
    "pp": "stinfer.preprocess",
    "data": "stinfer.data",
    "models": "stinfer.models",
    "evaluate": "stinfer.evaluate",
    "cohort": "stinfer.cohort",
    "pl": "stinfer.plot",
}

__all__ = ["InputError", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    """Import a task's module on first access (PEP 562)."""
    if name in _SUBMODULES:
        module = importlib.import_module(_SUBMODULES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'stinfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
