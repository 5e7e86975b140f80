"""The GGUF header reader (zenow.servers._gguf): real files agree with the `gguf` package,
broken and hostile headers are refused with a reason, never with a crash or a big allocation."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.gguf_reference import gguf_reference
from tests.support.tiny_models import write_stub_model
from zenow.errors import InvalidModelFile
from zenow.servers._gguf import GGML_BLOCK_SIZES, GGUFInfo, has_gguf_magic, read_gguf_info

# ---------------------------------------------------------------- a hand-made header, for hostile variants

U32, U64, STRING, ARRAY = 4, 10, 8, 9


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", U32, value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STRING) + s(value)


def tensor(name: str, shape: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", n) for n in shape)
            + struct.pack("<IQ", ggml_type, offset))


def header(kvs: list[bytes], tensors: list[bytes], *, version: int = 3, data: int = 256,
           tensor_count: int | None = None, kv_count: int | None = None) -> bytes:
    """A GGUF file: magic, counts, the given key/values and tensor infos, padding to 32, `data` bytes."""
    body = (b"GGUF" + struct.pack("<I", version)
            + struct.pack("<QQ", len(tensors) if tensor_count is None else tensor_count,
                          len(kvs) if kv_count is None else kv_count)
            + b"".join(kvs) + b"".join(tensors))
    body += b"\0" * (-len(body) % 32)
    return body + b"\0" * data


GOOD_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.context_length", 2048),
            kv_u32("llama.embedding_length", 64), kv_u32("llama.block_count", 2),
            kv_u32("llama.attention.head_count", 4)]
GOOD_TENSOR = tensor("token_embd.weight", (8, 8))  # f32: 256 bytes at offset 0


@pytest.fixture
def write(tmp_path):
    def write(data: bytes, name: str = "model.gguf") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def refused(path: Path) -> str:
    with pytest.raises(InvalidModelFile) as caught:
        read_gguf_info(path)
    message = str(caught.value)
    assert str(path) in message
    return message


# ---------------------------------------------------------------- real files


def test_real_models_read_as_the_gguf_package_reads_them(tiny_models, smollm2):
    for path in [*tiny_models.values(), smollm2]:
        info = read_gguf_info(path)
        expected = gguf_reference(path)
        assert {k: getattr(info, k) for k in expected} == expected, path
        assert info.file_size == path.stat().st_size and info.version == 3


def test_what_smollm2_says_about_itself(smollm2):
    info = read_gguf_info(smollm2)
    assert (info.architecture, info.context_length, info.block_count) == ("llama", 8192, 30)
    assert (info.embedding_length, info.head_count, info.head_count_kv) == (576, 9, 3)
    assert info.has_chat_template and info.parameter_count == 134_515_008
    # K and V, 30 layers, 8192 tokens, 3 kv heads of 64, 2 bytes: llama.cpp reports 180 MiB
    assert info.kv_cache_bytes(8192) == 180 * 2**20


def test_the_rank_pooling_of_a_reranker_is_read(tiny_models):
    assert read_gguf_info(tiny_models["rerank"]).pooling_type == int(gguf.PoolingType.RANK)
    assert read_gguf_info(tiny_models["embed"]).pooling_type == int(gguf.PoolingType.MEAN)


def test_info_is_frozen(tiny_models):
    info = read_gguf_info(tiny_models["llm"])
    with pytest.raises(AttributeError):
        info.context_length = 1  # type: ignore[misc]
    assert isinstance(info, GGUFInfo)


def test_the_block_size_table_is_ggmls():
    assert {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()} == GGML_BLOCK_SIZES


def test_a_hand_made_header_reads(write):
    info = read_gguf_info(write(header(GOOD_KVS, [GOOD_TENSOR])))
    assert (info.architecture, info.context_length, info.parameter_count, info.data_offset) == (
        "llama", 2048, 64, info.file_size - 256)


# ---------------------------------------------------------------- files that are not models


def test_missing_directory_and_foreign_files(tmp_path, write):
    assert refused(tmp_path / "absent.gguf").startswith("Model file not found")
    (tmp_path / "dir.gguf").mkdir()
    assert "is a directory" in refused(tmp_path / "dir.gguf")
    assert "Not a GGUF model file" in refused(write(b"", "empty.gguf"))
    assert "Not a GGUF model file" in refused(write(b"<html>Not found</html>", "page.gguf"))
    assert has_gguf_magic(write(b"GGUFxyz", "magic.gguf")) and not has_gguf_magic(tmp_path / "absent.gguf")


@pytest.mark.parametrize(("version", "expected"), [
    (1, "GGUF version 1 is no longer supported"),
    (4, "unsupported GGUF version 4"),
    (0x03000000, "big-endian"),
])
def test_versions_llama_server_cannot_read(write, version, expected):
    assert expected in refused(write(header(GOOD_KVS, [GOOD_TENSOR], version=version)))


def test_version_2_reads(write):
    assert read_gguf_info(write(header(GOOD_KVS, [GOOD_TENSOR], version=2))).version == 2


def test_every_truncation_of_the_header_is_refused(tmp_path):
    data = write_stub_model(tmp_path / "stub.gguf").read_bytes()
    data_offset = read_gguf_info(tmp_path / "stub.gguf").data_offset
    cut = tmp_path / "cut.gguf"
    for end in range(4, data_offset + 1):
        cut.write_bytes(data[:end])
        with pytest.raises(InvalidModelFile, match=r"^Broken GGUF model file "):
            read_gguf_info(cut)


def test_an_incomplete_download_is_refused_naming_the_missing_bytes(tiny_models, write):
    whole = tiny_models["llm"].read_bytes()
    message = refused(write(whole[: len(whole) // 2]))
    assert "truncated" in message and "an incomplete download" in message


@pytest.mark.parametrize(("data", "expected"), [
    (header([s("k") + struct.pack("<I", 99)], []), "unknown type 99"),
    (header([], [], kv_count=1 << 60), "key/value pairs, more than"),
    (header([], [], tensor_count=1 << 40), "tensors, more than"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62), "bytes long, more than the 1024"),
    (header([s("x" * 2000) + struct.pack("<II", U32, 1)], []), "more than the 1024 allowed"),
    (header([s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 1 << 40)], []), "items, more than"),
    (header([s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 1000)], []), "needs 8000 bytes"),
    (header([s("a") + struct.pack("<IIQ", ARRAY, ARRAY, 1) + struct.pack("<IQ", U32, 0)], []), "nested arrays"),
    (header([kv_u32("general.alignment", 1), kv_u32("general.alignment", 2)], []), "appears twice"),
    (header([kv_u32("general.alignment", 24)], []), "not a power of two"),
    (header([s("general.alignment") + struct.pack("<IQ", U64, 32)], []), "must be a uint32"),
    (header([*GOOD_KVS[:1], s("llama.context_length") + struct.pack("<Ii", 5, -1)], []), "must be positive"),
    (header(GOOD_KVS, [tensor("t", (1, 1, 1, 1, 1))]), "5 dimensions"),
    (header(GOOD_KVS, [tensor("t", (1 << 63,))]), "negative dimension"),
    (header(GOOD_KVS, [tensor("t", (1 << 40, 1 << 40))]), "more than 64 bits"),
    (header(GOOD_KVS, [tensor("t", (32,), ggml_type=4)]), "no longer supports"),
    (header(GOOD_KVS, [tensor("t", (33,), ggml_type=2)]), "not a whole number"),
    (header(GOOD_KVS, [tensor("t", (8,), offset=7)]), "not a multiple of 32"),
    (header(GOOD_KVS, [tensor("t", (8,), offset=64)]), "expected 0"),
    (header(GOOD_KVS, [GOOD_TENSOR, tensor("token_embd.weight", (8,), offset=256)]), "appears twice"),
    (header(GOOD_KVS, [tensor("n" * 64, (8,))]), "more than the 63 allowed"),
    (header(GOOD_KVS, [tensor("big", (1 << 30,))]), "truncated"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_headers_are_refused_saying_why(write, data, expected):
    message = refused(write(data))
    assert message.startswith("Broken GGUF model file") and expected in message


def test_a_tensor_type_newer_than_the_table_is_let_through(write):
    info = read_gguf_info(write(header(GOOD_KVS, [tensor("future", (64,), ggml_type=200)])))
    assert info.parameter_count == 64


def test_a_hostile_header_allocates_little(write):
    """A 'string' claiming gigabytes is skipped after a length check, never read into memory."""
    huge = 1 << 30
    path = write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("general.name") + struct.pack("<IQ", STRING, huge)
                 + b"\0" * 4096)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelFile):
            read_gguf_info(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_a_long_value_is_read_only_as_far_as_kept(write):
    long_name = "n" * 100_000
    info = read_gguf_info(write(header([*GOOD_KVS, kv_str("general.name", long_name)], [GOOD_TENSOR])))
    assert info.name == long_name[:256]


@pytest.fixture(scope="module")
def stub_bytes(tmp_path_factory) -> bytes:
    path = write_stub_model(tmp_path_factory.mktemp("stub") / "stub.gguf")
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8))
def test_any_corruption_gives_an_answer_or_a_reason(tmp_path, stub_bytes, edits):
    data = bytearray(stub_bytes)
    for position, value in edits:
        data[min(position, len(data) - 1)] = value
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(data))
    try:
        info = read_gguf_info(path)
    except InvalidModelFile as exc:
        assert str(path) in str(exc)
    else:
        assert info.data_offset <= info.file_size


def test_numpy_is_what_the_stub_stores(tmp_path):
    """The stub's one tensor is an 8x8 float32 (what the tests above count on)."""
    reader = gguf.GGUFReader(write_stub_model(tmp_path / "stub.gguf"))
    assert [(t.name, int(t.n_elements), t.data.dtype) for t in reader.tensors] == [
        ("token_embd.weight", 64, np.float32)]
