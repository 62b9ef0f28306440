"""Training spots of many slides as one torch dataset, with patches read per batch.

:class:`SpotDataset` is what every STEvs training and validation batch comes from. It holds,
per slide, only what is small (coordinates, the sparse counts of the model's genes, cached
backbone features when the encoder is frozen) and a :class:`PatchSource` for the large part:
the uint8 spot patches. A source backed by the on-disk patch cache
(:func:`stinfer.data.patches.spot_patches` with ``cache_dir``) maps the ``.npy`` file only
while a batch is read and unmaps it at once, so the process never holds more than a batch of
patch pages however many slides it trains on; its peak memory does not grow with the number
of training slides. An in-memory source (a small slide, or patches handed in) is indexed
directly. Both give the same bytes, so training is identical either way.

Batches are fetched whole through ``__getitems__`` (the batched-fetch protocol of
``torch.utils.data.DataLoader``): the batch's spots are grouped by slide and each slide's rows
are read with one sorted fancy index, not one read per spot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset

from stinfer.errors import InputError


class PatchSource:
    """The uint8 spot patches ``(N, C, H, W)`` of one slide, read by rows.

    Parameters
    ----------
    patches
        An in-memory array, or a ``numpy.memmap`` of a ``.npy`` patch cache: its file is then
        re-mapped for every read and unmapped after it (see the module docstring).
    """

    def __init__(self, patches: np.ndarray) -> None:
        if patches.ndim != 4 or patches.dtype != np.uint8:
            raise InputError(
                f"spot patches must be uint8 (N, C, H, W); got {patches.dtype} {patches.shape}"
            )
        self.shape: tuple[int, ...] = tuple(patches.shape)
        self._path: Path | None = None
        self._offset = 0
        self._array: np.ndarray | None = patches
        if isinstance(patches, np.memmap) and patches.filename is not None:
            self._path = Path(patches.filename)
            self._offset = int(patches.offset)
            self._array = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def on_disk(self) -> bool:
        """True when reads map the cache file rather than index an array in memory."""
        return self._path is not None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """A copy of the patches at ``rows`` (int array, any order), ``(len(rows), C, H, W)``."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._array is not None:
            return self._array[rows]
        mapped = np.memmap(
            self._path, dtype=np.uint8, mode="r", offset=self._offset, shape=self.shape
        )
        try:
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
            out[order] = mapped[rows[order]]  # sorted rows: sequential reads of the file
            return out
        finally:
            del mapped

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """``(rows, patches)`` for consecutive row ranges of ``chunk_size``."""
        for start in range(0, len(self), chunk_size):
            rows = slice(start, min(start + chunk_size, len(self)))
            yield rows, self._read_range(rows)

    def _read_range(self, rows: slice) -> np.ndarray:
        """A copy of the consecutive patches ``rows``: one slice, no index sort."""
        if self._array is not None:
            return np.array(self._array[rows])
        mapped = np.memmap(
            self._path, dtype=np.uint8, mode="r", offset=self._offset, shape=self.shape
        )
        try:
            return np.array(mapped[rows])
        finally:
            del mapped


@dataclass
class SlideSpots:
    """One slide's part of a :class:`SpotDataset`.

    Attributes
    ----------
    coords
        ``(N, 2)`` float32 normalised coordinates.
    counts
        ``(N, M)`` CSR counts of the model's genes, or ``None`` (unlabelled slide).
    patches
        The slide's uint8 patches, or ``None`` when the model needs neither patches nor targets.
    features
        ``(N, F)`` cached backbone features (frozen encoder), or ``None``.
    """

    coords: torch.Tensor
    counts: sp.csr_matrix | None = None
    patches: PatchSource | None = None
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n_spots = len(self.coords)
        for name in ("counts", "patches", "features"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n_spots:
                raise InputError(f"{name} has {value.shape[0]} rows but the slide {n_spots} spots")


class SpotDataset(Dataset):
    """Spots of several slides; item ``i`` is ``(inputs, coords, counts, targets, slide)``.

    ``inputs`` are cached features when the slides have them, else uint8 patches;
    ``targets`` are uint8 patches when ``with_targets`` (the image decoder's reconstruction
    target; the very tensor ``inputs`` is when the inputs are patches), else an empty ``(0,)``
    tensor per spot; ``counts`` are float32 (empty without
    counts); ``slide`` is the slide's index (to apply its colour normalisation).
    """

    def __init__(self, slides: Sequence[SlideSpots], with_targets: bool = False) -> None:
        if not slides:
            raise InputError("SpotDataset needs at least one slide")
        self.slides = list(slides)
        self.with_targets = with_targets
        sizes = np.array([len(slide.coords) for slide in self.slides])
        self.slide_of_spot = np.repeat(np.arange(len(sizes)), sizes)
        self.row_of_spot = np.concatenate([np.arange(size) for size in sizes])
        self.num_genes = next((s.counts.shape[1] for s in self.slides if s.counts is not None), 0)

    def __len__(self) -> int:
        return len(self.slide_of_spot)

    def count_totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-gene totals ``(M,)`` and per-spot totals ``(N,)`` of the counts (float64)."""
        labelled = [s.counts for s in self.slides if s.counts is not None]
        if not labelled:
            raise InputError("the dataset has no counts")
        genes = sum(np.asarray(c.sum(0), dtype=np.float64).ravel() for c in labelled)
        spots = np.concatenate([np.asarray(c.sum(1), dtype=np.float64).ravel() for c in labelled])
        return torch.from_numpy(genes), torch.from_numpy(spots)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return [tensor[0] for tensor in self.__getitems__([index])]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The batch at ``indices`` as stacked tensors (DataLoader's batched fetch)."""
        indices = np.asarray(indices, dtype=np.int64)
        slide_ids = self.slide_of_spot[indices]
        rows = self.row_of_spot[indices]
        parts: dict[str, list] = {"inputs": [], "coords": [], "counts": [], "targets": []}
        positions = []
        for slide_id in np.unique(slide_ids):
            members = np.flatnonzero(slide_ids == slide_id)
            positions.append(members)
            slide, slide_rows = self.slides[slide_id], rows[members]
            parts["coords"].append(slide.coords[slide_rows])
            if slide.counts is not None:
                parts["counts"].append(torch.from_numpy(_dense_rows(slide.counts, slide_rows)))
            else:
                parts["counts"].append(torch.zeros((len(members), self.num_genes)))
            patches = None
            if slide.patches is not None and (slide.features is None or self.with_targets):
                patches = torch.from_numpy(slide.patches.read(slide_rows))
            parts["inputs"].append(
                slide.features[slide_rows] if slide.features is not None else patches
            )
            parts["targets"].append(patches if self.with_targets else torch.zeros(len(members), 0))
        order = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
        inputs = torch.cat(parts["inputs"])[order]
        targets = torch.cat(parts["targets"])[order]
        if self.with_targets and all(s.features is None for s in self.slides):
            targets = inputs  # the same patches: one tensor, prepared once by the task
        batch = [inputs, torch.cat(parts["coords"])[order], torch.cat(parts["counts"])[order]]
        batch += [targets, torch.from_numpy(slide_ids)]
        return batch


def _dense_rows(counts: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Float32 dense copy of the CSR rows ``rows``."""
    return counts[rows].toarray().astype(np.float32, copy=False)


def stacked_batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """DataLoader ``collate_fn`` for :class:`SpotDataset`: its batches come stacked already."""
    return batch
