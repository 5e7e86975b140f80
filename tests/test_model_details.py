"""What a model is, read from its GGUF header at registration: details, refusals, mode checks.

No llama-server runs here: every answer comes before anything would start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.support.file_server import FileServer
from tests.support.gguf_reference import gguf_reference
from tests.support.harness import make_settings, start_zenow
from tests.support.llama import llama_children


def place(home: Path, mode: str, source: Path, name: str | None = None) -> Path:
    folder = home / "models" / mode
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    if source.stat().st_size > 2**20:
        target.symlink_to(source)  # SmolLM2: 98 MB, read in place
    else:
        shutil.copy(source, target)
    return target


#: What `details` shows of the header, checked against the gguf package's reading.
DETAIL_KEYS = ("architecture", "parameter_count", "file_type", "context_length", "embedding_length",
               "has_chat_template")


def header_says(path: Path) -> dict:
    """What the gguf package reads in the file: the reference for zenow's own reader."""
    reference = gguf_reference(path)
    return {**{k: reference[k] for k in DETAIL_KEYS}, "file_size": path.stat().st_size}


async def listed(client, mode=None) -> dict:
    params = {"mode": mode} if mode else {}
    answer = await client.get("/api/models/list", params=params)
    assert answer.status_code == 200, answer.text
    return {m["name"]: m for m in answer.json()["models"]}


async def test_models_are_listed_with_what_their_header_says(nursery, tmp_path, tiny_models, smollm2):
    home = tmp_path / "home"
    files = {
        ("llm", "tiny-llama"): place(home, "llm", tiny_models["llm"]),
        ("llm", "SmolLM2-135M-Instruct.Q4_1"): place(home, "llm", smollm2),
        ("embed", "tiny-bert-embed"): place(home, "embed", tiny_models["embed"]),
        ("rerank", "tiny-bert-rerank"): place(home, "rerank", tiny_models["rerank"]),
    }
    async with start_zenow(nursery, make_settings(home)) as zenow:
        models = {}
        for mode in ("llm", "embed", "rerank"):
            for name, model in (await listed(zenow.client, mode)).items():
                assert set(model) == {"id", "name", "path", "is_downloaded", "mode", "details"}  # the spec's, + details
                models[(mode, name)] = model
        assert set(models) == set(files)
        for key, path in files.items():
            details = models[key]["details"]
            assert {k: details[k] for k in header_says(path)} == header_says(path), key

        smol = models[("llm", "SmolLM2-135M-Instruct.Q4_1")]["details"]
        assert smol["architecture"] == "llama" and smol["parameter_count"] == 134_515_008
        assert smol["parameter_size"] == "135M"
        assert (smol["file_type"], smol["quantization"]) == (3, "Q4_1")  # the file's name says Q4_1 too
        assert smol["context_length"] == 8192 and smol["has_chat_template"] is True
        assert smol["modes"] == ["llm", "embed"]

        embed = models[("embed", "tiny-bert-embed")]["details"]
        assert (embed["architecture"], embed["pooling"], embed["modes"]) == ("bert", "mean", ["embed"])
        assert embed["has_chat_template"] is False and embed["context_length"] == 512
        rerank = models[("rerank", "tiny-bert-rerank")]["details"]
        assert (rerank["architecture"], rerank["pooling"], rerank["modes"]) == ("bert", "rank", ["embed", "rerank"])

        info = await zenow.client.get("/api/models/info", params={"model_name": "tiny-bert-rerank", "mode": "rerank"})
        assert info.status_code == 200 and info.json() == models[("rerank", "tiny-bert-rerank")]
        unknown = await zenow.client.get("/api/models/info", params={"model_name": "tiny-bert-rerank"})
        assert unknown.status_code == 404 and "not found for mode llm" in unknown.json()["detail"]
        missing = await zenow.client.get("/api/models/info", params={"mode": "embed"})
        assert missing.status_code == 400 and missing.json()["detail"].startswith("model_name:")


async def test_a_truncated_or_non_gguf_file_is_refused_at_registration(nursery, tmp_path, tiny_models):
    home = tmp_path / "home"
    whole = tiny_models["llm"].read_bytes()
    (home / "models" / "llm").mkdir(parents=True)
    (home / "models" / "llm" / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    (home / "models" / "llm" / "notes.gguf").write_text("these are my notes, not a model\n")
    files = FileServer()
    await files.start(nursery)
    files.add("/cut.gguf", whole[: len(whole) - 1000])  # announced with its cut size: only the header tells
    files.add("/page.gguf", b"<html>a login page</html>")
    async with start_zenow(nursery, make_settings(home)) as zenow:
        client = zenow.client
        assert await listed(client) == {}  # the folder's broken files were not registered

        cut = await client.post("/api/models/load", json={"model_name": "cut-download",
                                                          "download_url": files.url("/cut.gguf")})
        assert cut.status_code == 400, cut.text
        detail = cut.json()["detail"]
        assert "not a valid GGUF model file" in detail and "truncated" in detail, detail

        page = await client.post("/api/models/load", json={"model_name": "page",
                                                           "download_url": files.url("/page.gguf")})
        assert page.status_code == 400, page.text
        assert "not a GGUF file" in page.json()["detail"]

        assert await listed(client) == {}
        assert sorted(p.name for p in (home / "models" / "llm").iterdir()) == ["cut.gguf", "notes.gguf"]
        status = (await client.get("/api/server/status")).json()
        assert status["status"] == "not_started"


async def test_a_model_is_refused_for_a_mode_its_header_says_it_cannot_serve(nursery, tmp_path, tiny_models):
    home = tmp_path / "home"
    place(home, "llm", tiny_models["embed"], "bert-as-chat.gguf")
    place(home, "rerank", tiny_models["embed"], "bert-as-reranker.gguf")
    async with start_zenow(nursery, make_settings(home)) as zenow:
        client = zenow.client
        chat = await client.post("/api/models/load", json={"model_name": "bert-as-chat"})
        assert chat.status_code == 400, chat.text
        assert chat.json()["detail"] == (
            "bert-as-chat cannot be loaded as llm: its architecture is bert, an encoder-only model: it can embed "
            "text but not generate it; load it as embed")
        assert chat.json()["success"] is False

        rerank = await client.post("/api/models/load", json={"model_name": "bert-as-reranker", "mode": "rerank"})
        assert rerank.status_code == 400, rerank.text
        assert rerank.json()["detail"].startswith(
            "bert-as-reranker cannot be loaded as rerank: its header has no classifier head (no cls.weight or "
            "cls.output.weight tensor; its pooling type is mean)")

        v1 = await client.post("/v1/chat/completions", json={"model": "bert-as-chat",
                                                             "messages": [{"role": "user", "content": "hi"}]})
        assert v1.status_code == 400 and "encoder-only" in v1.json()["error"]["message"]
        for mode in ("llm", "rerank"):
            assert (await client.get("/api/server/status", params={"mode": mode})).json()["status"] == "not_started"
        assert llama_children(os.getpid()) == []  # nothing was started
