"""A row stage with a setup of its own for tests of worker reuse: ``setup()`` keeps the config's
tag (as a real stage keeps a model or a list), every row gets it, and with ``trace_dir`` set each
setup leaves a file there naming the tag and the worker process. Importing the
module registers it as ``tag_rows``."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from pipeline.config import StrictModel
from pipeline.registry import register
from pipeline.stage import DROP_REASON, Resources, RowStage


class TagRowsConfig(StrictModel):
    tag: str
    trace_dir: str = ""
    order_file: str = ""  # each batch appends its first row's text (one line): the order parts ran in


@register
class TagRows(RowStage):
    name = "tag_rows"
    version = "1"
    description = "Set a column 'tag' to the config's tag, set up once per worker (tests only)."
    Config = TagRowsConfig
    requires = ("id",)
    produces = ("tag",)
    resources = Resources(num_cpus=1, actors=True)

    def setup(self) -> None:
        self.tag = self.config.tag
        if self.config.trace_dir:
            Path(self.config.trace_dir, f"{self.config.tag}-{os.getpid()}-{id(self)}").write_text("")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.config.order_file and batch.num_rows:
            with open(self.config.order_file, "a") as f:
                f.write(" ".join(batch.column("text")[0].as_py().split()) + "\n")
        if "tag" in batch.column_names:
            batch = batch.drop_columns(["tag"])
        tags = pa.array([self.tag] * batch.num_rows, pa.string())
        return batch.append_column("tag", tags).append_column(DROP_REASON, pa.nulls(batch.num_rows, pa.string()))
