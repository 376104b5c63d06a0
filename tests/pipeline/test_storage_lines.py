"""``iter_lines``: linear in the bytes read however long a line is, and a line above the limit is
reported (size and head), never held."""

from __future__ import annotations

import io
import time

import pytest

from pipeline.storage import OversizedLine, iter_lines

CASES = [b"", b"a", b"a\n", b"\n", b"a\nb", b"a\n\nb\n", b"abc\ndefgh\nij", b"\n\n\nlast"]


@pytest.mark.parametrize("data", CASES)
def test_lines_are_the_same_at_every_chunk_size(data):
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    for chunk_size in (1, 2, 3, 7, 1 << 16):
        assert list(iter_lines(io.BytesIO(data), chunk_size=chunk_size)) == expected


def test_a_line_above_the_limit_comes_out_as_its_size_and_head():
    data = b"ab\nabcdef\nabc\nabcd"
    for chunk_size in (1, 2, 5, 1 << 16):
        got = list(iter_lines(io.BytesIO(data), chunk_size=chunk_size, max_line_bytes=3, head_bytes=2))
        assert got == [b"ab", OversizedLine(6, b"ab"), b"abc", OversizedLine(4, b"ab")]


def test_a_long_line_costs_time_linear_in_its_bytes():
    # 4 MB in 64-byte chunks: 62,500 chunks. Re-joining the buffer per chunk copies ~125 GB (minutes);
    # keeping the pieces and joining once copies 4 MB (well under a second even on a busy machine).
    line = b"x" * 4_000_000
    started = time.monotonic()
    got = list(iter_lines(io.BytesIO(line + b"\nend"), chunk_size=64))
    assert time.monotonic() - started < 10
    assert got == [line, b"end"]
