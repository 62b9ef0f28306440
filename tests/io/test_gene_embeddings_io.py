"""Embedding tables round-trip through every format and come back as the same AnnData."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stinfer.errors import InputError
from stinfer.io.gene_embeddings import (
    embeddings_to_anndata,
    read_gene_embeddings,
    write_gene_embeddings,
)


@pytest.fixture
def embeddings():
    vectors = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    genes = ["ERBB2", "GRB7", "TP53", "MKI67", "ESR1", "PGR", "KRT5"]
    return embeddings_to_anndata(
        vectors, genes, source="test", provenance={"top_k": 50, "r2": None}
    )


@pytest.mark.parametrize(
    "name", ["genes.h5ad", "genes.csv", "genes.tsv", "genes.csv.gz", "genes.parquet", "genes.pkl"]
)
def test_every_format_round_trips_to_the_same_anndata(embeddings, tmp_path, name):
    path = write_gene_embeddings(embeddings, tmp_path / name)
    back = read_gene_embeddings(path, allow_pickle=name.endswith(".pkl"))
    assert list(back.obs_names) == list(embeddings.obs_names)
    assert back.X.dtype == np.float32
    np.testing.assert_array_equal(back.X, embeddings.X)
    assert back.uns["gene_embeddings"]["source"] == str(path)
    if name.endswith(".h5ad"):
        assert back.uns["gene_embeddings"]["top_k"] == 50
        assert back.uns["gene_embeddings"]["r2"] == ""


def test_external_tables_in_their_native_layouts(embeddings, tmp_path):
    genes, vectors = list(embeddings.obs_names), embeddings.X
    # GenePT: a pickled dict gene -> list of floats
    with open(tmp_path / "genept.pickle", "wb") as handle:
        pickle.dump({g: list(map(float, v)) for g, v in zip(genes, vectors, strict=True)}, handle)
    # pandas default CSV (header 0..d-1), a headerless CSV, a DataFrame pickle, a list column
    frame = pd.DataFrame(vectors, index=genes)
    frame.to_csv(tmp_path / "pandas.csv")
    frame.to_csv(tmp_path / "headerless.csv", header=False)
    frame.to_pickle(tmp_path / "frame.pkl")
    pd.DataFrame({"gene": genes, "embedding": list(vectors.astype(np.float64))}).to_parquet(
        tmp_path / "lists.parquet"
    )
    for name in ("genept.pickle", "pandas.csv", "headerless.csv", "frame.pkl", "lists.parquet"):
        back = read_gene_embeddings(tmp_path / name, allow_pickle=True)
        assert list(back.obs_names) == genes, name
        np.testing.assert_allclose(back.X, vectors, rtol=1e-6, err_msg=name)


def test_bad_tables_raise_input_errors_that_name_the_file(tmp_path):
    (tmp_path / "dup.csv").write_text("gene,a,b\nX,1,2\nX,3,4\n")
    (tmp_path / "text.csv").write_text("gene,a,b\nX,1,oops\nY,3,4\n")
    (tmp_path / "nan.csv").write_text("gene,a,b\nX,1,\nY,3,4\n")
    with open(tmp_path / "ragged.pkl", "wb") as handle:
        pickle.dump({"X": [1.0, 2.0], "Y": [1.0]}, handle)
    with open(tmp_path / "list.pkl", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    for name, message in [
        ("dup.csv", "more than one vector"),
        ("text.csv", "non-numeric"),
        ("nan.csv", "NaN"),
        ("ragged.pkl", "different lengths"),
        ("list.pkl", "dict gene -> vector"),
    ]:
        with pytest.raises(InputError, match=message) as error:
            read_gene_embeddings(tmp_path / name, allow_pickle=True)
        assert name in str(error.value)
    with pytest.raises(InputError, match="suffix"):
        read_gene_embeddings(tmp_path / "table.xlsx")
    with pytest.raises(FileNotFoundError):
        read_gene_embeddings(tmp_path / "missing.h5ad")


class _Payload:
    """Unpickling this writes a marker file: what a crafted pickle's code would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


@pytest.mark.parametrize("suffix", [".pkl", ".pickle"])
def test_a_pickle_is_refused_unless_allowed_and_its_payload_never_runs(tmp_path, suffix):
    from stinfer.cli import main

    marker = tmp_path / "payload_ran.txt"
    path = tmp_path / f"crafted{suffix}"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(InputError, match="--allow-pickle"):
        read_gene_embeddings(path)
    labels = tmp_path / "labels.csv"
    labels.write_text("gene,label\nA,1\n")
    status = main(
        [
            "gene-eval",
            "--embeddings",
            str(path),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert status == 2
    slide = tmp_path / "slide.h5ad"
    slide.write_bytes(b"")
    status = main(
        [
            "impute",
            "--slide",
            str(slide),
            "--embeddings",
            str(path),
            "--genes",
            "A",
            "--out",
            str(tmp_path / "o.h5ad"),
        ]
    )
    assert status == 2
    assert not marker.exists(), "a refused pickle must not be unpickled"
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "o.h5ad").exists()
    # opted in, the file is read (and here its payload runs: the flag's help says so)
    with pytest.raises(InputError):
        read_gene_embeddings(path, allow_pickle=True)
    assert marker.exists()


def test_writing_refuses_to_overwrite_unless_asked(embeddings, tmp_path):
    path = write_gene_embeddings(embeddings, tmp_path / "genes.parquet")
    with pytest.raises(InputError, match="already exists"):
        write_gene_embeddings(embeddings, path)
    write_gene_embeddings(embeddings, path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["genes.parquet"], "no temporary file left"
