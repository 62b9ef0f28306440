"""Neighbour sampling around seed nodes: 2-hop computation subgraphs (CoxFormer Suppl. S1).

For each mini-batch of target edges the seeds are the union of the edge endpoints, and a
``len(fanouts)``-hop sampler draws, for every node reached in the previous hop, at most
``fanouts[h]`` of its in-neighbours **uniformly without replacement** (all of them when it has
fewer). Only nodes new in hop ``h`` are expanded in hop ``h + 1``. This is exactly the
semantics of PyG's ``NeighborLoader``/``NeighborSampler`` (``replace=False``, directional
subgraph), which the paper uses.

:class:`NeighborSampler` calls PyG's sampler (``torch_geometric.sampler.NeighborSampler``,
the engine of ``NeighborLoader``/``LinkNeighborLoader``) when ``pyg-lib`` or ``torch-sparse``
is installed; PyPI does not carry them for every platform, so otherwise it uses
:func:`sample_neighbors`, a vectorised implementation with the same semantics (random keys
sorted within each node's neighbour segment; no Python loop over nodes or edges).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from stinfer.errors import InputError

logger = logging.getLogger("stinfer")

__all__ = [
    "CSCAdjacency",
    "NeighborSampler",
    "SampledSubgraph",
    "pyg_sampler_available",
    "sample_neighbors",
]


def pyg_sampler_available() -> bool:
    """Whether PyG's compiled neighbour sampler (pyg-lib or torch-sparse) is installed."""
    import torch_geometric.typing as pyg_typing

    return bool(pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE)


@dataclass
class SampledSubgraph:
    """A sampled computation subgraph, in PyG's ``SamplerOutput`` layout.

    Attributes
    ----------
    node
        ``(n_nodes,)`` global node ids: the seeds first (in the order given), then the nodes
        new in hop 1, hop 2, ...
    row, col
        ``(n_edges,)`` local indices into ``node``: a sampled edge ``row -> col``, ``row`` the
        sampled neighbour, ``col`` the node whose neighbourhood was sampled. ``edge_index =
        stack([row, col])`` is ready for message passing.
    num_sampled_nodes, num_sampled_edges
        Per hop: ``[n_seeds, n_new_hop1, ...]`` and ``[n_edges_hop1, ...]``.
    """

    node: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    num_sampled_nodes: list[int]
    num_sampled_edges: list[int]

    @property
    def edge_index(self) -> torch.Tensor:
        return torch.stack([self.row, self.col])


@dataclass
class CSCAdjacency:
    """In-neighbour lists: the neighbours of node ``v`` are ``row[colptr[v]:colptr[v + 1]]``."""

    colptr: torch.Tensor
    row: torch.Tensor

    @classmethod
    def from_edge_index(cls, edge_index: torch.Tensor, num_nodes: int) -> CSCAdjacency:
        """Build from a ``(2, E)`` ``[source, target]`` edge index (messages source -> target)."""
        source, target = edge_index[0].long(), edge_index[1].long()
        order = torch.argsort(target * num_nodes + source)
        counts = torch.bincount(target, minlength=num_nodes)
        colptr = torch.zeros(num_nodes + 1, dtype=torch.int64)
        colptr[1:] = torch.cumsum(counts, 0)
        return cls(colptr=colptr, row=source[order].contiguous())

    @property
    def num_nodes(self) -> int:
        return int(self.colptr.numel() - 1)


def _segment_starts(lengths: torch.Tensor) -> torch.Tensor:
    starts = torch.zeros_like(lengths)
    starts[1:] = torch.cumsum(lengths, 0)[:-1]
    return starts


def _first_appearance_unique(values: torch.Tensor) -> torch.Tensor:
    """Unique values of a 1-D tensor in order of first appearance."""
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel()), reduce="amin")
    return unique[torch.argsort(first)]


def _sample_slots(
    adjacency: CSCAdjacency, frontier: torch.Tensor, fanout: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each frontier node, up to ``fanout`` of its neighbour slots, uniformly without
    replacement; returns ``(slot, segment)``: positions in ``adjacency.row`` and the index of
    the frontier node each belongs to."""
    start = adjacency.colptr[frontier]
    degree = adjacency.colptr[frontier + 1] - start
    width = int(degree.max()) if frontier.numel() else 0
    if fanout < 0 or fanout >= width:  # every neighbour is taken
        segment = torch.repeat_interleave(torch.arange(frontier.numel()), degree)
        offset = torch.arange(segment.numel()) - torch.repeat_interleave(
            _segment_starts(degree), degree
        )
        return start[segment] + offset, segment
    total = int(degree.sum())
    if frontier.numel() * width <= 4 * total + 4096:
        # Bounded degrees (e.g. a top-K graph): random keys in a padded (frontier, width)
        # table, padding keyed 2 so it is never among the `fanout` smallest unless needed.
        keys = torch.rand((frontier.numel(), width), generator=generator)
        keys[torch.arange(width) >= degree[:, None]] = 2.0
        picked = torch.topk(keys, fanout, dim=1, largest=False, sorted=False)
        valid = picked.values < 2.0
        segment = torch.arange(frontier.numel())[:, None].expand(-1, fanout)[valid]
        return start[segment] + picked.indices[valid], segment
    # Skewed degrees: sort `segment + key` so each segment is shuffled in place.
    segment = torch.repeat_interleave(torch.arange(frontier.numel()), degree)
    offset = torch.arange(total) - torch.repeat_interleave(_segment_starts(degree), degree)
    keys = torch.rand(total, generator=generator, dtype=torch.float64)
    order = torch.argsort(segment.double() + keys)
    chosen = order[offset < degree.clamp(max=fanout)[segment]]
    return start[segment[chosen]] + offset[chosen], segment[chosen]


def sample_neighbors(
    adjacency: CSCAdjacency,
    seeds: torch.Tensor,
    fanouts: Sequence[int],
    generator: torch.Generator | None = None,
) -> SampledSubgraph:
    """Uniform multi-hop neighbour sampling without replacement (vectorised fallback).

    Parameters
    ----------
    adjacency
        In-neighbour lists of the graph (CSC).
    seeds
        ``(n_seeds,)`` unique global node ids.
    fanouts
        Neighbours drawn per node in each hop; ``-1`` takes all neighbours.
    generator
        Random source (default: torch's global generator, seeded by training).

    Returns
    -------
    SampledSubgraph
        Same layout and semantics as PyG's ``NeighborSampler`` output.

    Notes
    -----
    Each node's neighbour slots get i.i.d. uniform keys and the ``min(degree, fanout)`` slots
    with the smallest keys are kept: a uniform sample without replacement. With bounded degrees
    the keys sit in a padded ``(frontier, max_degree)`` table (``torch.topk`` per row);
    otherwise one sort of ``segment + key`` shuffles every segment in place.
    """
    seeds = seeds.long()
    num_nodes = adjacency.num_nodes
    local = torch.full((num_nodes,), -1, dtype=torch.int64)
    local[seeds] = torch.arange(seeds.numel())
    nodes = [seeds]
    rows, cols = [], []
    num_sampled_nodes, num_sampled_edges = [int(seeds.numel())], []
    frontier = seeds
    n_local = int(seeds.numel())
    for fanout in fanouts:
        slot, segment = _sample_slots(adjacency, frontier, int(fanout), generator)
        neighbour = adjacency.row[slot]
        destination = local[frontier[segment]]
        new = _first_appearance_unique(neighbour[local[neighbour] < 0])
        local[new] = torch.arange(n_local, n_local + new.numel())
        n_local += int(new.numel())
        rows.append(local[neighbour])
        cols.append(destination)
        nodes.append(new)
        num_sampled_nodes.append(int(new.numel()))
        num_sampled_edges.append(int(neighbour.numel()))
        frontier = new
    return SampledSubgraph(
        node=torch.cat(nodes),
        row=torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64),
        col=torch.cat(cols) if cols else torch.empty(0, dtype=torch.int64),
        num_sampled_nodes=num_sampled_nodes,
        num_sampled_edges=num_sampled_edges,
    )


class NeighborSampler:
    """Uniform multi-hop neighbour sampler over a fixed graph: PyG's when available.

    Parameters
    ----------
    edge_index
        ``(2, E)`` ``[source, target]``; a node's neighbours are the sources of its in-edges.
    num_nodes
        Number of nodes.
    fanouts
        Per-hop fanouts, e.g. ``(15, 10)`` (CoxFormer Suppl. S1).
    backend
        ``"auto"`` (PyG when pyg-lib or torch-sparse is installed, else the vectorised
        fallback), ``"pyg"`` or ``"vectorised"``.

    Examples
    --------
    >>> sampler = NeighborSampler(graph.message_edge_index(), graph.n_genes, (15, 10))
    >>> sub = sampler.sample(torch.tensor([0, 5, 9]))
    >>> sub.node[:3], sub.edge_index.shape
    """

    def __init__(
        self,
        edge_index: torch.Tensor,
        num_nodes: int,
        fanouts: Sequence[int] = (15, 10),
        backend: Literal["auto", "pyg", "vectorised"] = "auto",
    ) -> None:
        if backend not in ("auto", "pyg", "vectorised"):
            raise InputError(f"sampler backend must be auto, pyg or vectorised; got {backend!r}.")
        if backend == "pyg" and not pyg_sampler_available():
            raise InputError(
                "the PyG sampler needs pyg-lib or torch-sparse, which are not installed; "
                "use backend='vectorised' (same semantics) or install pyg-lib."
            )
        self.fanouts = [int(f) for f in fanouts]
        self.num_nodes = int(num_nodes)
        self.backend = (
            "pyg"
            if backend == "pyg" or (backend == "auto" and pyg_sampler_available())
            else "vectorised"
        )
        edge_index = edge_index.long()
        if self.backend == "pyg":
            from torch_geometric.data import Data
            from torch_geometric.sampler import NeighborSampler as PygNeighborSampler

            data = Data(edge_index=edge_index, num_nodes=self.num_nodes)
            self._pyg = PygNeighborSampler(data, num_neighbors=self.fanouts, replace=False)
        else:
            self._adjacency = CSCAdjacency.from_edge_index(edge_index, self.num_nodes)
        logger.debug("neighbour sampler: %s backend, fanouts %s", self.backend, self.fanouts)

    def sample(self, seeds: torch.Tensor) -> SampledSubgraph:
        """Sample the computation subgraph around ``seeds`` (unique global node ids)."""
        seeds = seeds.long()
        if self.backend == "vectorised":
            return sample_neighbors(self._adjacency, seeds, self.fanouts)
        from torch_geometric.sampler import NodeSamplerInput

        out = self._pyg.sample_from_nodes(NodeSamplerInput(input_id=None, node=seeds))
        num_nodes = out.num_sampled_nodes or [
            int(seeds.numel()),
            int(out.node.numel() - seeds.numel()),
        ]
        num_edges = out.num_sampled_edges or [int(out.row.numel())]
        return SampledSubgraph(
            node=out.node,
            row=out.row,
            col=out.col,
            num_sampled_nodes=[int(n) for n in num_nodes],
            num_sampled_edges=[int(n) for n in num_edges],
        )
