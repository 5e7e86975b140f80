"""What the `gguf` package reads in a model file: the reference zenow's own header reader is checked against."""

from __future__ import annotations

from pathlib import Path

import gguf


def gguf_reference(path: Path) -> dict:
    """The header's facts as `gguf.GGUFReader` reads them, named as `zenow.servers.GGUFInfo` names them."""
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    return {
        "architecture": arch, "name": field("general.name"),
        "context_length": field(f"{arch}.context_length"), "embedding_length": field(f"{arch}.embedding_length"),
        "block_count": field(f"{arch}.block_count"), "head_count": field(f"{arch}.attention.head_count"),
        "head_count_kv": field(f"{arch}.attention.head_count_kv"), "file_type": field("general.file_type"),
        "pooling_type": field(f"{arch}.pooling_type"),
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
        "parameter_count": sum(int(t.n_elements) for t in reader.tensors),
        "tensor_count": len(reader.tensors), "data_offset": reader.data_offset,
    }
