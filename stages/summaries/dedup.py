"""What a dedup stage (``exact_dedup``, ``minhash_dedup``) records about its run, in its manifest's
``summary``: the work the shuffle did and what it removed, per source."""

from __future__ import annotations

from pipeline.contracts import StageSummary


class DedupSummary(StageSummary):
    kind = "dedup"

    partitions: int  # shuffle partitions (a performance setting: outputs do not depend on it)
    rounds: int  # large-star/small-star rounds until the components settled
    edges: int  # candidate pairs (same key or LSH bucket)
    verified_edges: int  # pairs kept after the Jaccard check (= edges without one)
    members: int  # documents in a component of two or more
    components: int
    removed: int
    removed_per_source: dict[str, int]
    documents_per_source: dict[str, int]
    component_sizes: dict[int, int]  # component size -> components of that size
