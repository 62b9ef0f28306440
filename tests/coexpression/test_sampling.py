"""Neighbour samplers: fanouts respected, uniform without replacement, PyG-compatible layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stinfer.coexpression.sampling import (
    CSCAdjacency,
    NeighborSampler,
    pyg_sampler_available,
    sample_neighbors,
)
from stinfer.errors import InputError


def _top_k_like_graph(n_nodes: int, k: int, seed: int) -> torch.Tensor:
    """Every node has exactly ``k`` distinct in-neighbours (like a top-K graph)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand((n_nodes, n_nodes), generator=generator)
    keys.fill_diagonal_(2.0)
    sources = torch.topk(keys, k, dim=1, largest=False).indices
    return torch.stack([sources.reshape(-1), torch.arange(n_nodes).repeat_interleave(k)])


def _skewed_graph() -> torch.Tensor:
    """Node 0 has 300 in-neighbours, the others 0-3: exercises the sort-based path."""
    hub = torch.stack([torch.arange(1, 301), torch.zeros(300, dtype=torch.int64)])
    rest = torch.stack([torch.arange(1, 200), torch.arange(2, 201)])
    return torch.cat([hub, rest], dim=1)


def _in_neighbours(edge_index: torch.Tensor, num_nodes: int) -> list[set[int]]:
    neighbours = [set() for _ in range(num_nodes)]
    for source, target in edge_index.t().tolist():
        neighbours[target].add(source)
    return neighbours


def _check_semantics(edge_index, num_nodes, seeds, fanouts, subgraph):
    neighbours = _in_neighbours(edge_index, num_nodes)
    node = subgraph.node.tolist()
    assert node[: len(seeds)] == seeds.tolist(), "seeds come first, in order"
    assert len(set(node)) == len(node), "every node once"
    assert sum(subgraph.num_sampled_nodes) == len(node)
    assert (
        subgraph.num_sampled_edges == [int(n) for n in torch.tensor(subgraph.num_sampled_edges)]
        and sum(subgraph.num_sampled_edges) == subgraph.row.numel()
    )
    # hop by hop: each node of hop h-1 draws min(degree, fanout) distinct true neighbours
    bounds = np.cumsum([0, *subgraph.num_sampled_nodes])
    edge_bounds = np.cumsum([0, *subgraph.num_sampled_edges])
    for hop, fanout in enumerate(fanouts):
        rows = subgraph.row[edge_bounds[hop] : edge_bounds[hop + 1]]
        cols = subgraph.col[edge_bounds[hop] : edge_bounds[hop + 1]]
        expanded = range(bounds[hop], bounds[hop + 1])
        assert set(cols.tolist()) <= set(expanded), "only nodes new in the previous hop expand"
        for local in expanded:
            drawn = [node[r] for r in rows[cols == local].tolist()]
            global_id = node[local]
            assert len(drawn) == len(set(drawn)), "without replacement"
            assert set(drawn) <= neighbours[global_id]
            assert len(drawn) == min(len(neighbours[global_id]), fanout)
        new_nodes = set(node[bounds[hop + 1] : bounds[hop + 2]])
        assert new_nodes == {node[r] for r in rows.tolist()} - set(node[: bounds[hop + 1]])


@pytest.mark.parametrize("graph", ["top_k", "skewed"])
def test_vectorised_sampler_respects_fanouts_without_replacement(graph):
    num_nodes = 60 if graph == "top_k" else 301
    edge_index = _top_k_like_graph(60, 12, seed=0) if graph == "top_k" else _skewed_graph()
    sampler = NeighborSampler(edge_index, num_nodes, (5, 3), backend="vectorised")
    seeds = torch.tensor([3, 0, 17, 8])
    torch.manual_seed(0)
    subgraph = sampler.sample(seeds)
    _check_semantics(edge_index, num_nodes, seeds, (5, 3), subgraph)


def test_fanout_larger_than_degree_or_minus_one_takes_every_neighbour():
    edge_index = _top_k_like_graph(30, 4, seed=1)
    adjacency = CSCAdjacency.from_edge_index(edge_index, 30)
    for fanouts in ((10,), (-1,)):
        subgraph = sample_neighbors(adjacency, torch.tensor([5]), fanouts)
        assert subgraph.num_sampled_edges == [4]


@pytest.mark.parametrize("graph", ["top_k", "skewed"])
def test_vectorised_sampler_draws_neighbours_uniformly(graph):
    num_nodes = 40 if graph == "top_k" else 301
    edge_index = _top_k_like_graph(40, 10, seed=2) if graph == "top_k" else _skewed_graph()
    seed_node = 7 if graph == "top_k" else 0
    adjacency = CSCAdjacency.from_edge_index(edge_index, num_nodes)
    generator = torch.Generator().manual_seed(0)
    degree = 10 if graph == "top_k" else 300
    fanout, draws = 3, 4000
    counts = torch.zeros(num_nodes)
    for _ in range(draws):
        subgraph = sample_neighbors(adjacency, torch.tensor([seed_node]), (fanout,), generator)
        counts[subgraph.node[subgraph.row]] += 1
    drawn = counts[counts > 0]
    assert drawn.numel() == degree
    expected = draws * fanout / degree
    chi_square = float(((drawn - expected) ** 2 / expected).sum())
    # chi-square with degree-1 dof: mean degree-1, sd sqrt(2(degree-1)); allow 5 sd
    assert chi_square < (degree - 1) + 5 * np.sqrt(2 * (degree - 1))


def test_pyg_backend_is_refused_with_a_fix_when_not_installed():
    if pyg_sampler_available():
        pytest.skip("pyg-lib or torch-sparse is installed")
    with pytest.raises(InputError, match="pyg-lib"):
        NeighborSampler(_top_k_like_graph(10, 2, 0), 10, (2,), backend="pyg")
    assert NeighborSampler(_top_k_like_graph(10, 2, 0), 10, (2,)).backend == "vectorised"


@pytest.mark.skipif(
    not pyg_sampler_available(),
    reason="PyG's NeighborSampler needs pyg-lib or torch-sparse, which PyPI does not carry for "
    "this platform (checked with `pip download pyg-lib`); the fallback's semantics are tested "
    "directly above",
)
def test_pyg_and_vectorised_samplers_agree_in_their_statistics():
    edge_index = _top_k_like_graph(80, 15, seed=3)
    seeds = torch.tensor([1, 9, 33, 50, 71])
    samplers = {
        backend: NeighborSampler(edge_index, 80, (6, 4), backend=backend)
        for backend in ("pyg", "vectorised")
    }
    _check_semantics(edge_index, 80, seeds, (6, 4), samplers["pyg"].sample(seeds))
    statistics = {}
    for backend, sampler in samplers.items():
        torch.manual_seed(0)
        sizes, frequency = [], torch.zeros(80)
        for _ in range(300):
            subgraph = sampler.sample(seeds)
            sizes.append(subgraph.num_sampled_nodes)
            frequency[subgraph.node] += 1
        statistics[backend] = (np.mean(sizes, axis=0), frequency / 300)
    np.testing.assert_allclose(statistics["pyg"][0], statistics["vectorised"][0], rtol=0.05)
    assert float((statistics["pyg"][1] - statistics["vectorised"][1]).abs().max()) < 0.15
