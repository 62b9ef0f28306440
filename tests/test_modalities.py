"""The one modality vocabulary: canonical names pass, older names map, others are refused."""

from __future__ import annotations

import pytest

from stinfer.errors import InputError
from stinfer.modalities import MODALITIES, canonical_modality


def test_canonical_names_pass_unchanged():
    assert [canonical_modality(name) for name in MODALITIES] == ["fused", "image", "spatial"]


def test_older_coxformer_names_are_aliases():
    assert canonical_modality("both") == "fused"
    assert canonical_modality("location") == "spatial"


def test_unknown_names_are_an_input_error_that_lists_the_choices():
    with pytest.raises(InputError, match=r"mode must be one of fused, image, spatial.*both"):
        canonical_modality("sound", "mode")
    with pytest.raises(InputError, match="modality must be one of"):
        canonical_modality("Fused")
