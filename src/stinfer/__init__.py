"""stinfer: spatial omics inference from histology and co-expression.

The public API is grouped by what the user is doing:

- :mod:`stinfer.io` reads slides (10x Visium, legacy ST, h5ad, HEST-1k) into AnnData and
  gives lazy access to their H&E images;
- :mod:`stinfer.data` extracts spot patches and generates synthetic tissue;
- :mod:`stinfer.models` holds the user-facing models (STEvs, CoxFormer, baselines);
- :mod:`stinfer.evaluate` computes the papers' metrics and runs their protocols.
"""

from stinfer.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
