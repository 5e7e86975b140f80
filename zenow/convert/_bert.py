"""Converting a Hugging Face BERT encoder (safetensors + WordPiece tokenizer) to GGUF.

What llama.cpp's `bert` loader expects, mirrored from `BertModel` in llama.cpp's own
converter (conversion/bert.py in the pinned llama-cpp-python 0.3.36) without torch
or transformers: the same tensor names, the same "phantom space" vocabulary, the same
special-token metadata.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

try:
    import gguf
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
except ModuleNotFoundError as exc:  # the converter's libraries are an optional extra of zenow
    raise ModuleNotFoundError(
        f"zenow.convert needs the {exc.name!r} package: pip install gguf numpy safetensors", name=exc.name
    ) from exc

from ..errors import ZenowError

__all__ = ["CONVERTER_VERSION", "ConversionFailed", "Dtype", "convert_bert"]

#: Bumped whenever the converter writes different bytes for the same input, so that
#: caches keyed by it (see `packaged_minilm_gguf`) convert again.
CONVERTER_VERSION = 1

#: How the weight matrices are stored. The rest is always F32, as llama.cpp's converter
#: writes it: vectors (biases, norms), and the position and token-type embeddings, which
#: llama.cpp adds to F32 activations directly (an F16 `token_types` aborts llama-server).
Dtype = Literal["f16", "f32"]


class ConversionFailed(ZenowError):
    """The source folder is not a BERT model this converter understands, or it cannot be
    read or written; the message names the file and what is wrong with it."""


# llama.cpp reads these keys; gguf 0.19.0 has no constants or writer methods for them.
_KEY_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
_KEY_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

_PHANTOM_SPACE = "\u2581"

_EMBEDDING_TENSORS = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_LAYER_TENSOR = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_PARTS = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
# Heads an embedding model does not use (llama.cpp's converter drops them too).
_UNUSED_TENSORS = ("embeddings.position_ids", "pooler.", "cls.predictions.", "cls.seq_relationship.")

_ALWAYS_F32 = frozenset({"position_embd.weight", "token_types.weight"})

_POOLING = {
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
    "pooling_mode_lasttoken": gguf.PoolingType.LAST,
}


@dataclass(frozen=True)
class _Hyperparameters:
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    n_token_types: int
    layer_norm_eps: float


@dataclass(frozen=True)
class _Vocabulary:
    tokens: list[str]
    types: list[int]
    cls: int
    sep: int
    unk: int
    pad: int | None
    mask: int | None
    lowercase: bool
    strip_accents: bool | None


def convert_bert(src_dir: Path, out: Path, *, dtype: Dtype = "f16", name: str | None = None) -> Path:
    """Convert the BERT encoder in `src_dir` to a GGUF file at `out`; return `out`.

    `src_dir` is a Hugging Face model folder: `config.json` (model_type "bert", GELU,
    absolute positions), `model.safetensors`, and the WordPiece vocabulary
    (`tokenizer.json`, else `vocab.txt`) with `tokenizer_config.json` naming the special
    tokens. A sentence-transformers `modules.json` decides the pooling type (mean, CLS or
    last token); without one the file has none and llama-server uses its `--pooling`.
    `name` becomes `general.name`.

    The file is written next to `out` under a temporary name and renamed into place, so
    `out` is either the whole model or untouched. Missing parent folders are created.

    Raises `ConversionFailed` when a file is missing or unreadable, the model is not a
    BERT this converter knows (an unknown tensor name is an error, not skipped), or
    `out` cannot be written.
    """
    src_dir, out = Path(src_dir), Path(out)
    if dtype not in ("f16", "f32"):
        raise ConversionFailed(f"Unknown dtype {dtype!r}: use 'f16' or 'f32'")
    config = _read_json(src_dir / "config.json")
    hparams = _hyperparameters(config, src_dir / "config.json")
    vocab = _vocabulary(src_dir, hparams.n_vocab)
    pooling = _pooling_type(src_dir)
    tensors = dict(_gguf_tensors(src_dir / "model.safetensors", hparams, dtype))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionFailed(f"Cannot create {out.parent}: {exc.strerror}") from exc
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, "bert")
        try:
            _add_metadata(writer, hparams, vocab, pooling, dtype, name)
            for tensor_name, array in tensors.items():
                writer.add_tensor(tensor_name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        _fsync(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise ConversionFailed(f"Cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionFailed(f"Not a Hugging Face model folder: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionFailed(f"Cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionFailed(f"{path} is not a JSON object")
    return data


def _hyperparameters(config: Mapping[str, Any], path: Path) -> _Hyperparameters:
    if config.get("model_type") != "bert":
        raise ConversionFailed(f"Not a BERT model: {path} has model_type {config.get('model_type')!r}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConversionFailed(f"Unsupported activation {config['hidden_act']!r} in {path}: llama.cpp's bert uses GELU")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionFailed(f"Unsupported position_embedding_type in {path}: only 'absolute' is supported")
    try:
        hparams = _Hyperparameters(
            n_vocab=int(config["vocab_size"]),
            n_ctx_train=int(config["max_position_embeddings"]),
            n_embd=int(config["hidden_size"]),
            n_ff=int(config["intermediate_size"]),
            n_head=int(config["num_attention_heads"]),
            n_layer=int(config["num_hidden_layers"]),
            n_token_types=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        )
    except KeyError as exc:
        raise ConversionFailed(f"{path} lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConversionFailed(f"Bad value in {path}: {exc}") from None
    if hparams.n_embd % hparams.n_head:
        raise ConversionFailed(f"hidden_size {hparams.n_embd} is not a multiple of {hparams.n_head} heads in {path}")
    return hparams


def _vocabulary(src_dir: Path, n_vocab: int) -> _Vocabulary:
    tokenizer_json = src_dir / "tokenizer.json"
    tokenizer = _read_json(tokenizer_json) if tokenizer_json.is_file() else {}
    config_path = src_dir / "tokenizer_config.json"
    if not config_path.is_file():
        config_path = src_dir / "special_tokens_map.json"
    tokenizer_config = _read_json(config_path) if config_path.is_file() else {}

    ids = _token_ids(src_dir, tokenizer)
    if len(ids) > n_vocab or max(ids.values(), default=-1) >= n_vocab:
        raise ConversionFailed(f"The vocabulary in {src_dir} is larger than config.json's vocab_size {n_vocab}")

    def special(kind: str, default: str) -> int | None:
        entry = tokenizer_config.get(f"{kind}_token", default)
        text = entry.get("content") if isinstance(entry, dict) else entry
        return ids.get(text) if isinstance(text, str) else None

    cls, sep, unk = special("cls", "[CLS]"), special("sep", "[SEP]"), special("unk", "[UNK]")
    if cls is None or sep is None or unk is None:
        raise ConversionFailed(f"The vocabulary in {src_dir} lacks a [CLS], [SEP] or [UNK] token")
    pad, mask = special("pad", "[PAD]"), special("mask", "[MASK]")

    control = {i for i in (cls, sep, unk, pad, mask) if i is not None}
    for added in tokenizer.get("added_tokens", []):
        if isinstance(added, dict) and added.get("special") and isinstance(added.get("id"), int):
            control.add(added["id"])

    by_id = {i: text for text, i in ids.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i in control:
            # llama.cpp matches control tokens verbatim, so they keep their text
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL))
            continue
        text = by_id.get(i)
        if text is None:
            tokens.append(f"{_PHANTOM_SPACE}[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            # llama.cpp's WordPiece marks the start of a word, not its continuation:
            # "##ing" is stored as "ing" and "play" as "▁play"
            tokens.append(text[2:] if text.startswith("##") else _PHANTOM_SPACE + text)
            types.append(int(gguf.TokenType.NORMAL))

    lowercase, strip_accents = _normalizer(tokenizer, tokenizer_config)
    return _Vocabulary(tokens, types, cls, sep, unk, pad, mask, lowercase, strip_accents)


def _token_ids(src_dir: Path, tokenizer: Mapping[str, Any]) -> dict[str, int]:
    model = tokenizer.get("model")
    if isinstance(model, dict) and model.get("type") == "WordPiece" and isinstance(model.get("vocab"), dict):
        return {str(text): int(i) for text, i in model["vocab"].items()}
    if model is not None:
        kind = model.get("type") if isinstance(model, dict) else model
        raise ConversionFailed(f"{src_dir / 'tokenizer.json'} is a {kind!r} tokenizer, not WordPiece")
    vocab_txt = src_dir / "vocab.txt"
    try:
        lines = vocab_txt.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConversionFailed(f"No vocabulary in {src_dir}: neither tokenizer.json nor vocab.txt") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionFailed(f"Cannot read {vocab_txt}: {exc}") from exc
    return {text: i for i, text in enumerate(lines)}


def _normalizer(tokenizer: Mapping[str, Any], tokenizer_config: Mapping[str, Any]) -> tuple[bool, bool | None]:
    normalizer = tokenizer.get("normalizer")
    if isinstance(normalizer, dict) and normalizer.get("type") == "BertNormalizer":
        lowercase, strip_accents = normalizer.get("lowercase", True), normalizer.get("strip_accents")
    else:
        lowercase, strip_accents = tokenizer_config.get("do_lower_case", True), tokenizer_config.get("strip_accents")
    # None means "follow lowercase", in Hugging Face's BertNormalizer and in llama.cpp alike
    return bool(lowercase), strip_accents if isinstance(strip_accents, bool) else None


def _pooling_type(src_dir: Path) -> gguf.PoolingType | None:
    modules_path = src_dir / "modules.json"
    if not modules_path.is_file():
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionFailed(f"Cannot read {modules_path}: {exc}") from exc
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            pooling_path = src_dir / str(module.get("path", "")) / "config.json"
            pooling = _read_json(pooling_path)
            for flag, pooling_type in _POOLING.items():
                if pooling.get(flag):
                    return pooling_type
            raise ConversionFailed(f"Unsupported pooling in {pooling_path}: only mean, CLS and last token")
    return None


def _gguf_tensors(path: Path, hparams: _Hyperparameters, dtype: Dtype) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
    """The tensors under llama.cpp's names, checked complete and in shape, in file order."""
    try:
        source = load_file(str(path))
    except FileNotFoundError:
        raise ConversionFailed(f"{path} is missing (this converter reads safetensors only)") from None
    except (OSError, SafetensorError, TypeError, ValueError) as exc:
        raise ConversionFailed(f"Cannot read {path}: {exc}") from exc

    matrix_type = np.float16 if dtype == "f16" else np.float32
    expected = _expected_shapes(hparams)
    for hf_name, array in source.items():
        gguf_name = _gguf_name(hf_name.removeprefix("bert."), path)
        if gguf_name is None:
            continue
        shape = expected.pop(gguf_name, None)
        if shape is None:
            raise ConversionFailed(f"Unexpected tensor {hf_name!r} in {path} (layer beyond num_hidden_layers?)")
        if tuple(array.shape) != shape:
            raise ConversionFailed(f"Tensor {hf_name!r} in {path} has shape {array.shape}, expected {shape}")
        if array.dtype.kind != "f":
            raise ConversionFailed(f"Tensor {hf_name!r} in {path} is {array.dtype}, not floating point")
        # numpy's (out, in) order is ggml's (in, out): Linear weights go in as they are
        is_matrix = array.ndim >= 2 and gguf_name not in _ALWAYS_F32
        yield gguf_name, array.astype(matrix_type if is_matrix else np.float32)
    if expected:
        raise ConversionFailed(f"{path} lacks tensors for {', '.join(sorted(expected))}")


def _gguf_name(name: str, path: Path) -> str | None:
    if name in _EMBEDDING_TENSORS:
        return _EMBEDDING_TENSORS[name]
    if match := _LAYER_TENSOR.fullmatch(name):
        layer, part, kind = match.groups()
        if part in _LAYER_PARTS:
            return f"blk.{int(layer)}.{_LAYER_PARTS[part]}.{kind}"
    if name.startswith(_UNUSED_TENSORS):
        return None
    raise ConversionFailed(f"Unknown tensor {name!r} in {path}: not a plain BERT encoder")


def _expected_shapes(h: _Hyperparameters) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (h.n_vocab, h.n_embd),
        "token_types.weight": (h.n_token_types, h.n_embd),
        "position_embd.weight": (h.n_ctx_train, h.n_embd),
        "token_embd_norm.weight": (h.n_embd,),
        "token_embd_norm.bias": (h.n_embd,),
    }
    for i in range(h.n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{i}.{part}.weight"] = (h.n_embd, h.n_embd)
            shapes[f"blk.{i}.{part}.bias"] = (h.n_embd,)
        for norm in ("attn_output_norm", "layer_output_norm"):
            shapes[f"blk.{i}.{norm}.weight"] = (h.n_embd,)
            shapes[f"blk.{i}.{norm}.bias"] = (h.n_embd,)
        shapes[f"blk.{i}.ffn_up.weight"] = (h.n_ff, h.n_embd)
        shapes[f"blk.{i}.ffn_up.bias"] = (h.n_ff,)
        shapes[f"blk.{i}.ffn_down.weight"] = (h.n_embd, h.n_ff)
        shapes[f"blk.{i}.ffn_down.bias"] = (h.n_embd,)
    return shapes


def _add_metadata(
    w: gguf.GGUFWriter,
    h: _Hyperparameters,
    vocab: _Vocabulary,
    pooling: gguf.PoolingType | None,
    dtype: Dtype,
    name: str | None,
) -> None:
    if name:
        w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(h.n_ctx_train)
    w.add_embedding_length(h.n_embd)
    w.add_feed_forward_length(h.n_ff)
    w.add_block_count(h.n_layer)
    w.add_head_count(h.n_head)
    w.add_layer_norm_eps(h.layer_norm_eps)
    w.add_causal_attention(False)
    if pooling is not None:
        w.add_pooling_type(pooling)

    w.add_tokenizer_model("bert")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_type_count(h.n_token_types)
    # [CLS] is BERT's beginning of sequence and [SEP] its end, as llama.cpp's converter
    # writes them; gguf 0.19.0 has no cls_token_id key, and llama.cpp does not read one
    w.add_bos_token_id(vocab.cls)
    w.add_eos_token_id(vocab.sep)
    w.add_sep_token_id(vocab.sep)
    w.add_unk_token_id(vocab.unk)
    if vocab.pad is not None:
        w.add_pad_token_id(vocab.pad)
    if vocab.mask is not None:
        w.add_mask_token_id(vocab.mask)
    # "[CLS] A [SEP]" for one text and "[CLS] A [SEP] B [SEP]" for a pair (llama-server's
    # rerank prompt): [SEP] goes after each text as EOS, never as an extra separator
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.add_add_sep_token(False)
    w.add_bool(_KEY_LOWERCASE, vocab.lowercase)
    if vocab.strip_accents is not None:
        w.add_bool(_KEY_STRIP_ACCENTS, vocab.strip_accents)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
