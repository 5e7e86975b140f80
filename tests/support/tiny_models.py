"""Tiny random-weight GGUF models for tests that need a real llama-server.

The weights are random (from a fixed seed), so the models say nothing
sensible. What is real is everything around them: llama-server loads them,
serves every endpoint zenow talks to, and answers with the right shapes, in
milliseconds, from files of a few hundred KB that the tests write themselves.
Nothing is downloaded.

``write_tiny_llama(path)``
    A chat model (``llama`` architecture, 2 layers, width 64) for
    ``/v1/chat/completions`` (streaming or not), ``/completion``,
    ``/tokenize``, ``/detokenize`` and ``/props``. Its SentencePiece-style
    vocabulary holds the 256 byte tokens ``<0x00>``..``<0xFF>``, so any text
    (Chinese included) tokenizes by byte fallback into one token per UTF-8
    byte (a space is the single token ``▁``), and detokenizes back to the same
    text. ``tokenizer.chat_template`` is a ChatML template (``<|im_start|>`` /
    ``<|im_end|>``). The output layer is rigged so that the model only ever
    samples printable ASCII: it never emits an end-of-generation token, so a
    request ends at ``max_tokens`` (``finish_reason`` ``"length"``) or when
    the context is full. BOS is added to every prompt. Its size can be given
    (``n_embd``, ``n_ff``, ``n_head``, ``n_layer``): ``bench/`` writes a
    205M-parameter one that generates about as fast as a 0.5-1B quantized
    model does on a small CPU.

``write_tiny_bert_embedding(path)``
    A ``bert`` model with mean pooling (``bert.pooling_type`` = MEAN) for
    ``llama-server --embedding``: ``/v1/embeddings`` and ``/embedding`` return
    64-dimensional vectors. WordPiece vocabulary of lower-cased printable
    ASCII characters; anything else (Chinese too) becomes ``[UNK]``.
    Trained context (position embeddings) is 512 tokens: keep ``-c`` at most
    512.

``write_tiny_bert_reranker(path)``
    The same BERT with a classifier head (``cls.*`` and ``cls.output.*``
    tensors, ``bert.pooling_type`` = RANK) for ``llama-server --reranking``:
    ``/v1/rerank`` returns one raw-logit score per document. The scores are
    meaningless but deterministic for a given query/document pair.

``write_stub_model(path)``
    A few-KB GGUF file whose header is whole and valid (a ``llama``
    architecture with a context length, width, layers and heads, and one
    small tensor) but which is no model: zenow's header check passes it,
    the real llama-server refuses to load it (hyperparameters and tensors
    missing). For the fake llama-server, which never opens the file, and for
    a file that "looks fine but does not start".

All four are pure functions of their path: the same bytes on every run
(fixed seeds, float32 tensors). They create missing parent directories and
write through a temporary file, so a reader never sees half a model.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

__all__ = [
    "BERT_EMBEDDING_DIM",
    "BERT_N_CTX_TRAIN",
    "LLAMA_N_CTX_TRAIN",
    "LLAMA_N_VOCAB",
    "LLAMA_CHAT_TEMPLATE",
    "write_tiny_bert_embedding",
    "write_tiny_bert_reranker",
    "write_stub_model",
    "write_tiny_llama",
]

# ---------------------------------------------------------------------------
# shared helpers

_N_EMBD = 64
_N_HEAD = 4
_N_FF = 128
_N_LAYER = 2


def _write(path: pathlib.Path, arch: str, fill) -> pathlib.Path:
    """Write a GGUF file for ``arch`` through ``fill(writer)``, atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float32)


# ---------------------------------------------------------------------------
# tiny llama (chat)

LLAMA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# vocabulary: <unk> <s> </s>, the 256 byte tokens, "▁" (space), ChatML markers
_LLAMA_UNK, _LLAMA_BOS, _LLAMA_EOS = 0, 1, 2
_LLAMA_BYTE0 = 3
_LLAMA_SPACE = _LLAMA_BYTE0 + 256
_LLAMA_IM_START = _LLAMA_SPACE + 1
_LLAMA_IM_END = _LLAMA_SPACE + 2
LLAMA_N_VOCAB = _LLAMA_IM_END + 1
LLAMA_N_CTX_TRAIN = 4096


def _llama_vocab() -> tuple[list[str], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
    tokens.append("\u2581")  # SentencePiece's escaped space
    types.append(gguf.TokenType.NORMAL)
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert len(tokens) == LLAMA_N_VOCAB
    return tokens, [int(t) for t in types]


def write_tiny_llama(path: pathlib.Path, *, n_embd: int = _N_EMBD, n_ff: int = _N_FF, n_head: int = _N_HEAD,
                     n_layer: int = _N_LAYER) -> pathlib.Path:
    """Write the tiny ChatML chat model (about 460 KB at the default size) to ``path``;
    return ``path``."""
    rng = np.random.default_rng(20261101)
    head_dim = n_embd // n_head
    tokens, types = _llama_vocab()
    n_vocab = len(tokens)

    # Residual dimension 0 carries a constant: every token embedding has
    # `anchor` there, no layer reads it (column 0 of every input projection
    # is zero) and no layer writes to it (row 0 of attn_output and ffn_down
    # is zero). The output row of every token the model must never sample
    # has a big negative weight on that dimension. The final RMS norm scales
    # all logits alike, so those tokens stay hundreds of standard deviations
    # below the rest whatever the context: sampling stays in printable ASCII
    # and never reaches an end-of-generation token.
    anchor = 10.0
    tok_embd = _normal(rng, (n_vocab, n_embd), 1.0)
    tok_embd[:, 0] = anchor

    output = _normal(rng, (n_vocab, n_embd), 0.5)
    output[:, 0] = -50.0
    sampleable = [_LLAMA_SPACE] + [_LLAMA_BYTE0 + b for b in range(0x21, 0x7F)]
    output[sampleable, 0] = 0.0
    # a slight preference for lower-case letters, so the noise looks word-like
    output[[_LLAMA_BYTE0 + b for b in range(ord("a"), ord("z") + 1)], 0] = 0.3
    output[_LLAMA_SPACE, 0] = 0.4

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_name("zenow-tiny-llama")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_context_length(LLAMA_N_CTX_TRAIN)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(n_vocab)

        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * n_vocab)
        w.add_token_types(types)
        w.add_unk_token_id(_LLAMA_UNK)
        w.add_bos_token_id(_LLAMA_BOS)
        w.add_eos_token_id(_LLAMA_EOS)
        w.add_eot_token_id(_LLAMA_IM_END)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)
        w.add_chat_template(LLAMA_CHAT_TEMPLATE)

        w.add_tensor("token_embd.weight", tok_embd)
        w.add_tensor("output_norm.weight", _ones(n_embd))
        w.add_tensor("output.weight", output)
        s = 1.0 / np.sqrt(n_embd)

        def reads(rows: int) -> np.ndarray:  # an input projection, blind to dim 0
            m = _normal(rng, (rows, n_embd), s)
            m[:, 0] = 0.0
            return m

        def writes(cols: int) -> np.ndarray:  # an output projection, never touching dim 0
            m = _normal(rng, (n_embd, cols), 1.0 / np.sqrt(cols))
            m[0, :] = 0.0
            return m

        for i in range(n_layer):
            # numpy shapes are ggml's reversed: (out_features, in_features)
            w.add_tensor(f"blk.{i}.attn_norm.weight", _ones(n_embd))
            w.add_tensor(f"blk.{i}.attn_q.weight", reads(n_head * head_dim))
            w.add_tensor(f"blk.{i}.attn_k.weight", reads(n_head * head_dim))
            w.add_tensor(f"blk.{i}.attn_v.weight", reads(n_head * head_dim))
            w.add_tensor(f"blk.{i}.attn_output.weight", writes(n_head * head_dim))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", _ones(n_embd))
            w.add_tensor(f"blk.{i}.ffn_gate.weight", reads(n_ff))
            w.add_tensor(f"blk.{i}.ffn_up.weight", reads(n_ff))
            w.add_tensor(f"blk.{i}.ffn_down.weight", writes(n_ff))

    return _write(path, "llama", fill)


# ---------------------------------------------------------------------------
# tiny BERT (embedding / reranking)

BERT_EMBEDDING_DIM = _N_EMBD
BERT_N_CTX_TRAIN = 512

_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_PAD, _BERT_UNK, _BERT_CLS, _BERT_SEP, _BERT_MASK = range(5)


def _bert_vocab() -> tuple[list[str], list[int]]:
    # llama.cpp's WordPiece: a word-initial piece is stored as "▁piece", a
    # continuation as the bare piece (the converter's rewrite of "##piece").
    chars = [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]
    tokens = list(_BERT_SPECIALS)
    types = [
        gguf.TokenType.CONTROL,
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    for c in chars:
        tokens.append("\u2581" + c)
        types.append(gguf.TokenType.NORMAL)
    for c in chars:
        tokens.append(c)
        types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _write_tiny_bert(path: pathlib.Path, *, reranker: bool) -> pathlib.Path:
    rng = np.random.default_rng(20261102)
    n_embd, n_ff = _N_EMBD, _N_FF
    tokens, types = _bert_vocab()
    n_vocab = len(tokens)
    s = 1.0 / np.sqrt(n_embd)
    # the classifier head comes from its own stream, so the reranker's encoder
    # is the embedding model's encoder
    cls_rng = np.random.default_rng(20261103)

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_name("zenow-tiny-bert-reranker" if reranker else "zenow-tiny-bert-embedding")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_context_length(BERT_N_CTX_TRAIN)
        w.add_embedding_length(n_embd)
        w.add_block_count(_N_LAYER)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(_N_HEAD)
        w.add_layer_norm_eps(1e-12)
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.RANK if reranker else gguf.PoolingType.MEAN)

        w.add_tokenizer_model("bert")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * n_vocab)
        w.add_token_types(types)
        w.add_token_type_count(2)
        w.add_pad_token_id(_BERT_PAD)
        w.add_unk_token_id(_BERT_UNK)
        w.add_bos_token_id(_BERT_CLS)  # [CLS] starts every input
        w.add_sep_token_id(_BERT_SEP)
        w.add_mask_token_id(_BERT_MASK)
        w.add_add_bos_token(True)
        w.add_add_sep_token(True)

        w.add_tensor("token_embd.weight", _normal(rng, (n_vocab, n_embd), 0.5))
        w.add_tensor("token_types.weight", _normal(rng, (2, n_embd), 0.1))
        w.add_tensor("position_embd.weight", _normal(rng, (BERT_N_CTX_TRAIN, n_embd), 0.1))
        w.add_tensor("token_embd_norm.weight", _ones(n_embd))
        w.add_tensor("token_embd_norm.bias", _zeros(n_embd))
        for i in range(_N_LAYER):
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                w.add_tensor(f"blk.{i}.{name}.weight", _normal(rng, (n_embd, n_embd), s))
                w.add_tensor(f"blk.{i}.{name}.bias", _normal(rng, (n_embd,), 0.02))
            w.add_tensor(f"blk.{i}.attn_output_norm.weight", _ones(n_embd))
            w.add_tensor(f"blk.{i}.attn_output_norm.bias", _zeros(n_embd))
            w.add_tensor(f"blk.{i}.ffn_up.weight", _normal(rng, (n_ff, n_embd), s))
            w.add_tensor(f"blk.{i}.ffn_up.bias", _normal(rng, (n_ff,), 0.02))
            ffn_down = _normal(rng, (n_embd, n_ff), 1.0 / np.sqrt(n_ff))
            w.add_tensor(f"blk.{i}.ffn_down.weight", ffn_down)
            w.add_tensor(f"blk.{i}.ffn_down.bias", _normal(rng, (n_embd,), 0.02))
            w.add_tensor(f"blk.{i}.layer_output_norm.weight", _ones(n_embd))
            w.add_tensor(f"blk.{i}.layer_output_norm.bias", _zeros(n_embd))
        if reranker:
            # pooler (dense + tanh on the [CLS] row), then a 1-logit classifier
            w.add_tensor("cls.weight", _normal(cls_rng, (n_embd, n_embd), s))
            w.add_tensor("cls.bias", _normal(cls_rng, (n_embd,), 0.02))
            w.add_tensor("cls.output.weight", _normal(cls_rng, (1, n_embd), 1.0))
            w.add_tensor("cls.output.bias", _zeros(1))

    return _write(path, "bert", fill)


def write_tiny_bert_embedding(path: pathlib.Path) -> pathlib.Path:
    """Write the tiny mean-pooling BERT embedder (64-dim vectors) to ``path``; return ``path``."""
    return _write_tiny_bert(path, reranker=False)


def write_tiny_bert_reranker(path: pathlib.Path) -> pathlib.Path:
    """Write the tiny BERT cross-encoder (pooling RANK, one logit) to ``path``; return ``path``."""
    return _write_tiny_bert(path, reranker=True)


# ---------------------------------------------------------------------------
# a valid header, no model


def write_stub_model(path: pathlib.Path, *, context_length: int = 4096, block_count: int = 2,
                     embedding_length: int = 64, head_count: int = 4, head_count_kv: int = 4,
                     name: str = "zenow-stub") -> pathlib.Path:
    """Write a small GGUF file with a valid header that is not a loadable model; return ``path``."""

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_context_length(context_length)
        w.add_embedding_length(embedding_length)
        w.add_block_count(block_count)
        w.add_head_count(head_count)
        w.add_head_count_kv(head_count_kv)
        w.add_tensor("token_embd.weight", np.zeros((8, 8), dtype=np.float32))

    return _write(path, "llama", fill)
