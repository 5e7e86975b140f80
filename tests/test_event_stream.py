"""Splitting a Server-Sent Events stream's bytes into its `data:` payloads (both chat streams read
llama-server through it)."""

from __future__ import annotations

import pytest

from zenow.event_stream import MAX_LINE, DataLines, MalformedStream

STREAM = (b'data: {"a":1}\n\n: a comment\nevent: x\ndata:{"b":2}\r\n\r\n'
          b'data: {"c":"caf\xc3\xa9"}\n\ndata: [DONE]\n\n')
PAYLOADS = [b'{"a":1}', b'{"b":2}', b'{"c":"caf\xc3\xa9"}', b"[DONE]"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_payloads_come_out_whole_and_in_order_however_the_bytes_are_cut(size):
    lines = DataLines()
    got = [payload for start in range(0, len(STREAM), size) for payload in lines.feed(STREAM[start:start + size])]
    assert got == PAYLOADS


def test_a_line_is_only_returned_once_it_ends():
    lines = DataLines()
    assert lines.feed(b'data: {"a":') == []
    assert lines.feed(b"1}") == []
    assert lines.feed(b"\n") == [b'{"a":1}']


def test_an_endless_line_is_refused_before_it_holds_more_than_the_limit():
    lines = DataLines()
    lines.feed(b"data: " + b"x" * (MAX_LINE - 6))  # exactly the limit: kept
    with pytest.raises(MalformedStream, match="longer than"):
        lines.feed(b"x")
    assert issubclass(MalformedStream, ValueError)  # /v1 reports every malformed stream alike
