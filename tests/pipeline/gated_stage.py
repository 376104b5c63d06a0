"""A row stage for lock tests that can be held mid-part: with ``LMPIPE_TEST_GATE`` set to a
folder, its part writes ``started`` there and waits until ``open`` appears (two minutes at most).
Importing the module registers it as ``gated_copy``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa

from pipeline.config import StrictModel
from pipeline.registry import register
from pipeline.stage import DROP_REASON, Resources, RowStage

GATE_ENV = "LMPIPE_TEST_GATE"


class GatedCopyConfig(StrictModel):
    pass


@register
class GatedCopy(RowStage):
    name = "gated_copy"
    version = "1"
    description = "Copy every row; waits for a gate file when LMPIPE_TEST_GATE is set (tests only)."
    Config = GatedCopyConfig
    requires = ("id",)
    resources = Resources(num_cpus=1)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        gate = os.environ.get(GATE_ENV)
        if gate:
            (Path(gate) / "started").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not (Path(gate) / "open").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{gate}/open did not appear within 120 s")
                time.sleep(0.05)
        return batch.append_column(DROP_REASON, pa.nulls(batch.num_rows, pa.string()))
