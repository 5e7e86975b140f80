"""What the store hands out: immutable records, one per row kind."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["DownloadRecord", "MessageInfo", "ModelDetails", "ModelInfo", "Role", "SessionInfo"]

Role = Literal["user", "assistant", "system"]
DownloadStatus = Literal["downloading", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: int
    session_name: str
    created_at: str
    updated_at: str
    message_count: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class MessageInfo:
    id: int
    session_id: int
    role: Role
    content: str
    token_count: int
    created_at: str


@dataclass(frozen=True, slots=True)
class ModelDetails:
    """What a model file's GGUF header says about it, read when the model is registered
    (see `zenow.servers.model_details`); None where the header does not say."""

    #: `general.architecture`: "llama", "qwen2", "bert", ...
    architecture: str | None
    #: `general.name`.
    name: str | None
    #: Elements of all tensors.
    parameter_count: int
    #: `general.file_type` (llama.cpp's LLAMA_FTYPE) and its name ("Q4_K_M", "F16", ...).
    file_type: int | None
    quantization: str | None
    #: The context the model was trained for, in tokens.
    context_length: int | None
    embedding_length: int | None
    #: Layers.
    block_count: int | None
    has_chat_template: bool
    #: `<arch>.pooling_type` by name ("mean", "cls", "last", "rank", "none").
    pooling: str | None
    #: The modes the header says it can serve, of llm, embed and rerank.
    modes: tuple[str, ...]
    gguf_version: int
    #: Bytes on disk when the header was read.
    file_size: int

    @property
    def parameter_size(self) -> str:
        """The parameter count to three digits: "135M", "1.54B", "120K"."""
        count = self.parameter_count
        for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
            if count >= scale:
                return f"{count / scale:.3g}{unit}"
        return str(count)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> ModelDetails | None:
        """The details stored as `text`; None when there are none, or they are not in this shape
        (written by another zenow): they are read again from the file at the next registration."""
        if not text:
            return None
        try:
            stored: Any = json.loads(text)
            values = {f.name: stored[f.name] for f in fields(cls)}
            values["modes"] = tuple(values["modes"])
            return cls(**values)
        except (TypeError, ValueError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    path: str
    mode: str
    source_url: str | None
    size: int | None
    #: Whether the file existed when the record was read (the store checks it).
    is_downloaded: bool
    #: What its GGUF header said when it was registered; None for a model registered before
    #: zenow read headers at registration (filled in when it is registered again).
    details: ModelDetails | None = None


@dataclass(frozen=True, slots=True)
class DownloadRecord:
    url: str
    filename: str
    mode: str
    status: DownloadStatus
    downloaded: int
    total: int | None
    error: str | None
    sha256: str | None
