"""Sample: keep a seeded, deterministic fraction of documents (by a hash of their id).

The decision for a document depends only on its id and the seed, never on batch boundaries or
worker count, so the same corpus always yields the same sample, and a larger fraction keeps a
superset of a smaller one.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import pyarrow as pa
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.registry import register
from pipeline.stage import DROP_REASON, Resources, RowStage

SAMPLED_OUT = "sampled_out"


class SampleConfig(StrictModel):
    fraction: float = Field(gt=0, le=1, description="fraction of documents kept")
    seed: Optional[int] = Field(default=None, description="default: derived from the pipeline seed")


def keep_score(doc_id: str, seed: int) -> float:
    """Uniform in [0, 1): a keyed hash of the id."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=False)).digest()
    return int.from_bytes(digest, "little") / 2**64


@register
class Sample(RowStage):
    name = "sample"
    version = "1"
    description = "Keep a deterministic, seeded fraction of documents (hash of id)."
    Config = SampleConfig
    requires = ("id",)
    produces = ("sample_score",)
    resources = Resources(num_cpus=1, batch_size=8192)
    uses_seed = True

    def process_batch(self, batch: pa.Table) -> pa.Table:
        seed = self.config.seed if self.config.seed is not None else self.seed
        scores = [keep_score(i, seed) for i in batch.column("id").to_pylist()]
        reasons = [None if s < self.config.fraction else SAMPLED_OUT for s in scores]
        return batch.append_column("sample_score", pa.array(scores, pa.float64())).append_column(
            DROP_REASON, pa.array(reasons, pa.string())
        )
