"""Fuzzing the readers: any file content either reads or raises InputError, never a traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stinfer.errors import InputError
from stinfer.io import read_h5ad_slide, read_legacy_st, read_visium

from .test_bad_inputs import small_anndata, write_legacy, write_visium

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

cell_values = st.one_of(
    st.integers(-5, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "NA", "low", "1x1", "x", "-", " 3 ", "nan"]),
    st.text(max_size=6),
)
column_names = st.one_of(
    st.sampled_from(
        (
            *("x", "y", "pixel_x", "pixel_y", "selected", "barcode", "in_tissue"),
            *("array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres", "GENE1", ""),
        )
    ),
    st.text(max_size=8),
)


@st.composite
def text_tables(draw: st.DrawFn) -> pd.DataFrame:
    """Small tables with random column names and values (numbers, NaN, text, empty)."""
    columns = draw(st.lists(column_names, min_size=1, max_size=6))
    rows = draw(st.integers(0, 5))
    return pd.DataFrame({name: [draw(cell_values) for _ in range(rows)] for name in columns})


def reads_or_refuses(read, *args) -> None:
    """Call a reader: success or InputError are fine; any other exception fails the test."""
    try:
        read(*args)
    except InputError:
        pass


def as_text(table: pd.DataFrame, sep: str) -> bytes:
    return table.to_csv(sep=sep, index=False).encode("utf-8", "surrogatepass")


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), text_tables().map(lambda t: as_text(t, "\t"))))
def test_legacy_count_table_fuzz(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        counts_path, spots_path = write_legacy(Path(folder))
        counts_path.write_bytes(data)
        reads_or_refuses(read_legacy_st, counts_path, spots_path)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), text_tables().map(lambda t: as_text(t, "\t"))))
def test_legacy_spot_table_fuzz(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        counts_path, spots_path = write_legacy(Path(folder))
        spots_path.write_bytes(data)
        reads_or_refuses(read_legacy_st, counts_path, spots_path)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), text_tables().map(lambda t: as_text(t, ","))))
def test_visium_positions_fuzz(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        outs = write_visium(Path(folder) / "outs")
        (outs / "spatial/tissue_positions.csv").write_bytes(data)
        reads_or_refuses(read_visium, outs)


@FUZZ
@given(
    cut=st.floats(0.0, 1.0),
    noise=st.binary(max_size=64),
    offset=st.floats(0.0, 1.0),
)
def test_h5ad_bytes_fuzz(cut: float, noise: bytes, offset: float) -> None:
    """A valid .h5ad cut short and/or overwritten in one place."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.h5ad"
        small_anndata().write_h5ad(path)
        data = bytearray(path.read_bytes())
        data = data[: int(len(data) * cut) or len(data)]
        start = int(len(data) * offset)
        data[start : start + len(noise)] = noise
        path.write_bytes(bytes(data))
        reads_or_refuses(read_h5ad_slide, path)


def test_fuzz_baseline_reads() -> None:
    """The unfuzzed files read, so the fuzz tests exercise the readers past their first check."""
    with tempfile.TemporaryDirectory() as folder:
        assert read_legacy_st(*write_legacy(Path(folder) / "l")).shape == (3, 2)
        assert read_visium(write_visium(Path(folder) / "v")).n_obs == 6
        small_anndata().write_h5ad(Path(folder) / "s.h5ad")
        assert np.isfinite(read_h5ad_slide(Path(folder) / "s.h5ad").obsm["spatial"]).all()
