"""A cap on chats answered at once: past it, a clear 503; a finished chat frees its place."""

from __future__ import annotations

import trio

from tests.support.harness import create_session, make_settings, start_zenow
from tests.support.llama import FAKE_LLAMA_SERVER
from tests.support.tiny_models import write_stub_model


async def test_chats_past_the_cap_answer_503_until_one_ends(nursery, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.05")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "20")
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), max_chat_streams=2)
    async with start_zenow(nursery, settings) as zenow:
        client = zenow.client
        assert (await client.post("/api/models/load", json={"model_name": "fake"})).status_code == 200
        sessions = [(await create_session(client, f"s{i}"))["session_id"] for i in range(3)]

        def body(sid: int) -> dict:
            return {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

        ended = []

        async def stream(sid: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with client.stream("POST", "/api/chat", json=body(sid)) as response:
                assert response.status_code == 200
                task_status.started()
                ended.append(b"data: [DONE]" in b"".join([chunk async for chunk in response.aiter_bytes()]))

        async with trio.open_nursery() as chats:
            await chats.start(stream, sessions[0])
            await chats.start(stream, sessions[1])
            refused = await client.post("/api/chat", json=body(sessions[2]))
            assert refused.status_code == 503
            assert "--max-chat-streams" in refused.json()["detail"]
        assert ended == [True, True]
        again = await client.post("/api/chat", json={**body(sessions[2]), "stream": False})
        assert again.status_code == 200, again.text
        messages = (await client.get(f"/api/sessions/{sessions[2]}/messages")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]  # the refused chat stored nothing
