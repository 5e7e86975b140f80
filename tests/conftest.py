"""Shared fixtures: a real zenow (hypercorn on 127.0.0.1, port 0) over a temporary home."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
import trio

from tests.support.harness import RunningZenow, start_zenow, test_settings


@pytest.fixture
def settings(tmp_path):
    return test_settings(tmp_path / "home")


@pytest.fixture
async def zenow(nursery: trio.Nursery, settings) -> AsyncIterator[RunningZenow]:
    async with start_zenow(nursery, settings) as running:
        yield running


@pytest.fixture
async def client(zenow: RunningZenow) -> httpx.AsyncClient:
    return zenow.client
