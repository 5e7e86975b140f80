"""/v1/embeddings with a real embedding model: all-MiniLM-L6-v2 converted to GGUF, served by the
real llama-server through zenow, read with the `openai` SDK, checked against a numpy reference."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import trio

from tests.support.harness import make_settings, start_zenow
from tests.support.minilm import MiniLMReference, minilm_gguf, minilm_source_dir

pytestmark = pytest.mark.real_llama

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def reference() -> MiniLMReference:
    return MiniLMReference(minilm_source_dir())


@pytest.fixture
async def zenow(nursery, tmp_path, llama_server):
    home = tmp_path / "home"
    (home / "models" / "embed").mkdir(parents=True)
    (home / "models" / "embed" / f"{MODEL}.gguf").symlink_to(minilm_gguf())
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as running:
        yield running


def embed(zenow, texts: list[str]) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{zenow.url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.embeddings.create(model=MODEL, input=texts)  # base64 on the wire, as the SDK asks
    assert answer.model == MODEL and answer.usage.prompt_tokens > len(texts)
    return np.array([row.embedding for row in answer.data])


async def test_similar_sentences_are_closer_and_vectors_match_the_reference(zenow, reference):
    texts = ["a cat sits on the mat", "a kitten is on the rug", "stock market crash"]
    vectors = await trio.to_thread.run_sync(embed, zenow, texts)
    assert vectors.shape == (3, 384)
    cat, kitten, crash = vectors
    assert float(cat @ kitten) > float(cat @ crash) + 0.3
    expected = np.array([reference.embed(reference.tokenize(text)) for text in texts])
    assert np.abs(vectors - expected).max() < 1e-3


async def test_an_over_long_text_is_cut_to_512_tokens_keeping_sep(zenow, reference):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 80)  # 720 words
    ids = reference.tokenize(text)
    assert len(ids) > 512
    (vector,) = await trio.to_thread.run_sync(embed, zenow, [text])
    expected = reference.embed([*ids[:511], reference.sep])
    assert np.abs(vector - expected).max() < 1e-3
