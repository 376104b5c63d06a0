"""The tokenize stage's Arrow IPC shards: their schema metadata, and reading them whole (tests,
small splits). Training streams them with :class:`stages.tokenize.loader.TokenShardLoader`; the
validation split is read with :mod:`stages.tokenize.validation`."""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from pipeline import storage as st

# Schema metadata of every shard: the rows of each record batch but the last (the writer's
# ``batch_rows``), so that the loader learns a remote shard's chunk sizes from one batch header.
ROWS_PER_BATCH_KEY = b"lmpipe.rows_per_batch"


def read_token_table(files: list[str], storage: Optional[st.Storage], columns: list[str]) -> pa.Table:
    storage = storage or st.Storage()
    tables = []
    for uri in files:
        fs, path = storage.arrow_fs(uri)
        with fs.open_input_file(path) as f:
            tables.append(pa.ipc.open_file(f).read_all().select(columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
