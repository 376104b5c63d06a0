"""Arrow column helpers shared by stages of different packages. It imports nothing of stages/, so
using it never puts one stage package's code into another's code digest."""

from __future__ import annotations

import pyarrow as pa


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Add a column, or replace it when an earlier stage already produced one of that name."""
    i = table.schema.get_field_index(name)
    if i >= 0:
        return table.set_column(i, name, values)
    return table.append_column(name, values)
