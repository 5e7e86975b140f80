"""The disk under the home fills up or turns read-only while zenow runs: a clear answer,
nothing half-written, reads keep working, and writes work again once there is room.

These mount a small tmpfs as the home (root is needed, as on every machine this project
runs its tests on); they fail, never skip, when it cannot be mounted.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import add_message, create_session, make_settings, start_zenow


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk is full; return it (delete it to make room again)."""
    filler = folder / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


async def test_a_full_disk_answers_507_and_keeps_serving_reads(nursery, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        settings = make_settings(disk / "home")
        async with start_zenow(nursery, settings) as zenow:
            sid = (await create_session(zenow.client, "before"))["session_id"]
            await add_message(zenow.client, sid, "user", "kept")
            filler = fill(disk)
            statuses = []
            for i in range(50):  # the WAL may still have room for a few pages
                response = await zenow.client.post(f"/api/sessions/{sid}/messages",
                                                   json={"role": "user", "content": f"{i} " + "x" * 20_000})
                statuses.append(response.status_code)
                if response.status_code != 200:
                    break
            assert response.status_code == 507, response.text
            assert "disk is full" in response.json()["detail"]
            # reads still work, and nothing half-written: the count matches the messages
            session = (await zenow.client.get(f"/api/sessions/{sid}")).json()
            messages = (await zenow.client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
            assert session["message_count"] == len(messages) == statuses.count(200) + 1
            health = await zenow.client.get("/api/health")
            assert health.json()["status"] == "healthy"
            filler.unlink()
            await add_message(zenow.client, sid, "user", "after making room")
            assert (await zenow.client.get(f"/api/sessions/{sid}")).json()["message_count"] == len(messages) + 1


def test_a_read_only_database_is_a_503_that_says_nothing_was_saved(tmp_path):
    """A database that cannot be written (a read-only file, folder or mount) maps to 503."""
    import sqlite3

    from zenow.errors import StoreReadOnly
    from zenow.store import _queries as q
    from zenow.store._actor import _store_error

    q.open_database(tmp_path / "zenow.db").close()
    reader = sqlite3.connect(f"{(tmp_path / 'zenow.db').as_uri()}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.Error) as caught:
            q.create_session(reader, "x")
    finally:
        reader.close()
    error = _store_error(caught.value)
    assert isinstance(error, StoreReadOnly)
    assert error.status_code == 503 and "nothing was saved" in str(error)
