"""CORS: desktop shells and local dev servers may call zenow; other origins may not."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.support.harness import start_zenow

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1:3000", "app://.", "tauri://localhost"])
async def test_local_origins_pass_preflight(client, origin):
    response = await client.options("/api/sessions", headers={"Origin": origin, **PREFLIGHT})
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == origin
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "content-type"


async def test_a_foreign_origin_is_refused(client):
    response = await client.options("/api/sessions", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert "https://evil.example" in response.json()["detail"]
    simple = await client.get("/api/sessions", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


async def test_actual_requests_carry_the_allow_origin_header(client):
    response = await client.post("/api/sessions", json={"first_message": "hi"},
                                 headers={"Origin": "http://localhost:5173"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "Origin" in response.headers["vary"]


async def test_more_origins_by_option(nursery, settings):
    extended = replace(settings, cors_origins=("https://my.example",))
    async with start_zenow(nursery, extended) as zenow:
        response = await zenow.client.options("/api/health", headers={"Origin": "https://my.example", **PREFLIGHT})
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == "https://my.example"
