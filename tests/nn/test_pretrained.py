"""Loading local pretrained weights by name and shape (no downloads)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from stinfer.errors import InputError
from stinfer.nn.encoders import ImageEncoder, create_backbone
from stinfer.nn.pretrained import load_matching_weights, timm_checkpoint_filter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY_SWIN = {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}


def _source_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        k: v.clone() for k, v in create_backbone("test_convnext", img_size=32).state_dict().items()
    }


def test_safetensors_weights_with_module_prefix_load_and_mismatches_are_reported(tmp_path, caplog):
    weights = _source_weights()
    names = sorted(weights)
    mismatched = next(n for n in names if n.endswith(".weight") and weights[n].dim() > 1)
    file_weights = {f"module.{k}": v for k, v in weights.items()}
    file_weights[f"module.{mismatched}"] = torch.zeros(3, 3)
    file_weights["module.head.fc.weight"] = torch.zeros(10, 64)  # a classifier the model lacks
    path = tmp_path / "weights.safetensors"
    save_file(file_weights, str(path))

    torch.manual_seed(1)
    target = create_backbone("test_convnext", img_size=32)
    before = target.state_dict()[mismatched].clone()
    with caplog.at_level(logging.INFO, logger="stinfer.nn.pretrained"):
        report = load_matching_weights(target, path)

    assert report.num_loaded == len(weights) - 1
    assert report.num_skipped == 2
    assert [name for name, _, _ in report.skipped_shape] == [mismatched]
    assert report.unexpected == ["head.fc.weight"]
    assert report.missing == [mismatched]
    loaded = target.state_dict()
    for name in report.loaded:
        torch.testing.assert_close(loaded[name], weights[name])
    torch.testing.assert_close(loaded[mismatched], before)
    assert f"loaded {len(weights) - 1} tensors, skipped 2" in caplog.text


def test_pth_checkpoint_wrapped_in_state_dict_with_backbone_prefix_loads(tmp_path):
    weights = _source_weights()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"backbone.{k}": v for k, v in weights.items()}}, path)

    encoder = ImageEncoder("test_convnext", latent_dim=4, img_size=32, pretrained=path)
    assert encoder.load_report is not None
    assert encoder.load_report.num_loaded == len(weights)
    assert encoder.load_report.num_skipped == 0
    for name, tensor in encoder.backbone.state_dict().items():
        torch.testing.assert_close(tensor, weights[name])


def test_swin_window7_weights_load_into_the_window5_160px_encoder_through_timm_filter(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("swin_tiny_patch4_window7_224", img_size=224, **TINY_SWIN)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    target = create_backbone("swin_tiny_patch4_window7_224", img_size=160, **TINY_SWIN)
    tables = [k for k in target.state_dict() if k.endswith("relative_position_bias_table")]
    assert tables and target.state_dict()[tables[0]].shape[0] == 9 * 9  # window 5
    report = load_matching_weights(target, path, transform=timm_checkpoint_filter(target))
    assert report.skipped_shape == []
    assert set(tables) <= set(report.loaded)

    plain = create_backbone("swin_tiny_patch4_window7_224", img_size=160, **TINY_SWIN)
    assert {n for n, _, _ in load_matching_weights(plain, path).skipped_shape} == set(tables)


def test_unusable_files_are_input_errors(tmp_path):
    target = create_backbone("test_convnext", img_size=32)
    with pytest.raises(InputError, match="not found"):
        load_matching_weights(target, tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"swin.encoder.layers.0.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(InputError, match="no tensor"):
        load_matching_weights(target, foreign)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    with pytest.raises(InputError, match="unknown weights format"):
        load_matching_weights(target, odd)
