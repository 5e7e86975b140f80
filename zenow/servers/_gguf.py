"""Reading a GGUF model file's header: is it a file llama-server can load, and what model is it (trio-free).

`read_gguf_info(path)` walks the whole header the way llama.cpp's `gguf_init_from_file`
does (magic, version, counts, every key/value pair, every tensor description, the
alignment, where the tensor data starts and whether every tensor fits inside the
file), without reading any tensor data, and answers a `GGUFInfo`, or raises
`InvalidModelFile` saying what is wrong.  It is blocking: call it through
`trio.to_thread`.

`model_details(info)` is what zenow stores with a registered model and shows in
`/api/models/list` and `/api/models/info`; `mode_problem(info, mode)` says why a model
cannot serve a mode (an encoder-only BERT cannot generate text, a model without a
classifier head cannot score documents), from the header alone.

A hostile header cannot make it allocate much or loop for long: values it does not
keep are skipped, not read; every length is checked against the bytes left in the
file before anything is skipped or read; and the counts of keys, tensors, array
items and of strings walked in all are capped (see the `MAX_*` constants).

Layout (little-endian)::

    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x (string key, u32 type, value)         string = u64 length + UTF-8 bytes
    tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset)
    padding to `general.alignment` (32)  →  data_offset
    tensor data: tensor i at data_offset + offset_i, each padded to the alignment
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import InvalidModelFile
from ..settings import MODES
from ..store import ModelDetails

__all__ = [
    "ENCODER_ARCHITECTURES",
    "FILE_TYPE_NAMES",
    "GGUF_MAGIC",
    "POOLING_NAMES",
    "GGUFInfo",
    "has_gguf_magic",
    "mode_problem",
    "model_details",
    "read_gguf_info",
    "serves",
]

GGUF_MAGIC = b"GGUF"

#: Header limits far above any real model (a few dozen keys, a few thousand tensors,
#: vocabularies of a few hundred thousand tokens), far below what could hurt.
MAX_KV_COUNT = 1 << 14
MAX_TENSOR_COUNT = 1 << 16
MAX_KEY_BYTES = 1024
MAX_ARRAY_ITEMS = 1 << 24
MAX_STRINGS_WALKED = 1 << 24
#: Strings zenow keeps (architecture, name) are cut to this many bytes.
MAX_KEPT_STRING = 256
#: llama.cpp's GGML_MAX_DIMS and GGML_MAX_NAME.
MAX_DIMS = 4
MAX_TENSOR_NAME = 64
DEFAULT_ALIGNMENT = 32

# GGUF value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = (
    range(13)
)
_SCALARS: dict[int, tuple[str, int]] = {
    _UINT8: ("<B", 1), _INT8: ("<b", 1), _UINT16: ("<H", 2), _INT16: ("<h", 2),
    _UINT32: ("<I", 4), _INT32: ("<i", 4), _FLOAT32: ("<f", 4), _BOOL: ("<B", 1),
    _UINT64: ("<Q", 8), _INT64: ("<q", 8), _FLOAT64: ("<d", 8),
}
_INTEGERS = frozenset({_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _UINT64, _INT64})
_TYPE_NAMES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
               "uint64", "int64", "float64"]

#: ggml tensor types: id -> (elements per block, bytes per block), as in ggml.c's type_traits.
#: Ids missing below the highest known one were removed from ggml (llama.cpp refuses them);
#: ids above it may be newer than this table and are let through unsized.
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}
_HIGHEST_KNOWN_TYPE = max(GGML_BLOCK_SIZES)

#: `<arch>.<suffix>` integer keys kept for `GGUFInfo` (per-layer arrays give their largest value).
_ARCH_INTEGERS = (
    "context_length", "embedding_length", "block_count", "attention.head_count", "attention.head_count_kv",
    "attention.key_length", "attention.value_length", "pooling_type",
)
_MAX_KEPT_ARRAY = 4096
#: `<arch>.<suffix>` boolean keys kept for `GGUFInfo`.
_ARCH_BOOLEANS = ("attention.causal",)
#: Tensors of a classifier head (llama.cpp's LLM_TENSOR_CLS and LLM_TENSOR_CLS_OUT): what a reranker
#: turns its pooled output into a relevance score with.
CLASSIFIER_TENSORS = frozenset({b"cls.weight", b"cls.output.weight"})

#: `general.file_type`: llama.cpp's LLAMA_FTYPE names (llama.h), without their MOSTLY_ prefix.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}
#: `<arch>.pooling_type`: llama.cpp's LLAMA_POOLING_TYPE names.
POOLING_NAMES: dict[int, str] = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
#: Architectures llama.cpp runs as encoders only (llama-arch.cpp): they embed text, or score it
#: with a classifier head, but cannot generate it.
ENCODER_ARCHITECTURES = frozenset({
    "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2", "jina-bert-v3",
    "eurobert", "t5encoder",
})


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a GGUF header says about a model (None where the file does not say)."""

    file_size: int
    version: int
    tensor_count: int
    kv_count: int
    #: Where the tensor data starts (bytes from the start of the file).
    data_offset: int
    #: `general.architecture`, e.g. "llama", "qwen2", "bert".
    architecture: str | None
    #: `general.name`.
    name: str | None
    #: `<arch>.context_length`: the context the model was trained for, in tokens.
    context_length: int | None
    embedding_length: int | None
    #: Number of layers.
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    #: `general.file_type` (llama.cpp's LLAMA_FTYPE: 0 all F32, 1 mostly F16, 2 Q4_0, ...).
    file_type: int | None
    #: `<arch>.pooling_type` (0 none, 1 mean, 2 cls, 3 last, 4 rank).
    pooling_type: int | None
    has_chat_template: bool
    #: Total elements of all tensors.
    parameter_count: int
    #: `<arch>.attention.causal` (llama.cpp assumes true when absent; encoders set it false).
    causal: bool | None = None
    #: Whether the file has a classifier head (`cls.weight` or `cls.output.weight`): a reranker's.
    has_classifier_head: bool = False

    @property
    def quantization(self) -> str | None:
        """The file type's name (`Q4_K_M`, `F16`, ...), None when the header does not say or
        names a type this zenow does not know."""
        return FILE_TYPE_NAMES.get(self.file_type) if self.file_type is not None else None

    @property
    def pooling(self) -> str | None:
        """The pooling type's name (`mean`, `rank`, ...), None when the header does not say."""
        return POOLING_NAMES.get(self.pooling_type) if self.pooling_type is not None else None

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """Bytes of an f16 KV cache for `n_ctx` tokens (0 when the header lacks the shape):
        K and V, each n_layer x n_ctx x n_head_kv x head size x 2 bytes."""
        if not (self.block_count and self.embedding_length and self.head_count):
            return 0
        head_kv = self.head_count_kv if self.head_count_kv is not None else self.head_count
        head_size = self.embedding_length // self.head_count
        k = self.key_length or head_size
        v = self.value_length or head_size
        return self.block_count * n_ctx * head_kv * (k + v) * 2


def has_gguf_magic(path: Path) -> bool:
    """Whether the file starts with the GGUF magic; False when it is missing, unreadable or shorter."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf_info(path: Path) -> GGUFInfo:
    """Check the GGUF header of the file at `path` and return what it says.

    Raises `InvalidModelFile` naming the path and what is wrong: no file there, a
    directory, unreadable, not a GGUF file, an unsupported version, or a broken header
    (a length or count past the end of the file or over a cap, an unknown value or
    tensor type, bad tensor dimensions or offsets, tensor data beyond the end of the file).
    """
    try:
        f = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed below, errors translated
    except FileNotFoundError:
        raise InvalidModelFile(f"Model file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidModelFile(f"Model path is a directory, not a GGUF file: {path}") from None
    except OSError as exc:
        raise InvalidModelFile(f"Cannot read model file {path}: {exc.strerror or exc}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            magic = f.read(len(GGUF_MAGIC))
            if magic != GGUF_MAGIC:
                raise InvalidModelFile(
                    f"Not a GGUF model file: {path} (it starts with {magic!r}, expected {GGUF_MAGIC!r})"
                )
            return _Header(f, size).read()
        except _Broken as exc:
            raise InvalidModelFile(f"Broken GGUF model file {path}: {exc}") from None
        except OSError as exc:
            raise InvalidModelFile(f"Cannot read model file {path}: {exc.strerror or exc}") from None


class _Broken(Exception):
    """What is wrong with a header (the message a user reads)."""


class _Header:
    """One pass over a header, with the position and the bytes left always known."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size
        self._pos = len(GGUF_MAGIC)
        self._strings_walked = 0
        self._classifier_head = False

    # ------------------------------------------------------------ primitives

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self._size:
            raise _Broken(f"{what} at byte {self._pos} needs {n} bytes, the file ends at {self._size} "
                          "(truncated or corrupt)")

    def _bytes(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self._f.read(n)
        if len(data) != n:
            raise _Broken(f"{what} at byte {self._pos}: the file ended early (it is changing while read?)")
        self._pos += n
        return data

    def _skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self._f.seek(n, io.SEEK_CUR)
        self._pos += n

    def _scalar(self, vtype: int, what: str) -> int | float:
        fmt, n = _SCALARS[vtype]
        value: int | float = struct.unpack(fmt, self._bytes(n, what))[0]
        return value

    def _u32(self, what: str) -> int:
        return int(self._scalar(_UINT32, what))

    def _u64(self, what: str) -> int:
        return int(self._scalar(_UINT64, what))

    def _string_length(self, what: str, cap: int | None = None) -> int:
        self._strings_walked += 1
        if self._strings_walked > MAX_STRINGS_WALKED:
            raise _Broken(f"more than {MAX_STRINGS_WALKED} strings in the header")
        n = self._u64(f"the length of {what}")
        if cap is not None and n > cap:
            raise _Broken(f"{what} is {n} bytes long, more than the {cap} allowed")
        self._need(n, what)
        return n

    def _string(self, what: str, cap: int) -> str:
        n = self._string_length(what, cap)
        return self._bytes(n, what).decode("utf-8", errors="replace")

    def _skip_string(self, what: str) -> None:
        self._skip(self._string_length(what), what)

    def _kept_string(self, what: str) -> str:
        n = self._string_length(what)
        kept = self._bytes(min(n, MAX_KEPT_STRING), what)
        self._skip(n - len(kept), what)
        return kept.decode("utf-8", errors="replace")

    # ------------------------------------------------------------ the header

    def read(self) -> GGUFInfo:
        version = self._u32("the version")
        if version == 1:
            raise _Broken("GGUF version 1 is no longer supported by llama.cpp; convert the model again")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise _Broken(f"unsupported GGUF version {version}{hint}; llama-server reads versions 2 and 3")
        tensor_count = self._u64("the tensor count")
        if tensor_count > MAX_TENSOR_COUNT:
            raise _Broken(f"it claims {tensor_count} tensors, more than the {MAX_TENSOR_COUNT} allowed")
        kv_count = self._u64("the key/value count")
        if kv_count > MAX_KV_COUNT:
            raise _Broken(f"it claims {kv_count} key/value pairs, more than the {MAX_KV_COUNT} allowed")

        keys: set[str] = set()
        strings: dict[str, str] = {}
        integers: dict[str, int] = {}
        booleans: dict[str, bool] = {}
        for i in range(kv_count):
            key = self._string(f"the name of key/value pair {i}", MAX_KEY_BYTES)
            if key in keys:
                raise _Broken(f"the key {key!r} appears twice")
            keys.add(key)
            self._value(key, strings, integers, booleans)

        alignment = integers.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in keys and (alignment <= 0 or alignment & (alignment - 1)):
            raise _Broken(f"general.alignment is {alignment}, not a power of two")

        parameters, data_size = self._tensors(tensor_count, alignment)
        data_offset = -(-self._pos // alignment) * alignment
        if data_offset + data_size > self._size:
            raise _Broken(
                f"the tensor data needs {data_size} bytes from byte {data_offset}, but the file is "
                f"{self._size} bytes long (truncated: an incomplete download?)"
            )

        arch = strings.get("general.architecture")

        def arch_int(suffix: str) -> int | None:
            return integers.get(f"{arch}.{suffix}") if arch else None

        for suffix in ("context_length", "embedding_length", "block_count", "attention.head_count"):
            value = arch_int(suffix)
            if value is not None and value <= 0:
                raise _Broken(f"{arch}.{suffix} is {value}; it must be positive")
        for suffix in ("attention.head_count_kv", "attention.key_length", "attention.value_length"):
            value = arch_int(suffix)
            if value is not None and value < 0:
                raise _Broken(f"{arch}.{suffix} is {value}; it must not be negative")
        return GGUFInfo(
            file_size=self._size, version=version, tensor_count=tensor_count, kv_count=kv_count,
            data_offset=data_offset, architecture=arch, name=strings.get("general.name"),
            context_length=arch_int("context_length"), embedding_length=arch_int("embedding_length"),
            block_count=arch_int("block_count"), head_count=arch_int("attention.head_count"),
            head_count_kv=arch_int("attention.head_count_kv"), key_length=arch_int("attention.key_length"),
            value_length=arch_int("attention.value_length"), file_type=integers.get("general.file_type"),
            pooling_type=arch_int("pooling_type"), has_chat_template="tokenizer.chat_template" in keys,
            parameter_count=parameters, causal=booleans.get(f"{arch}.attention.causal") if arch else None,
            has_classifier_head=self._classifier_head,
        )

    def _value(self, key: str, strings: dict[str, str], integers: dict[str, int], booleans: dict[str, bool]) -> None:
        what = f"the value of {key!r}"
        vtype = self._u32(f"the type of {key!r}")
        kept_int = key in ("general.alignment", "general.file_type") or key.endswith(_ARCH_INTEGERS)
        if vtype in _SCALARS:
            value = self._scalar(vtype, what)
            if kept_int and vtype in _INTEGERS:
                integers[key] = int(value)
            elif vtype == _BOOL and key.endswith(_ARCH_BOOLEANS):
                booleans[key] = bool(value)
        elif vtype == _STRING:
            if key in ("general.architecture", "general.name"):
                strings[key] = self._kept_string(what)
            else:
                self._skip_string(what)
        elif vtype == _ARRAY:
            self._array(key, integers if kept_int else None)
        else:
            raise _Broken(f"{what} has unknown type {vtype}")
        if key == "general.alignment" and vtype != _UINT32:
            raise _Broken(f"general.alignment must be a uint32, not {_type_name(vtype)}")

    def _array(self, key: str, integers: dict[str, int] | None) -> None:
        what = f"the array {key!r}"
        item_type = self._u32(f"the item type of {what}")
        count = self._u64(f"the length of {what}")
        if count > MAX_ARRAY_ITEMS:
            raise _Broken(f"{what} claims {count} items, more than the {MAX_ARRAY_ITEMS} allowed")
        if item_type in _SCALARS:
            fmt, n = _SCALARS[item_type]
            if integers is not None and item_type in _INTEGERS and 0 < count <= _MAX_KEPT_ARRAY:
                data = self._bytes(count * n, what)
                integers[key] = max(v[0] for v in struct.iter_unpack(fmt, data))
            else:
                self._skip(count * n, what)
        elif item_type == _STRING:
            self._need(count * 8, what)  # every item has at least its length
            for i in range(count):
                self._skip_string(f"item {i} of {what}")
        elif item_type == _ARRAY:
            raise _Broken(f"{what} holds arrays; llama.cpp does not read nested arrays")
        else:
            raise _Broken(f"{what} has items of unknown type {item_type}")

    def _tensors(self, count: int, alignment: int) -> tuple[int, int]:
        """Walk the tensor descriptions; return (elements in all, bytes of tensor data needed)."""
        names: set[bytes] = set()
        parameters = 0
        data_end = 0
        expected_offset: int | None = 0  # None once a tensor of a type newer than our table was seen
        for i in range(count):
            n = self._string_length(f"the name of tensor {i}", MAX_TENSOR_NAME - 1)
            raw_name = self._bytes(n, f"the name of tensor {i}")
            name = raw_name.decode("utf-8", errors="replace")
            if raw_name in names:
                raise _Broken(f"the tensor {name!r} appears twice")
            names.add(raw_name)
            self._classifier_head |= raw_name in CLASSIFIER_TENSORS
            n_dims = self._u32(f"the dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise _Broken(f"tensor {name!r} has {n_dims} dimensions, more than {MAX_DIMS}")
            shape = [self._u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            elements = 1
            for ne in shape:
                if ne >= 1 << 63:
                    raise _Broken(f"tensor {name!r} has a negative dimension")
                elements *= ne
            if elements >= 1 << 63:
                raise _Broken(f"tensor {name!r} has {elements} elements, more than 64 bits can count")
            ggml_type = self._u32(f"the type of tensor {name!r}")
            offset = self._u64(f"the data offset of tensor {name!r}")
            if offset % alignment:
                raise _Broken(f"tensor {name!r} starts at data offset {offset}, not a multiple of {alignment}")
            parameters += elements
            block = GGML_BLOCK_SIZES.get(ggml_type)
            if block is None:
                if ggml_type <= _HIGHEST_KNOWN_TYPE:
                    raise _Broken(f"tensor {name!r} has type {ggml_type}, which llama.cpp no longer supports")
                expected_offset = None  # newer than this table: its size is unknown
                data_end = max(data_end, offset)
                continue
            per_block, block_bytes = block
            if shape and shape[0] % per_block:
                raise _Broken(f"tensor {name!r}: its row of {shape[0]} elements is not a whole number of "
                              f"type {ggml_type} blocks of {per_block}")
            nbytes = elements // per_block * block_bytes
            if expected_offset is not None:
                if offset != expected_offset:
                    raise _Broken(f"tensor {name!r} starts at data offset {offset}, expected {expected_offset}")
                expected_offset += -(-nbytes // alignment) * alignment
            data_end = max(data_end, offset + nbytes)
        return parameters, data_end


def _type_name(vtype: int) -> str:
    return _TYPE_NAMES[vtype] if 0 <= vtype < len(_TYPE_NAMES) else f"type {vtype}"


# ---------------------------------------------------------------- what the header says a model is


def mode_problem(info: GGUFInfo, mode: str) -> str | None:
    """Why the model `info` describes cannot serve `mode`, from its header alone; None when it can.

    `llm` needs a model that generates text: not an encoder-only architecture, nor one whose
    header says its attention is not causal.  `rerank` needs a classifier head to turn a
    query and a document into a score.  Every model can embed.  The answer names the modes
    the model can serve instead.
    """
    why = _why_not(info, mode)
    if why is None:
        return None
    others = [m for m in MODES if m != mode and _why_not(info, m) is None]
    return f"{why}; load it as {' or '.join(others)}" if others else why


def serves(info: GGUFInfo) -> tuple[str, ...]:
    """The modes the model `info` describes can serve, by its header."""
    return tuple(m for m in MODES if _why_not(info, m) is None)


def _why_not(info: GGUFInfo, mode: str) -> str | None:
    arch = info.architecture or "unknown"
    if mode == "llm":
        if info.architecture in ENCODER_ARCHITECTURES:
            return f"its architecture is {arch}, an encoder-only model: it can embed text but not generate it"
        if info.causal is False:
            return (f"its header sets {arch}.attention.causal to false (it attends both ways, as an encoder): "
                    "it can embed text but not generate it")
    if mode == "rerank" and not info.has_classifier_head:
        pooling = f"its pooling type is {info.pooling}" if info.pooling else f"it sets no {arch}.pooling_type"
        return (f"its header has no classifier head (no cls.weight or cls.output.weight tensor; {pooling}), "
                "so it cannot score documents")
    return None


def model_details(info: GGUFInfo) -> ModelDetails:
    """What zenow stores and shows about a model file: the header's facts and the modes it can serve."""
    return ModelDetails(
        architecture=info.architecture, name=info.name, parameter_count=info.parameter_count,
        file_type=info.file_type, quantization=info.quantization, context_length=info.context_length,
        embedding_length=info.embedding_length, block_count=info.block_count,
        has_chat_template=info.has_chat_template, pooling=info.pooling, modes=serves(info),
        gguf_version=info.version, file_size=info.file_size,
    )
