"""SpotDataset / PatchSource: batches read from the on-disk patch cache equal in-memory ones."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stinfer.data.spot_dataset import PatchSource, SlideSpots, SpotDataset
from stinfer.errors import InputError


def cached(array: np.ndarray, path) -> np.ndarray:
    np.save(path, array)
    return np.load(path, mmap_mode="r")


@pytest.fixture
def two_slides(tmp_path):
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8) for n in (7, 5)]
    counts = [
        sp.random(n, 4, density=0.5, random_state=k, format="csr") * 10 for k, n in ((0, 7), (1, 5))
    ]
    coords = [torch.from_numpy(rng.normal(size=(n, 2)).astype(np.float32)) for n in (7, 5)]
    return patches, counts, coords


def test_patch_source_reads_from_the_cache_file_the_same_rows_as_from_memory(tmp_path):
    patches = np.random.default_rng(1).integers(0, 256, (20, 3, 6, 6), dtype=np.uint8)
    on_disk = PatchSource(cached(patches, tmp_path / "p.npy"))
    in_memory = PatchSource(patches)
    assert on_disk.on_disk and not in_memory.on_disk
    rows = np.array([13, 2, 2, 19, 0, 7])  # unsorted, repeated
    np.testing.assert_array_equal(on_disk.read(rows), patches[rows])
    np.testing.assert_array_equal(in_memory.read(rows), patches[rows])
    chunks = list(on_disk.iter_chunks(8))
    assert [rows for rows, _ in chunks] == [slice(0, 8), slice(8, 16), slice(16, 20)]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), patches)
    with pytest.raises(InputError, match="uint8"):
        PatchSource(patches.astype(np.float32))


def test_batches_gather_each_spot_from_its_own_slide_in_the_requested_order(two_slides, tmp_path):
    patches, counts, coords = two_slides
    slides = [
        SlideSpots(coords[k], counts[k], PatchSource(cached(patches[k], tmp_path / f"{k}.npy")))
        for k in range(2)
    ]
    dataset = SpotDataset(slides, with_targets=True)
    assert len(dataset) == 12
    indices = [11, 0, 8, 3, 7]  # slide 1 row 4, slide 0 row 0, slide 1 row 1, ...
    inputs, batch_coords, batch_counts, targets, slide_ids = dataset.__getitems__(indices)
    expected = [(1, 4), (0, 0), (1, 1), (0, 3), (1, 0)]
    np.testing.assert_array_equal(slide_ids.numpy(), [s for s, _ in expected])
    for position, (slide, row) in enumerate(expected):
        np.testing.assert_array_equal(inputs[position].numpy(), patches[slide][row])
        torch.testing.assert_close(batch_coords[position], coords[slide][row])
        np.testing.assert_allclose(batch_counts[position].numpy(), counts[slide][row].toarray()[0])
    assert targets is inputs  # the image target is the very same patch tensor
    item = dataset[8]
    np.testing.assert_array_equal(item[0].numpy(), patches[1][1])


def test_cached_features_replace_patches_as_inputs_but_targets_stay_patches(two_slides):
    patches, counts, coords = two_slides
    features = [torch.randn(len(c), 5) for c in coords]
    slides = [
        SlideSpots(coords[k], counts[k], PatchSource(patches[k]), features[k]) for k in range(2)
    ]
    inputs, _, _, targets, _ = SpotDataset(slides, with_targets=True).__getitems__([1, 9])
    torch.testing.assert_close(inputs, torch.stack([features[0][1], features[1][2]]))
    np.testing.assert_array_equal(targets.numpy(), np.stack([patches[0][1], patches[1][2]]))
    no_targets = SpotDataset(slides, with_targets=False).__getitems__([1, 9])
    assert no_targets[3].shape == (2, 0)


def test_count_totals_equal_the_dense_sums(two_slides):
    _, counts, coords = two_slides
    dataset = SpotDataset([SlideSpots(coords[k], counts[k]) for k in range(2)])
    genes, spots = dataset.count_totals()
    dense = np.concatenate([c.toarray() for c in counts])
    np.testing.assert_allclose(genes.numpy(), dense.sum(0))
    np.testing.assert_allclose(spots.numpy(), dense.sum(1))


def test_slide_parts_must_agree_on_the_number_of_spots(two_slides):
    _, counts, coords = two_slides
    with pytest.raises(InputError, match="counts has 5 rows but the slide 7 spots"):
        SlideSpots(coords[0], counts[1])
