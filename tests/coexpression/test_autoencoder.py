"""Transformer autoencoder: tokenisation, a true bottleneck, training lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stinfer.coexpression.autoencoder import (
    AutoencoderConfig,
    CoexpressionAutoencoder,
    encode_rows,
    train_autoencoder,
)
from stinfer.errors import InputError
from stinfer.train import TrainerConfig

SMALL = AutoencoderConfig(
    n_tokens=5, d_model=16, n_heads=4, feedforward_dim=32, latent_dim=8, dropout=0.0
)


def test_vectors_are_cut_into_zero_padded_tokens():
    module = CoexpressionAutoencoder(23, SMALL)
    assert (module.n_tokens, module.token_length) == (5, 5)
    vectors = torch.arange(46, dtype=torch.float32).view(2, 23)
    tokens = module.tokens(vectors)
    assert tokens.shape == (2, 5, 5)
    assert torch.equal(tokens.flatten(1)[:, :23], vectors)
    assert torch.all(tokens.flatten(1)[:, 23:] == 0)


def test_paper_architecture_layers_and_shapes():
    config = AutoencoderConfig()
    assert (config.n_heads, config.feedforward_dim, config.latent_dim) == (8, 2048, 512)
    module = CoexpressionAutoencoder(300, replace_small(config))
    assert len(module.encoder.layers) == 2 and len(module.decoder.layers) == 2
    layer = module.encoder.layers[0]
    assert layer.self_attn.num_heads == 8 and layer.linear1.out_features == 2048
    reconstruction, latent = module(torch.randn(3, 300))
    assert reconstruction.shape == (3, 300) and latent.shape == (3, 512)


def replace_small(config: AutoencoderConfig) -> AutoencoderConfig:
    from dataclasses import replace

    return replace(config, n_tokens=4, d_model=64)


def test_decoder_sees_the_gene_only_through_the_latent():
    module = CoexpressionAutoencoder(40, SMALL).eval()
    latent = torch.randn(2, 8)
    with torch.no_grad():
        first = module.decode(latent)
        second = module.decode(latent.clone())
    assert torch.equal(first, second)


def test_training_lowers_reconstruction_error_and_embeds_every_row():
    rng = np.random.default_rng(0)
    rows = sp.random(64, 50, density=0.1, random_state=0, format="csr", dtype=np.float32)
    rows.data = rng.uniform(0.3, 1.0, rows.nnz).astype(np.float32)
    config = AutoencoderConfig(
        n_tokens=5,
        d_model=16,
        n_heads=4,
        feedforward_dim=32,
        latent_dim=8,
        max_epochs=25,
        t_max=25,
        learning_rate=3e-3,
        batch_size=16,
    )
    untrained = CoexpressionAutoencoder(50, config)
    _, before = encode_rows(untrained, rows)
    result, module = train_autoencoder(
        rows, config, TrainerConfig(accelerator="cpu", progress_bar=False)
    )
    assert result.embeddings.shape == (64, 8) and result.embeddings.dtype == np.float32
    assert result.final_mse < before["mse"]
    assert len(result.history) == 25
    again, _ = encode_rows(module, rows)
    np.testing.assert_allclose(again, result.embeddings, atol=1e-5)


def test_config_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(InputError, match="multiple"):
        AutoencoderConfig(d_model=30, n_heads=8)


def test_geometry_loss_compares_cosines_of_latents_and_rows():
    from stinfer.coexpression.autoencoder import geometry_loss

    rows = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert float(geometry_loss(rows * 3.0, rows)) == pytest.approx(0.0, abs=1e-7)
    latent = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # one shared direction
    # row cosines off the diagonal: (1/sqrt2, 0, 0) twice; the latents' are all 1
    expected = 2 * ((1 - 2**-0.5) ** 2 + 1 + 1) / 6
    assert float(geometry_loss(latent, rows)) == pytest.approx(expected, rel=1e-6)
    # with the batch's genes, the target is their co-expression: rows[a, index[b]]
    coexpression = torch.tensor([[0.0, 0.5, 0.0, 0.2], [0.5, 0.0, 0.1, 0.0], [0.0, 0.1, 0.0, 0.3]])
    index = torch.tensor([0, 1, 2])
    expected = 2 * ((1 - 0.5) ** 2 + 1 + (1 - 0.1) ** 2) / 6
    assert float(geometry_loss(latent, coexpression, index)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(InputError, match="geometry_weight"):
        AutoencoderConfig(geometry_weight=-1.0)
    with pytest.raises(InputError, match="geometry_target"):
        AutoencoderConfig(geometry_target="distances")
