"""Unit tests of the trio-free helpers: HTTP headers of a download, download targets, token estimates."""

from __future__ import annotations

import pytest

from zenow.downloads._headers import ContentRange, content_length, parse_content_range
from zenow.downloads._target import DownloadTarget, check_sha256, filename_from_url, model_name_of
from zenow.errors import InvalidMode, InvalidRequest
from zenow.tokens import estimate_tokens


@pytest.mark.parametrize(("header", "parsed"), [
    ("bytes 0-99/100", ContentRange(0, 99, 100)),
    ("bytes 100-199/*", ContentRange(100, 199, None)),
    ("bytes */500", ContentRange(None, None, 500)),
    (None, None),
    ("bytes 10-5/100", None),          # last before first
    ("bytes 0-100/100", None),         # last beyond the file
    ("items 0-1/2", None),
    ("bytes ٠-٩/١٠", None),            # digits of another script are no digits here
])
def test_content_range(header, parsed):
    assert parse_content_range(header) == parsed


@pytest.mark.parametrize(("headers", "length"), [
    ({"content-length": "123"}, 123),
    ({"content-length": " 7 "}, 7),
    ({}, None),
    ({"content-length": "²"}, None),
    ({"content-length": "-5"}, None),
    ({"content-length": "10", "content-encoding": "gzip"}, None),  # the file's length is unknown then
    ({"content-length": "10", "content-encoding": "identity"}, 10),
])
def test_content_length(headers, length):
    assert content_length(headers) == length


def test_a_target_takes_its_filename_from_the_url_and_names_the_model_after_it():
    target = DownloadTarget.check("https://example.org/models/My%20Model.Q4.gguf?x=1", None, "embed")
    assert (target.filename, target.mode, target.model_name) == ("My Model.Q4.gguf", "embed", "My Model.Q4")
    assert model_name_of("tiny.GGUF") == "tiny"


@pytest.mark.parametrize(("url", "filename", "mode", "sha", "field"), [
    ("ftp://example.org/a.gguf", None, "llm", None, "url"),
    ("https://example.org/a.gguf", "../a.gguf", "llm", None, "filename"),
    ("https://example.org/a.gguf", "a.bin", "llm", None, "filename"),
    ("https://example.org/", None, "llm", None, "filename"),
    ("https://example.org/a.gguf", None, "llm", "abc", "sha256"),
])
def test_a_bad_target_names_its_field(url, filename, mode, sha, field):
    with pytest.raises(InvalidRequest) as caught:
        DownloadTarget.check(url, filename, mode, sha)
    assert caught.value.detail.startswith(f"{field}:")


def test_a_bad_mode_and_digest_forms():
    with pytest.raises(InvalidMode):
        DownloadTarget.check("https://example.org/a.gguf", None, "chat")
    assert check_sha256("A" * 64) == "a" * 64 and check_sha256(None) is None
    with pytest.raises(InvalidRequest):
        filename_from_url("https://example.org/.hidden.gguf")


@pytest.mark.parametrize(("text", "tokens"), [
    ("", 0),
    ("a", 1),
    ("hello world", 3),                 # max(11 letters / 4 -> 3, 2 words)
    ("你好世界", 4),                      # one per CJK character
    ("1 + 2 = 3", 5),                   # digits and symbols each count
])
def test_the_token_estimate(text, tokens):
    assert estimate_tokens(text) == tokens


def test_a_session_is_shown_with_every_field_of_its_record():
    from dataclasses import asdict

    from zenow.routes._shapes import session_json
    from zenow.store import SessionInfo

    session = SessionInfo(7, "名前", "2026-01-01T00:00:00", "2026-01-02T00:00:00", 3, 42)
    assert session_json(session) == asdict(session)


def test_the_rename_schema_accepts_exactly_the_names_that_are_not_empty_once_whitespace_is_collapsed():
    # schemathesis draws names from the schema's pattern with Python's `re`; pydantic checks it with
    # Rust's regex; the route collapses whitespace with str.split(): all three must agree.
    import re

    import pydantic

    from zenow.routes.sessions import RenameSession

    pattern = RenameSession.model_json_schema()["properties"]["new_name"]["pattern"]
    for code in [*range(0x21), *range(0x7f, 0xa1), 0x1680, *range(0x2000, 0x2030), 0x205f, 0x3000, 0xfeff, 0x4e2d]:
        name = f" {chr(code)} "
        kept = bool(name.split())
        assert bool(re.search(pattern, name)) == kept, hex(code)
        try:
            RenameSession(new_name=name)
            accepted = True
        except pydantic.ValidationError:
            accepted = False
        assert accepted == kept, hex(code)
