"""Reading the tokenize stage's Arrow IPC shards whole (validation splits, evaluation). Training
streams them with :class:`stages.tokenize.loader.TokenShardLoader` instead."""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from pipeline import storage as st


def read_token_table(files: list[str], storage: Optional[st.Storage], columns: list[str]) -> pa.Table:
    storage = storage or st.Storage()
    tables = []
    for uri in files:
        fs, path = storage.arrow_fs(uri)
        with fs.open_input_file(path) as f:
            tables.append(pa.ipc.open_file(f).read_all().select(columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
