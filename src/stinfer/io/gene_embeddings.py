"""Gene embedding tables: one AnnData form, read from and written to common formats.

Every embedding table stinfer handles, its own CoxFormer embeddings or an external one
(GenePT, scGPT, Gene2vec, ...), is an AnnData with

- ``obs_names``: unique gene names (one row per gene);
- ``X``: ``(n_genes, n_dims)`` float32 dense vectors;
- ``var_names``: ``dim_0``, ``dim_1``, ...;
- ``uns["gene_embeddings"]``: provenance (``source`` file, ``format``, and for CoxFormer the
  corpora, K, preset, losses, R2 and timings).

Formats (chosen by the file suffix, or ``format=``):

- ``.h5ad``: the AnnData itself;
- ``.csv`` / ``.tsv`` (optionally ``.gz``): a header row, then one row per gene, the gene name in
  the first column (or a column named ``gene``) and one numeric column per dimension;
- ``.parquet``: the same table (gene names in the index or a ``gene`` column), or a ``gene``
  column beside a single list-valued column of vectors;
- ``.pkl`` / ``.pickle``: a dict gene -> vector (GenePT's format) or a pandas DataFrame.
  Unpickling runs code from the file, so a pickle is refused unless the caller opts in
  (``allow_pickle=True``, ``--allow-pickle`` on the command line): only for files you trust;
  converting them once to ``.h5ad``/``.csv``/``.parquet`` avoids the question.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output
from stinfer.io.slide_data import as_dense

__all__ = [
    "EMBEDDING_FORMATS",
    "embedding_format",
    "embeddings_to_anndata",
    "read_gene_embeddings",
    "write_gene_embeddings",
]

EMBEDDING_FORMATS = ("h5ad", "csv", "tsv", "parquet", "pickle")
_SUFFIXES = {
    ".h5ad": "h5ad",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".pkl": "pickle",
    ".pickle": "pickle",
}
UNS_KEY = "gene_embeddings"


def embedding_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The format of ``path``: ``format`` if given, else from the suffix (``.gz`` ignored)."""
    if format is not None:
        name = format.lower().lstrip(".")
        name = {"pkl": "pickle", "pq": "parquet"}.get(name, name)
        if name not in EMBEDDING_FORMATS:
            raise InputError(
                f"unknown embedding format {format!r}; use one of {', '.join(EMBEDDING_FORMATS)}."
            )
        return name
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _SUFFIXES:
        raise InputError(
            f"{path}: cannot tell the embedding format from the suffix; use .h5ad, .csv, .tsv, "
            ".parquet or .pkl (or pass format= in Python)."
        )
    return _SUFFIXES[suffixes[-1]]


def _h5ad_safe(value: object) -> object:
    """Provenance values h5ad can store: None -> "", tuples -> lists, nested dicts kept."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return {str(k): _h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_h5ad_safe(v) for v in value]
        if items and all(isinstance(v, str) for v in items):
            return np.array(items, dtype=object).astype(str)
        if items and all(isinstance(v, int | float | np.number | bool) for v in items):
            return np.asarray(items, dtype=np.float64)
        return json.dumps(value, default=str)
    if isinstance(value, np.generic):
        return value.item()
    return value


def embeddings_to_anndata(
    vectors: np.ndarray,
    genes: Sequence[str],
    source: str = "",
    format: str = "",
    provenance: Mapping | None = None,
) -> ad.AnnData:
    """Build the embedding AnnData (see the module docstring) and check it.

    Parameters
    ----------
    vectors
        ``(n_genes, n_dims)`` numbers.
    genes
        ``(n_genes,)`` unique gene names.
    source, format
        Where the table came from; stored in ``uns["gene_embeddings"]``.
    provenance
        More provenance entries (nested dicts allowed); ``None`` values become ``""``.

    Raises
    ------
    InputError
        Wrong shapes, duplicated gene names, or non-finite values (naming ``source``).
    """
    where = source or "embeddings"
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: embedding values must be numbers ({error}).") from error
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise InputError(f"{where}: expected a genes x dimensions table, got shape {matrix.shape}.")
    index = pd.Index([str(g) for g in genes])
    if len(index) != matrix.shape[0]:
        raise InputError(f"{where}: {len(index)} gene names for {matrix.shape[0]} vectors.")
    if not index.is_unique:
        duplicated = index[index.duplicated()].unique()
        raise InputError(
            f"{where}: {len(duplicated)} genes have more than one vector (e.g. {duplicated[0]}); "
            "keep one row per gene."
        )
    if not np.all(np.isfinite(matrix)):
        bad = index[~np.isfinite(matrix).all(axis=1)]
        raise InputError(f"{where}: {len(bad)} genes have NaN or infinite values (e.g. {bad[0]}).")
    adata = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(index=index),
        var=pd.DataFrame(index=[f"dim_{i}" for i in range(matrix.shape[1])]),
    )
    info = {"source": str(source), "format": str(format)}
    info.update(provenance or {})
    adata.uns[UNS_KEY] = _h5ad_safe(info)
    return adata


def _looks_like_data_row(names: Sequence[object]) -> bool:
    """A header made of numbers that are not the column numbers 0..d-1 (or 1..d) is a data row
    (a table written without a header)."""
    try:
        values = np.array([float(str(name)) for name in names])
    except ValueError:
        return False
    count = len(values)
    return not (
        np.array_equal(values, np.arange(count)) or np.array_equal(values, np.arange(1, count + 1))
    )


def _from_frame(frame: pd.DataFrame, path: Path, format: str) -> ad.AnnData:
    """A genes x dims table (genes in a ``gene`` column, the first column, or the index)."""
    if "gene" in frame.columns:
        frame = frame.set_index("gene")
    if (
        len(frame.columns) == 1
        and frame.iloc[:, 0].map(lambda v: isinstance(v, list | tuple | np.ndarray)).all()
    ):
        vectors = frame.iloc[:, 0].to_list()
        lengths = {len(v) for v in vectors}
        if len(lengths) > 1:
            raise InputError(f"{path}: vectors have different lengths ({sorted(lengths)[:5]}).")
        return embeddings_to_anndata(np.stack(vectors), frame.index, str(path), format)
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame.notna()
    if bad.any().any():
        column = bad.any()[bad.any()].index[0]
        raise InputError(
            f"{path}: column {column!r} holds non-numeric values; the table must be one gene "
            "name column followed by numeric dimensions."
        )
    return embeddings_to_anndata(numeric.to_numpy(), frame.index, str(path), format)


def _from_pickle(obj: object, path: Path) -> ad.AnnData:
    if isinstance(obj, pd.DataFrame):
        return _from_frame(obj, path, "pickle")
    if isinstance(obj, Mapping):
        genes = list(obj.keys())
        try:
            vectors = [np.asarray(obj[g], dtype=np.float64).ravel() for g in genes]
        except (TypeError, ValueError) as error:
            raise InputError(
                f"{path}: every value of the dict must be a numeric vector ({error})."
            ) from error
        lengths = {v.size for v in vectors}
        if len(lengths) > 1:
            raise InputError(f"{path}: vectors have different lengths ({sorted(lengths)[:5]}).")
        if not vectors:
            raise InputError(f"{path}: the dict is empty.")
        return embeddings_to_anndata(np.stack(vectors), genes, str(path), "pickle")
    raise InputError(
        f"{path}: the pickle holds a {type(obj).__name__}; expected a dict gene -> vector or a "
        "pandas DataFrame (genes x dimensions)."
    )


def read_gene_embeddings(
    path: str | os.PathLike, format: str | None = None, allow_pickle: bool = False
) -> ad.AnnData:
    """Read an embedding table into the AnnData form of this module.

    Parameters
    ----------
    path
        ``.h5ad``, ``.csv``/``.tsv`` (``.gz`` allowed), ``.parquet`` or ``.pkl`` file.
    format
        Overrides the suffix: ``h5ad``, ``csv``, ``tsv``, ``parquet`` or ``pickle``.
    allow_pickle
        Read a pickle. Off by default: unpickling runs whatever code the file holds, so a
        crafted file would run its payload; turn it on only for a file you trust.

    Returns
    -------
    anndata.AnnData
        obs = genes, X = float32 vectors, ``uns["gene_embeddings"]`` = provenance.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    InputError
        The file is not a genes x dimensions table (message names the file and the problem),
        or it is a pickle and ``allow_pickle`` is off.

    Examples
    --------
    >>> genept = read_gene_embeddings("GenePT_gene_embedding_ada_text.pickle", allow_pickle=True)
    >>> coxformer = read_gene_embeddings("genes.h5ad")
    """
    path = Path(path)
    kind = embedding_format(path, format)
    if not path.is_file():
        raise FileNotFoundError(2, "no such embedding file", str(path))
    if kind == "pickle" and not allow_pickle:
        raise InputError(
            f"{path}: a pickle can run code when it is read, so stinfer does not read one "
            "unless asked: pass --allow-pickle (allow_pickle=True) if you trust this file, or "
            "convert it once to .h5ad, .csv or .parquet."
        )
    if kind == "h5ad":
        adata = ad.read_h5ad(path)
        matrix = as_dense(adata.X)
        provenance = dict(adata.uns.get(UNS_KEY, {}))
        provenance.pop("source", None)
        provenance.pop("format", None)
        out = embeddings_to_anndata(matrix, adata.obs_names, str(path), "h5ad")
        out.uns[UNS_KEY].update(provenance)
        for column in adata.obs.columns:
            out.obs[column] = adata.obs[column].to_numpy()
        return out
    if kind in ("csv", "tsv"):
        try:
            frame = pd.read_csv(path, sep="," if kind == "csv" else "\t", index_col=0)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
            raise InputError(f"{path}: not a readable {kind.upper()} table ({error}).") from error
        if len(frame.columns) and _looks_like_data_row(
            frame.columns
        ):  # no header row: read it again
            frame = pd.read_csv(path, sep="," if kind == "csv" else "\t", index_col=0, header=None)
        frame.index = frame.index.astype(str)
        return _from_frame(frame, path, kind)
    if kind == "parquet":
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable parquet file ({error}).") from error
        if "gene" not in frame.columns and not pd.api.types.is_string_dtype(frame.index):
            first = frame.columns[0]
            if not pd.api.types.is_numeric_dtype(frame[first]):
                frame = frame.set_index(first)
        return _from_frame(frame, path, "parquet")
    with open(path, "rb") as handle:
        try:
            obj = pickle.load(handle)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as error:
            raise InputError(f"{path}: not a readable pickle ({error}).") from error
    return _from_pickle(obj, path)


def write_gene_embeddings(
    embeddings: ad.AnnData,
    path: str | os.PathLike,
    format: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an embedding AnnData atomically in the format of ``path`` (or ``format``).

    CSV/TSV/parquet hold the table (a ``gene`` column then ``dim_*`` columns), pickle a dict
    gene -> float32 vector; only h5ad keeps the provenance in ``uns``. Refuses to replace an
    existing file unless ``overwrite`` (:func:`stinfer.io.atomic.atomic_output`).
    """
    kind = embedding_format(path, format)
    matrix = as_dense(embeddings.X, np.float32)
    genes = [str(g) for g in embeddings.obs_names]
    with atomic_output(path, overwrite) as tmp:
        if kind == "h5ad":
            out = embeddings.copy()
            out.uns[UNS_KEY] = _h5ad_safe(dict(out.uns.get(UNS_KEY, {})))
            out.write_h5ad(tmp)
        elif kind in ("csv", "tsv", "parquet"):
            frame = pd.DataFrame(matrix, columns=[str(v) for v in embeddings.var_names])
            frame.insert(0, "gene", genes)
            if kind == "parquet":
                frame.to_parquet(tmp, index=False)
            else:
                compression = "gzip" if str(path).endswith(".gz") else None
                frame.to_csv(
                    tmp, sep="," if kind == "csv" else "\t", index=False, compression=compression
                )
        else:
            with open(tmp, "wb") as handle:
                pickle.dump(dict(zip(genes, matrix, strict=True)), handle, protocol=4)
    return Path(path)
