"""Connected components of the candidate edges, distributed; one kept document per component.

**Algorithm:** alternating *large-star* and *small-star* steps (Kiveris et al., "Connected
Components in MapReduce and Beyond", SoCC 2014), the algorithm Spark-based dedup tools use. Nodes
are 64-bit uids; node ``u`` lives in partition ``u % P``; each step is one shuffle of the edges
(``route``), and every partition is processed independently with sorts and segment reductions
(numpy, no per-node Python):

- large-star at ``u`` (all of u's edges, both directions): ``m = min(u, N(u))``; each neighbor
  ``v > u`` is re-attached to ``m``;
- small-star at ``u`` (edges to smaller neighbors only): ``m = min(u, N(u))``; ``u`` and each
  smaller neighbor are re-attached to ``m``.

Both keep connectivity, and the graph converges to one star per component whose center is the
component's smallest uid, which then is the deterministic component id. Convergence is decided
locally at each large-star: no node has both smaller and larger neighbors and no node with only
smaller neighbors has more than one. The number of rounds is O(log^2 n) in the worst case and
2-4 on dedup graphs (LSH buckets arrive as stars already).

**Memory:** a partition holds its share of the edges (16 bytes per directed edge; both
directions in large-star) and nothing else: O(edges / P). The driver holds object references only.
``P`` grows with the input, so per-task memory stays bounded as the corpus grows.

The step functions take one partition's blocks and return one block per destination partition;
``local_shuffle`` runs them in this process (tests, small graphs) and the dedup stage runs the
same functions as Ray tasks (``ctx.fan_out.exchange``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.fanout import FanOut

MAX_ROUNDS = 200  # large-star/small-star rounds; O(log^2 n) bounds real graphs far below this


# -- shuffle primitives ---------------------------------------------------------------------------

def pairs_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two uint64 columns as one (n x 2) array: one object per block in Ray's store."""
    return np.stack([np.asarray(a, np.uint64), np.asarray(b, np.uint64)], axis=1) if len(a) else np.zeros((0, 2), np.uint64)


def concat_rows(blocks: Sequence[np.ndarray], width: int) -> np.ndarray:
    blocks = [b for b in blocks if b is not None and len(b)]
    return np.concatenate(blocks) if blocks else np.zeros((0, width), np.uint64)


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    return (keys.astype(np.uint64, copy=False) % np.uint64(partitions)).astype(np.int64)


def route(rows, keys: np.ndarray, partitions: int) -> list:
    """Split rows (a numpy array or an Arrow table) into one block per partition of ``keys``."""
    if partitions == 1:
        return [rows]
    part = partition_of(keys, partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.zeros(partitions + 1, dtype=np.int64)
    np.cumsum(np.bincount(part, minlength=partitions), out=bounds[1:])
    if isinstance(rows, pa.Table):
        rows = rows.take(pa.array(order))
        return [rows.slice(bounds[j], bounds[j + 1] - bounds[j]) for j in range(partitions)]
    rows = rows[order]
    return [rows[bounds[j] : bounds[j + 1]] for j in range(partitions)]


def both_ways(pairs: np.ndarray, partitions: int) -> list[np.ndarray]:
    """Undirected edges as directed pairs in both directions, each in the partition of its first
    element: what a node needs to see all of its edges."""
    directed = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else pairs
    return route(directed, directed[:, 0], partitions)


def unique_rows(pairs: np.ndarray) -> np.ndarray:
    """Distinct (first, second) rows, sorted by first then second."""
    if len(pairs) == 0:
        return pairs
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    keep = np.ones(len(pairs), dtype=bool)
    keep[1:] = (pairs[1:, 0] != pairs[:-1, 0]) | (pairs[1:, 1] != pairs[:-1, 1])
    return pairs[keep]


def _groups(first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of equal values in a sorted array."""
    new = np.ones(len(first), dtype=bool)
    new[1:] = first[1:] != first[:-1]
    starts = np.flatnonzero(new)
    return starts, np.diff(np.append(starts, len(first)))


# -- the steps (one partition in, one block per destination partition out) -------------------------

def large_star(blocks: Sequence[np.ndarray], k: int, partitions: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Input: directed pairs (u, v) for the nodes u of this partition (both directions of every
    edge). Output: edges (m(u), v) for each v > u, routed by v for the small-star."""
    pairs = unique_rows(concat_rows(blocks, 2))
    if len(pairs) == 0:
        return route(pairs, pairs[:, 1], partitions), {"pairs": 0, "converged": True}
    u, v = pairs[:, 0], pairs[:, 1]
    starts, degree = _groups(u)
    node = u[starts]
    lowest = v[starts]  # v is sorted within each u
    highest = v[starts + degree - 1]
    unsettled = ((lowest < node) & (highest > node)) | ((highest < node) & (degree > 1))
    m = np.repeat(np.minimum(node, lowest), degree)
    up = v > u
    out = pairs_of(m[up], v[up])
    return route(out, out[:, 1], partitions), {"pairs": int(len(pairs)), "converged": not bool(unsettled.any())}


def small_star(blocks: Sequence[np.ndarray], k: int, partitions: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Input: edges (lo, hi) for the nodes hi of this partition. Output: hi and each of its
    smaller neighbors attached to the smallest of them, both directions, for the large-star."""
    pairs = concat_rows(blocks, 2)
    if len(pairs) == 0:
        return both_ways(pairs, partitions), {}
    pairs = unique_rows(pairs[:, ::-1])  # (hi, lo), sorted by hi then lo
    hi, lo = pairs[:, 0], pairs[:, 1]
    starts, degree = _groups(hi)
    m = lo[starts]  # lo < hi, so the group's smallest lo is min(N(hi) + hi)
    m_rep = np.repeat(m, degree)
    others = lo != m_rep
    out = np.concatenate([pairs_of(m_rep[others], lo[others]), pairs_of(m, hi[starts])])
    return both_ways(out, partitions), {}


def finish(blocks: Sequence[np.ndarray], k: int, partitions: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """On the converged star forest (large-star input): each center emits (node, component,
    size) for itself and its leaves, routed by node."""
    pairs = unique_rows(concat_rows(blocks, 2))
    if len(pairs) == 0:
        rows = np.zeros((0, 3), np.uint64)
        return route(rows, rows[:, 0], partitions), {}
    u, v = pairs[:, 0], pairs[:, 1]
    starts, degree = _groups(u)
    center = v[starts] > u[starts]
    c_nodes, c_degree = u[starts][center], degree[center]
    leaf_rows = np.repeat(center, degree)
    size_of_leaf = np.repeat(c_degree + 1, c_degree)
    rows = np.concatenate([
        np.stack([c_nodes, c_nodes, (c_degree + 1).astype(np.uint64)], axis=1),
        np.stack([v[leaf_rows], u[leaf_rows], size_of_leaf.astype(np.uint64)], axis=1),
    ])
    return route(rows, rows[:, 0], partitions), {}


Shuffle = Callable[..., tuple[list[list[Any]], list[dict[str, Any]]]]


# The exchange step run in this process (tests, small graphs); stages use ctx.fan_out.exchange.
local_shuffle = FanOut("dedup", on_ray=False).exchange


def label_components(shuffle: Shuffle, inputs: list[list[Any]], partitions: int,
                     on_round: Optional[Callable[[int, int], None]] = None) -> tuple[list[list[Any]], int]:
    """Large-star/small-star until converged. ``inputs``: directed pairs (both directions) per
    node partition. Returns (node, component, size) blocks per node partition, and the rounds."""
    for rounds in range(1, MAX_ROUNDS + 1):
        after_large, stats = shuffle(large_star, inputs, partitions)
        if on_round:
            on_round(rounds, sum(s["pairs"] for s in stats) // 2)
        if all(s["converged"] for s in stats):
            labels, _ = shuffle(finish, inputs, partitions)
            return labels, rounds
        inputs, _ = shuffle(small_star, after_large, partitions)
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")


def connected_components(src: np.ndarray, dst: np.ndarray, partitions: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components of an undirected graph given as uint64 edge lists, computed in this process
    with the partitioned algorithm.

    Returns (nodes, component, size): every node that appears in an edge (sorted), the smallest
    node of its component (a deterministic component id) and the component's size."""
    pairs = pairs_of(src, dst)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    if len(pairs) == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty, np.zeros(0, np.int64)
    inputs = [[b] for b in both_ways(pairs, partitions)]
    labels, _ = label_components(local_shuffle, inputs, partitions)
    rows = concat_rows([b for blocks in labels for b in blocks], 3)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    return rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].astype(np.int64)


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
