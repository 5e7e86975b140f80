"""Shared fixtures: a real zenow (hypercorn on 127.0.0.1, port 0) over a temporary home."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from tests.support.harness import RunningZenow, make_settings, start_zenow


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "home")


@pytest.fixture
async def zenow(nursery: trio.Nursery, settings) -> AsyncIterator[RunningZenow]:
    async with start_zenow(nursery, settings) as running:
        yield running


@pytest.fixture
async def client(zenow: RunningZenow) -> httpx.AsyncClient:
    return zenow.client


@pytest.fixture(scope="session")
def llama_server() -> str:
    from tests.support.llama import real_llama_server

    return real_llama_server()


@pytest.fixture(scope="session")
def smollm2():
    from tests.support.llama import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the three tiny GGUF models, written once per run."""
    from tests.support import tiny_models as tm

    folder = tmp_path_factory.mktemp("tiny-models")
    return {
        "llm": tm.write_tiny_llama(folder / "tiny-llama.gguf"),
        "embed": tm.write_tiny_bert_embedding(folder / "tiny-bert-embed.gguf"),
        "rerank": tm.write_tiny_bert_reranker(folder / "tiny-bert-rerank.gguf"),
    }


@pytest.fixture
def event_log(tmp_path, monkeypatch):
    """Where the fake llama-server logs what it sees (read it with `tests.support.llama.fake_events`)."""
    path = tmp_path / "fake-events.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_EVENT_LOG", str(path))
    return path
