"""STEvs ablations from one list: paper variants by name, explicit overrides, loud typos."""

from __future__ import annotations

import pytest

from stinfer.errors import InputError
from stinfer.evaluate.ablations import (
    PAPER_VARIANTS,
    ablation_configs,
    deep_merge,
    stevs_variant_config,
)
from stinfer.models.stevs import fast_preset


def test_a_variant_equal_to_the_base_is_flagged(caplog):
    with caplog.at_level("WARNING", logger="stinfer"):
        configs = ablation_configs(["mlp w/ fourier", "mlp"], base="fast")
    assert configs["mlp"].module.coord_encoder == "mlp"
    assert configs["mlp w/ fourier"].to_dict() == configs["full"].to_dict()
    assert "'mlp w/ fourier' changes nothing" in caplog.text
    assert "'mlp' changes" not in caplog.text


def test_each_paper_variant_changes_only_its_own_fields():
    base = fast_preset().to_dict()
    configs = ablation_configs(list(PAPER_VARIANTS), base="fast")
    assert list(configs) == ["full", *PAPER_VARIANTS]
    assert configs["full"].to_dict() == base
    for name, overrides in PAPER_VARIANTS.items():
        changed = configs[name].to_dict()
        expected = deep_merge(base, overrides)
        assert changed == expected, name
    assert configs["w/o image decoder"].module.image_decoder is False
    assert configs["w/o spatial encoder"].module.coord_encoder == "none"
    assert configs["w/o alignment loss"].module.alignment is False
    assert configs["cross-attention"].module.fusion == "cross_attention"
    assert configs["mlp w/ fourier"].module.coord_encoder == "fourier"


def test_explicit_variants_merge_nested_overrides_and_the_epochs_shorthand():
    configs = ablation_configs(
        [
            {
                "name": "fourier 16",
                "module": {"coord_encoder": "fourier", "fourier_num_frequencies": 16},
            },
            {"name": "no tta", "training": {"test_time_augmentation": False}},
        ],
        base="fast",
        common={"epochs": 3},
        include_base=False,
    )
    assert list(configs) == ["fourier 16", "no tta"]
    assert configs["fourier 16"].module.fourier_num_frequencies == 16
    assert configs["no tta"].training.test_time_augmentation is False
    for config in configs.values():
        assert config.trainer.max_epochs == 3
    assert fast_preset().training.test_time_augmentation is True  # the preset is untouched


def test_a_misspelt_field_names_its_path():
    with pytest.raises(InputError, match=r"module\.fusoin"):
        stevs_variant_config("fast", {"module": {"fusoin": "concat"}})
    with pytest.raises(InputError, match="fusion"):
        stevs_variant_config("fast", {"module": {"fusion": "sum"}})


def test_unknown_and_duplicate_variants_are_input_errors():
    with pytest.raises(InputError, match="unknown ablation"):
        ablation_configs(["w/o everything"])
    with pytest.raises(InputError, match="two ablation variants"):
        ablation_configs(["concat", {"name": "concat"}])
    with pytest.raises(InputError, match="needs a name"):
        ablation_configs([{"module": {"fusion": "mean"}}])
