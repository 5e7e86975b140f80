"""zenow.convert: all-MiniLM-L6-v2 from safetensors to a GGUF that the real llama-server
serves with --embedding, checked against a numpy reference of the same model."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from tests.support.minilm import MiniLMReference, minilm_gguf, minilm_source_dir
from zenow.convert import CONVERTER_VERSION, ConversionFailed, convert_bert, packaged_minilm_gguf

pytestmark = pytest.mark.real_llama

SENTENCES = [
    "a cat sits on the mat",
    "a kitten is on the rug",
    "stock market crash",
    "Hello, World: $5.00 (approx.) -- isn't it?",
    "Naïve café owners' unaffable résumés",
    "你好\uff0c世界",  # no Chinese in this vocabulary: [UNK] pieces, still a vector
]


@pytest.fixture(scope="module")
def model() -> Path:
    return minilm_gguf()


@pytest.fixture(scope="module")
def reference() -> MiniLMReference:
    return MiniLMReference(minilm_source_dir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def embedding_server(llama_server: str, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real llama-server with the converted model and --embedding; its base URL."""
    log_path = tmp_path_factory.mktemp("minilm-server") / "llama-server.log"
    port = _free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [llama_server, "--embedding", "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
             "-c", "512", "-t", "2", "--no-webui"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2) as client:
            while True:
                if process.poll() is not None:
                    pytest.fail(f"llama-server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if client.get(f"{base}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail(f"llama-server not healthy within 30 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.02)  # poll interval; the loop waits on /health, not on time
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _embeddings(base: str, texts: list[str]) -> list[np.ndarray]:
    response = httpx.post(f"{base}/v1/embeddings", json={"input": texts, "model": "minilm"}, timeout=30)
    assert response.status_code == 200, response.text
    data = sorted(response.json()["data"], key=lambda item: item["index"])
    return [np.array(item["embedding"], dtype=np.float64) for item in data]


# ---------------------------------------------------------------------------
# the file


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, f"{key} missing"
    return field.contents()


def test_the_converted_file_is_a_bert_gguf_with_wordpiece_vocabulary(model: Path) -> None:
    reader = gguf.GGUFReader(model)
    assert _field(reader, "general.architecture") == "bert"
    assert _field(reader, "general.name") == "all-MiniLM-L6-v2"
    assert _field(reader, "bert.pooling_type") == int(gguf.PoolingType.MEAN)
    assert _field(reader, "bert.context_length") == 512
    assert _field(reader, "bert.embedding_length") == 384
    assert _field(reader, "bert.block_count") == 6
    assert _field(reader, "bert.attention.head_count") == 12
    assert _field(reader, "bert.attention.causal") is False
    assert _field(reader, "tokenizer.ggml.model") == "bert"
    assert _field(reader, "tokenizer.ggml.token_type_count") == 2
    assert _field(reader, "tokenizer.ggml.normalizer.lowercase") is True

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert isinstance(tokens, list) and isinstance(types, list)
    assert len(tokens) == len(types) == 30522
    specials = {"bos": 101, "eos": 102, "seperator": 102, "unknown": 100, "padding": 0, "mask": 103}
    for kind, token_id in specials.items():
        assert _field(reader, f"tokenizer.ggml.{kind}_token_id") == token_id
    assert [tokens[i] for i in (0, 100, 101, 102, 103)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert {types[i] for i in (0, 100, 101, 102, 103)} == {int(gguf.TokenType.CONTROL)}
    # a word start carries the phantom space, a "##" continuation is bare
    assert tokens[4937] == "\u2581cat" and tokens.index("ing") > 0 and "##ing" not in tokens

    tensors = {t.name: t.tensor_type for t in reader.tensors}
    assert len(tensors) == 5 + 6 * 16
    assert tensors["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert tensors["blk.5.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    # llama.cpp adds these to F32 activations as they are: they must stay F32
    for name in ("token_types.weight", "position_embd.weight", "blk.0.attn_q.bias", "token_embd_norm.weight"):
        assert tensors[name] == gguf.GGMLQuantizationType.F32, name


def test_f32_keeps_every_matrix_in_f32(tmp_path: Path) -> None:
    out = convert_bert(minilm_source_dir(), tmp_path / "minilm-f32.gguf", dtype="f32")
    try:
        types = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
        assert types == {gguf.GGMLQuantizationType.F32}
    finally:
        out.unlink()


def test_the_cached_conversion_is_reused_and_named_by_versions(model: Path) -> None:
    before = model.stat().st_mtime_ns
    assert packaged_minilm_gguf(model.parent, dtype="f16") == model
    assert model.stat().st_mtime_ns == before
    assert model.name == f"all-minilm-l6-v2-0.1.0-f16-c{CONVERTER_VERSION}.gguf"


# ---------------------------------------------------------------------------
# served by the real llama-server


def test_llama_server_tokenizes_like_bert(embedding_server: str, reference: MiniLMReference) -> None:
    for text in SENTENCES:
        response = httpx.post(f"{embedding_server}/tokenize", json={"content": text, "add_special": True})
        assert response.status_code == 200, response.text
        assert response.json()["tokens"] == reference.tokenize(text), text


def test_vectors_match_the_numpy_reference(embedding_server: str, reference: MiniLMReference) -> None:
    served = _embeddings(embedding_server, SENTENCES)
    assert len(served) == len(SENTENCES)
    for text, vector in zip(SENTENCES, served, strict=True):
        expected = reference.embed(reference.tokenize(text))
        assert vector.shape == (384,)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-4
        worst = float(np.abs(vector - expected).max())
        assert worst < 1e-3, f"{text!r}: largest difference {worst:.2e}"


def test_a_kitten_on_a_rug_is_closer_to_a_cat_on_a_mat_than_a_market_crash(embedding_server: str) -> None:
    cat, kitten, crash = _embeddings(embedding_server, SENTENCES[:3])
    assert float(cat @ kitten) > float(cat @ crash) + 0.3
    assert float(cat @ kitten) > 0.5


# ---------------------------------------------------------------------------
# the command line and failures


def _convert_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zenow.convert", *args], capture_output=True, text=True, timeout=120)


def test_the_command_converts_into_a_folder_once_and_prints_the_path(tmp_path: Path) -> None:
    first = _convert_cli("--into", str(tmp_path))
    assert first.returncode == 0, first.stderr
    out = Path(first.stdout.strip())
    assert out.parent == tmp_path and out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    before = out.stat().st_mtime_ns

    again = _convert_cli("--into", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert out.stat().st_mtime_ns == before
    out.unlink()


def test_the_command_rejects_a_model_that_is_not_bert(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    result = _convert_cli(str(tmp_path), str(tmp_path / "out.gguf"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Not a BERT model" in result.stderr and "roberta" in result.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_the_command_needs_an_output(tmp_path: Path) -> None:
    result = _convert_cli()
    assert result.returncode == 2
    assert "OUT.gguf" in result.stderr


def test_a_failed_conversion_leaves_the_previous_file_untouched(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(minilm_source_dir(), source, ignore=shutil.ignore_patterns("model.safetensors"))
    (source / "model.safetensors").symlink_to(minilm_source_dir() / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    out.write_bytes(b"the previous model")

    with pytest.raises(ConversionFailed, match=r"lacks tensors for blk\.6\."):
        convert_bert(source, out)
    assert out.read_bytes() == b"the previous model"
    assert list(out.parent.iterdir()) == [out]
