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
        lr=3e-3,
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


def test_partner_batches_cover_every_gene_once_and_pair_it_with_a_partner():
    from stinfer.coexpression.autoencoder import PartnerBatchSampler

    n_genes = 50
    gene = np.repeat(np.arange(n_genes), 3)
    partner = (gene + np.tile([1, 2, 3], n_genes)) % n_genes  # partners: the next three genes
    partner[gene == 7] = 7  # gene 7's only stored entries point at itself (no partner used)
    adjacency = sp.csr_matrix((np.ones(gene.size), (gene, partner)), shape=(n_genes, n_genes))
    sampler = PartnerBatchSampler(adjacency, batch_size=10, partner_fraction=0.4, seed=3)
    assert (sampler.n_anchors, sampler.n_partners) == (6, 4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9  # ceil(50 / 6)
    n_anchors = [6] * 8 + [2]  # the last batch holds the two genes left
    anchors = np.concatenate([batch[:n] for batch, n in zip(batches, n_anchors, strict=True)])
    assert sorted(anchors.tolist()) == list(range(n_genes))  # every gene an anchor once
    for batch, n in zip(batches, n_anchors, strict=True):
        assert len(batch) == len(set(batch)) <= 10
        # every drawn gene is a stored partner of one of the batch's first four anchors
        for g in batch[n:]:
            assert any(adjacency[a, g] for a in batch[: min(n, 4)])
    # the next epoch is a new permutation; the same seed gives the same sequence
    assert [b[:6] for b in sampler] != [b[:6] for b in batches]
    again = PartnerBatchSampler(adjacency, batch_size=10, partner_fraction=0.4, seed=3)
    assert list(again) == batches
    with pytest.raises(InputError, match="partner_fraction"):
        AutoencoderConfig(partner_fraction=1.0)


def test_partner_batches_need_partners_for_dense_rows():
    rows = np.eye(12, dtype=np.float32)
    config = AutoencoderConfig(
        n_tokens=3,
        d_model=8,
        n_heads=2,
        feedforward_dim=8,
        latent_dim=4,
        max_epochs=1,
        partner_fraction=0.5,
    )
    trainer = TrainerConfig(accelerator="cpu", progress_bar=False)
    with pytest.raises(InputError, match="partners"):
        train_autoencoder(rows, config, trainer)
    with pytest.raises(InputError, match="shape"):
        train_autoencoder(rows, config, trainer, partners=sp.eye(5, format="csr"))
    result, _ = train_autoencoder(rows, config, trainer, partners=sp.eye(12, k=1, format="csr"))
    assert result.embeddings.shape == (12, 4)


def test_the_low_rank_geometry_target_is_the_truncated_svd_of_the_input_rows():
    """``geometry_target="low_rank"``: the target of genes a, b is entry [a, b] of the input
    matrix's rank-r approximation (numpy's SVD as the reference); the loss the mean squared
    cosine error over the batch's pairs."""
    from stinfer.coexpression.autoencoder import (
        AutoencoderConfig,
        AutoencoderTask,
        CoexpressionAutoencoder,
        low_rank_factors,
    )

    rng = np.random.default_rng(0)
    programs = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 30))
    matrix = np.corrcoef(programs + 0.5 * rng.normal(size=(200, 30)), rowvar=False)
    u, s, vt = np.linalg.svd(matrix)
    reference = (u[:, :4] * s[:4]) @ vt[:4]
    left, right = low_rank_factors(matrix.astype(np.float32), 4)
    np.testing.assert_allclose((left @ right.T).numpy(), reference, atol=1e-4)

    config = AutoencoderConfig(
        n_tokens=2,
        d_model=8,
        n_heads=2,
        feedforward_dim=16,
        latent_dim=4,
        geometry_weight=1.0,
        geometry_target="low_rank",
        geometry_rank=4,
    )
    task = AutoencoderTask(CoexpressionAutoencoder(30, config), config, (left, right))
    latent, index = torch.randn(3, 4), torch.tensor([7, 0, 21])
    unit = torch.nn.functional.normalize(latent, dim=1)
    target = torch.as_tensor(reference[np.ix_([7, 0, 21], [7, 0, 21])], dtype=torch.float32)
    expected = ((unit @ unit.T - target)[~torch.eye(3, dtype=torch.bool)] ** 2).mean()
    torch.testing.assert_close(
        task._geometry(latent, torch.zeros(3, 30), index), expected, atol=1e-4, rtol=1e-4
    )
