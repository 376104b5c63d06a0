"""Candidate groups -> star edges -> connected components -> one kept document per component.

All functions are vectorised (numpy / Arrow) and run on one worker over the *duplicate* subset
only: documents that share at least one key with another document. Memory is
O(members + edges) -- about 40 bytes per candidate edge and ~100 bytes per member document plus
its id -- independent of corpus size; see BENCHMARKS.md for the measured curve.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def star_edges(groups: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """Each group of uids (a bucket) becomes a star from its smallest uid to every other member:
    k - 1 edges for k members, so a bucket of 100,000 identical documents costs 100,000 edges,
    not 5 billion pairs. Returns (centers, members) uint64 arrays."""
    lengths = pc.list_value_length(groups).to_numpy(zero_copy_only=False)
    multi = lengths > 1
    if not multi.any():
        empty = np.zeros(0, np.uint64)
        return empty, empty
    groups = groups.filter(pa.array(multi))
    lengths = lengths[multi].astype(np.int64)
    values = groups.flatten().to_numpy(zero_copy_only=False).view(np.uint64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    centers = np.minimum.reduceat(values, starts)
    center_of_value = np.repeat(centers, lengths)
    keep = values != center_of_value
    return center_of_value[keep], values[keep]


def connected_components(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components of an undirected graph given as uint64 edge lists.

    Returns (nodes, component, size): every node that appears in an edge (sorted), the smallest
    node of its component (a deterministic component id) and the component's size."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    if len(src) == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty, np.zeros(0, np.int64)
    nodes, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    n = len(nodes)
    a, b = inverse[: len(src)], inverse[len(src) :]
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = scipy_components(graph, directed=False)
    # label -> smallest node: nodes are sorted, so the first index of each label is its minimum
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    component = nodes[first[labels]]
    size = np.bincount(labels)[labels].astype(np.int64)
    return nodes, component, size


def source_priority_index(sources: pa.Array, priority: Sequence[str]) -> np.ndarray:
    """Rank of each document's source in ``priority`` (listed first = preferred; unlisted last)."""
    if not priority:
        return np.zeros(len(sources), dtype=np.int32)
    idx = pc.index_in(sources, value_set=pa.array(list(priority), pa.string())).to_numpy(zero_copy_only=False)
    idx = np.where(np.isnan(idx.astype(float)), len(priority), idx)
    return idx.astype(np.int32)


def select_keepers(members: pa.Table, keep: str, priority: Sequence[str]) -> pa.Table:
    """One kept document per component, by a total order that does not depend on input order.

    ``members`` has columns component, size, id, part, source, length. ``keep="source_priority"``
    orders by (source rank, id); ``keep="longest"`` by (length descending, source rank, id).
    Returns the members with ``keeper`` (bool) and ``duplicate_of`` (the kept id of the component)."""
    if members.num_rows == 0:
        return members.append_column("keeper", pa.array([], pa.bool_())).append_column("duplicate_of", pa.array([], pa.string()))
    members = members.append_column("rank", pa.array(source_priority_index(members.column("source"), priority)))
    order = [("component", "ascending")]
    if keep == "longest":
        order.append(("length", "descending"))
    order += [("rank", "ascending"), ("id", "ascending")]
    members = members.sort_by(order).drop_columns(["rank"])
    comp = members.column("component").to_numpy()
    first = np.ones(len(comp), dtype=bool)
    first[1:] = comp[1:] != comp[:-1]
    keeper_row = np.maximum.accumulate(np.where(first, np.arange(len(comp)), 0))
    keeper_ids = members.column("id").take(pa.array(keeper_row))
    return members.append_column("keeper", pa.array(first)).append_column("duplicate_of", keeper_ids)


def size_histogram(sizes: np.ndarray) -> dict[int, int]:
    """Components per size (one entry per component)."""
    values, counts = np.unique(sizes, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}
