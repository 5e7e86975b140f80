"""Downloads (spec 1.4, 1.5, 1.8) against a real HTTP file server on 127.0.0.1.

The server (tests/support/file_server.py) drops connections, holds responses,
ignores ranges, redirects or answers errors on request, and counts the bytes it sent,
so the tests can tell a resumed download from one fetched twice.  The sections on
limits, discarding, credentials, hostile answers, existing files and redirects each
failed on the code before they were written.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import signal
import sqlite3
from contextlib import closing
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.file_server import EMPTY_GGUF_HEADER, FileServer, SeenRequest
from tests.support.harness import make_settings, spawn_zenow, start_zenow, wait_for
from tests.support.llama import FAKE_LLAMA_SERVER
from zenow.actor import Supervisor
from zenow.downloads import CANCELLED, INTERRUPTED, DownloadActor, DownloadPolicy, Downloads, FileAlreadyExists
from zenow.errors import DownloadFailed, DownloadNotFound, InvalidModelFile, InvalidRequest
from zenow.store import Store, StoreActor

KB = 1024
MB = 1024 * KB
RECORD_FIELDS = ["url", "filename", "status", "downloaded", "total", "progress", "error"]


def gguf(size: int, seed: int = 0) -> bytes:
    """A test model file: a valid GGUF header and random bytes."""
    return EMPTY_GGUF_HEADER + random.Random(seed).randbytes(size - len(EMPTY_GGUF_HEADER))


@pytest.fixture
async def files(nursery: trio.Nursery) -> FileServer:
    server = FileServer()
    await server.start(nursery)
    return server


async def post(client, **body):
    return await client.post("/api/models/download", json=body)


async def delete(client, url: str, **params) -> httpx.Response:
    return await client.delete("/api/models/download", params={"url": url, **params})


async def status(client, url: str) -> dict:
    response = await client.get("/api/models/download/status", params={"url": url})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and list(body["download"]) == RECORD_FIELDS
    return body["download"]


async def wait_status(client, url: str, check, what: str) -> dict:
    async def probe():
        download = await status(client, url)
        return download if check(download) else None

    return await wait_for(probe, timeout=10, what=what)


async def finished(client, url: str) -> dict:
    return await wait_status(client, url, lambda d: d["status"] != "downloading", f"{url} to finish")


async def reaches(client, url: str, size: int) -> dict:
    return await wait_status(client, url, lambda d: d["downloaded"] >= size, f"{url} to reach {size} bytes")


def models_in(settings) -> list[tuple]:
    with closing(sqlite3.connect(settings.database_path)) as db:
        return db.execute("SELECT name, mode, path, source_url, size FROM models ORDER BY id").fetchall()


def stored_download(settings, url: str) -> tuple[str, int]:
    with closing(sqlite3.connect(settings.database_path)) as db:
        return db.execute("SELECT status, downloaded FROM downloads WHERE url = ?", (url,)).fetchone()


def files_under(settings) -> list[str]:
    return sorted(str(p.relative_to(settings.models_dir)) for p in settings.models_dir.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the happy path


async def test_a_download_is_checked_renamed_into_place_and_registered(client, files, settings):
    data = gguf(700 * KB)
    served = files.add("/m/Tiny-Q4_0.gguf", data)
    url = files.url("/m/Tiny-Q4_0.gguf")

    response = await post(client, url=url, filename="Tiny-Q4_0.gguf", mode="embed")
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "url": url, "mode": "embed", "message": "Download started"}

    done = await finished(client, url)
    assert done == {"url": url, "filename": "Tiny-Q4_0.gguf", "status": "completed", "downloaded": len(data),
                    "total": len(data), "progress": 100.0, "error": None}
    final = settings.mode_dir("embed") / "Tiny-Q4_0.gguf"
    assert final.read_bytes() == data
    assert files_under(settings) == ["embed/Tiny-Q4_0.gguf"]  # no .part left
    assert models_in(settings) == [("Tiny-Q4_0", "embed", str(final), url, len(data))]
    assert served.requests == [SeenRequest("/m/Tiny-Q4_0.gguf", None, 200)]


async def test_the_filename_defaults_to_the_last_segment_of_the_url(client, files, settings):
    data = gguf(300 * KB)
    files.add("/Qwen/resolve/master/qwen2.5-0.5b-instruct-q4_0.gguf", data)
    url = files.url("/Qwen/resolve/master/qwen2.5-0.5b-instruct-q4_0.gguf") + "?download=true"

    response = await post(client, url=url)
    assert response.json() == {"success": True, "url": url, "mode": "llm", "message": "Download started"}
    done = await finished(client, url)
    assert done["status"] == "completed" and done["filename"] == "qwen2.5-0.5b-instruct-q4_0.gguf"
    assert [m[:2] for m in models_in(settings)] == [("qwen2.5-0.5b-instruct-q4_0", "llm")]


async def test_a_download_of_unknown_size_shows_total_null_until_it_is_done(client, files, settings):
    data = gguf(300 * KB)
    served = files.add("/unsized.gguf", data, send_length=False, holds=[100 * KB])
    url = files.url("/unsized.gguf")

    await post(client, url=url)
    running = await reaches(client, url, 100 * KB)
    assert (running["status"], running["total"], running["progress"]) == ("downloading", None, 0.0)
    served.release.set()
    done = await finished(client, url)
    assert (done["status"], done["downloaded"], done["total"], done["progress"]) == (
        "completed", len(data), len(data), 100.0)


async def test_a_file_this_url_downloaded_before_is_used_and_not_fetched_again(nursery, files, settings):
    data = gguf(200 * KB)
    served = files.add("/present.gguf", data)
    url = files.url("/present.gguf")
    async with start_zenow(nursery, settings) as first:
        await post(first.client, url=url)
        assert (await finished(first.client, url))["status"] == "completed"

    async with start_zenow(nursery, settings) as again:  # the record says so, also after a restart
        response = await post(again.client, url=url)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "success": True, "url": url, "mode": "llm",
            "message": "Already downloaded: the existing file llm/present.gguf is used; nothing was fetched",
        }
        assert await status(again.client, url) == {
            "url": url, "filename": "present.gguf", "status": "completed", "downloaded": len(data),
            "total": len(data), "progress": 100.0, "error": None}
    assert len(served.requests) == 1  # fetched once, by the first download
    assert [m[:2] for m in models_in(settings)] == [("present", "llm")]


async def test_a_file_of_unknown_origin_is_refused_with_409_and_left_alone(client, files, settings):
    data = gguf(200 * KB)
    served = files.add("/present.gguf", data)
    url = files.url("/present.gguf")
    present = settings.mode_dir("llm") / "present.gguf"
    present.write_bytes(data)

    refused = await post(client, url=url)
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"] == (
        f"filename: {present} already exists and was not downloaded from this URL;"
        " pick another filename or delete that file")

    junk = settings.mode_dir("llm") / "junk.gguf"
    junk.write_bytes(b"not a model")
    refused = await post(client, url=url, filename="junk.gguf")
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith(f"filename: {junk} already exists and is not a GGUF file;")

    assert served.requests == []  # nothing fetched, nothing claimed
    assert (await client.get("/api/models/download/status")).json()["downloads"] == []
    assert models_in(settings) == []
    assert present.read_bytes() == data and junk.read_bytes() == b"not a model"


async def test_a_file_another_url_downloaded_is_refused_with_409(client, files, settings):
    files.add("/v1/model.gguf", gguf(100 * KB, seed=1))
    other = files.add("/v2/model.gguf", gguf(100 * KB, seed=2))
    first, second = files.url("/v1/model.gguf"), files.url("/v2/model.gguf")
    await post(client, url=first)
    assert (await finished(client, first))["status"] == "completed"

    refused = await post(client, url=second)
    assert refused.status_code == 409 and "was not downloaded from this URL" in refused.json()["detail"]
    assert other.requests == []


async def test_a_file_with_the_asked_sha256_is_used_and_another_digest_is_refused(client, files, settings):
    data = gguf(300 * KB)
    served = files.add("/hashed-present.gguf", data)
    url = files.url("/hashed-present.gguf")
    (settings.mode_dir("embed") / "hashed-present.gguf").write_bytes(data)
    wrong = hashlib.sha256(b"another file").hexdigest()

    refused = await post(client, url=url, mode="embed", sha256=wrong)
    assert refused.status_code == 409
    assert f"its sha256 is {hashlib.sha256(data).hexdigest()}, not the {wrong} asked for" in refused.json()["detail"]

    used = await post(client, url=url, mode="embed", sha256=hashlib.sha256(data).hexdigest())
    assert used.status_code == 200, used.text
    assert used.json()["message"] == (
        "Already downloaded: the existing file embed/hashed-present.gguf is used; nothing was fetched")
    assert (await status(client, url))["status"] == "completed"
    assert served.requests == []
    assert [m[:2] for m in models_in(settings)] == [("hashed-present", "embed")]


# ---------------------------------------------------------------- resume


async def test_a_dropped_connection_resumes_where_it_stopped(client, files, settings):
    data = gguf(1024 * KB)
    served = files.add("/flaky.gguf", data, drops=[200 * KB, 500 * KB])
    url = files.url("/flaky.gguf")

    await post(client, url=url)
    assert (await finished(client, url))["status"] == "completed"
    assert served.ranges_asked == [None, f"bytes={200 * KB}-", f"bytes={700 * KB}-"]
    assert [r.status for r in served.requests] == [200, 206, 206]
    assert served.sent == len(data)  # fetched once in total, not twice
    assert (settings.mode_dir("llm") / "flaky.gguf").read_bytes() == data


async def test_a_server_that_ignores_the_range_gets_a_fresh_start(client, files, settings):
    data = gguf(600 * KB)
    served = files.add("/norange.gguf", data, ranges=False, drops=[300 * KB])
    url = files.url("/norange.gguf")

    await post(client, url=url)
    assert (await finished(client, url))["status"] == "completed"
    assert served.ranges_asked == [None, f"bytes={300 * KB}-"]
    assert [r.status for r in served.requests] == [200, 200]
    assert (settings.mode_dir("llm") / "norange.gguf").read_bytes() == data  # not the first 300 KB twice


async def test_a_part_left_behind_is_resumed_when_the_url_is_asked_again(client, files, settings):
    data = gguf(800 * KB)
    served = files.add("/left.gguf", data)
    (settings.mode_dir("rerank") / "left.gguf.part").write_bytes(data[: 300 * KB])
    url = files.url("/left.gguf")

    await post(client, url=url, mode="rerank")
    assert (await finished(client, url))["status"] == "completed"
    assert served.ranges_asked == [f"bytes={300 * KB}-"]
    assert served.sent == len(data) - 300 * KB
    assert (settings.mode_dir("rerank") / "left.gguf").read_bytes() == data


async def test_a_download_survives_a_restart_of_zenow_and_resumes(nursery, files, settings):
    data = gguf(1024 * KB)
    served = files.add("/restart.gguf", data, trickle=0.01, chunk_size=16 * KB)  # about 1.6 MB/s
    small = gguf(100 * KB, seed=1)
    files.add("/small.gguf", small)
    url, small_url = files.url("/restart.gguf"), files.url("/small.gguf")

    async with start_zenow(nursery, settings) as first:
        await post(first.client, url=small_url)
        assert (await finished(first.client, small_url))["status"] == "completed"
        await post(first.client, url=url)
        await reaches(first.client, url, 256 * KB)
    # zenow stopped in the middle of the download
    part = settings.mode_dir("llm") / "restart.gguf.part"
    kept = part.stat().st_size
    assert 256 * KB <= kept < len(data)

    async with start_zenow(nursery, settings) as second:
        listed = (await second.client.get("/api/models/download/status")).json()["downloads"]
        assert [(d["url"], d["status"]) for d in listed] == [(small_url, "completed"), (url, "failed")]
        assert await status(second.client, url) == {
            "url": url, "filename": "restart.gguf", "status": "failed", "downloaded": kept,
            "total": len(data), "progress": round(kept * 100 / len(data), 2), "error": INTERRUPTED,
        }
        served.trickle = 0
        await post(second.client, url=url)
        assert (await finished(second.client, url))["status"] == "completed"

    assert served.ranges_asked == [None, f"bytes={kept}-"]
    assert served.sent < len(data) + 128 * KB  # only what was in flight at the stop came twice
    assert (settings.mode_dir("llm") / "restart.gguf").read_bytes() == data


async def test_a_crash_mid_download_leaves_a_part_that_is_resumed(nursery, files, settings):
    data = gguf(2048 * KB)
    served = files.add("/crash.gguf", data, trickle=0.01, chunk_size=8 * KB)  # about 800 KB/s
    url = files.url("/crash.gguf")
    part = settings.mode_dir("llm") / "crash.gguf.part"

    crashing = await spawn_zenow(nursery, settings.home)
    async with httpx.AsyncClient(base_url=crashing.url) as client:
        assert (await post(client, url=url)).status_code == 200

    async def part_written() -> bool:
        return part.exists() and part.stat().st_size >= 64 * KB

    await wait_for(part_written, timeout=10, what="the .part to grow")
    crashing.process.send_signal(signal.SIGKILL)
    await crashing.process.wait()
    kept = part.stat().st_size

    async with start_zenow(nursery, settings) as again:
        interrupted = await status(again.client, url)
        assert (interrupted["status"], interrupted["error"], interrupted["downloaded"]) == ("failed", INTERRUPTED, kept)
        served.trickle = 0
        await post(again.client, url=url)
        assert (await finished(again.client, url))["status"] == "completed"

    assert served.ranges_asked == [None, f"bytes={kept}-"]
    assert served.requests[1].status == 206
    assert (settings.mode_dir("llm") / "crash.gguf").read_bytes() == data


# ---------------------------------------------------------------- several at once, join, cancel


async def test_two_requests_for_one_url_share_one_transfer(client, files, settings):
    data = gguf(512 * KB)
    served = files.add("/shared.gguf", data, holds=[64 * KB])
    url = files.url("/shared.gguf")

    first, second = await post(client, url=url), await post(client, url=url, filename="shared.gguf")
    assert first.json()["message"] == second.json()["message"] == "Download started"
    await reaches(client, url, 64 * KB)
    elsewhere = await post(client, url=url, filename="other.gguf")
    assert elsewhere.status_code == 400 and elsewhere.json()["detail"].startswith("filename:")

    served.release.set()
    assert (await finished(client, url))["status"] == "completed"
    assert len(served.requests) == 1 and served.sent == len(data)


async def test_downloads_run_at_the_same_time(client, files, settings):
    a = files.add("/a.gguf", gguf(400 * KB, seed=2), holds=[100 * KB])
    b = files.add("/b.gguf", gguf(400 * KB, seed=3), holds=[100 * KB])
    url_a, url_b = files.url("/a.gguf"), files.url("/b.gguf")

    await post(client, url=url_a)
    await post(client, url=url_b, mode="embed")
    for url in (url_a, url_b):
        assert (await reaches(client, url, 100 * KB))["status"] == "downloading"
    assert (await client.get("/api/health")).status_code == 200  # the rest of zenow is not blocked

    a.release.set()
    b.release.set()
    assert (await finished(client, url_a))["status"] == (await finished(client, url_b))["status"] == "completed"
    assert (settings.mode_dir("embed") / "b.gguf").read_bytes() == b.data


async def test_progress_lives_in_memory_and_the_store_gets_no_write_per_chunk(client, files, settings):
    data = gguf(1000 * KB)
    served = files.add("/progress.gguf", data, holds=[256 * KB], chunk_size=4 * KB)
    url = files.url("/progress.gguf")

    await post(client, url=url)
    now = await reaches(client, url, 256 * KB)
    assert now["status"] == "downloading" and now["total"] == len(data) and now["error"] is None
    assert now["progress"] == round(256 * KB * 100 / len(data), 2) and isinstance(now["progress"], float)
    assert stored_download(settings, url) == ("downloading", 0)  # saved when it started, not per chunk

    served.release.set()
    await finished(client, url)
    assert stored_download(settings, url) == ("completed", len(data))


async def test_cancel_keeps_the_part_and_the_next_request_resumes_it(client, files, settings):
    data = gguf(700 * KB)
    served = files.add("/cancel.gguf", data, holds=[128 * KB])
    url = files.url("/cancel.gguf")

    await post(client, url=url)
    await reaches(client, url, 128 * KB)
    response = await client.delete("/api/models/download", params={"url": url})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["message"] == "Download cancelled"
    assert (body["download"]["status"], body["download"]["error"]) == ("failed", CANCELLED)
    assert (await status(client, url))["error"] == CANCELLED
    assert files_under(settings) == ["llm/cancel.gguf.part"]
    assert (settings.mode_dir("llm") / "cancel.gguf.part").stat().st_size == 128 * KB

    await post(client, url=url, sha256=hashlib.sha256(data).hexdigest())  # checked over the kept bytes too
    assert (await finished(client, url))["status"] == "completed"
    assert served.ranges_asked == [None, f"bytes={128 * KB}-"]
    assert served.sent == len(data)

    again = (await client.delete("/api/models/download", params={"url": url})).json()
    assert again["download"]["status"] == "completed"  # nothing running: nothing changes
    unknown = await client.delete("/api/models/download", params={"url": files.url("/never.gguf")})
    assert unknown.status_code == 404 and "detail" in unknown.json()
    assert (await client.delete("/api/models/download")).status_code == 400


async def test_a_part_of_another_url_is_not_resumed(client, files, settings):
    first = files.add("/v1/same.gguf", gguf(400 * KB, seed=6), holds=[100 * KB])
    second = files.add("/v2/same.gguf", gguf(400 * KB, seed=7))
    url_1, url_2 = files.url("/v1/same.gguf"), files.url("/v2/same.gguf")

    await post(client, url=url_1)
    await reaches(client, url_1, 100 * KB)
    await client.delete("/api/models/download", params={"url": url_1})
    await post(client, url=url_2)
    assert (await finished(client, url_2))["status"] == "completed"
    assert second.ranges_asked == [None]  # started over: those 100 KB were another file's
    assert (settings.mode_dir("llm") / "same.gguf").read_bytes() == second.data
    assert (await status(client, url_1))["downloaded"] == 0
    assert len(first.requests) == 1


# ---------------------------------------------------------------- checks and failures


async def test_a_sha256_mismatch_fails_and_registers_nothing(client, files, settings):
    data = gguf(300 * KB)
    files.add("/hashed.gguf", data)
    url = files.url("/hashed.gguf")

    await post(client, url=url, sha256=hashlib.sha256(b"something else").hexdigest())
    failed = await finished(client, url)
    assert failed["status"] == "failed" and failed["error"].startswith("sha256 mismatch")
    assert files_under(settings) == [] and models_in(settings) == []

    await post(client, url=url, sha256=hashlib.sha256(data).hexdigest().upper())
    assert (await finished(client, url))["status"] == "completed"
    assert [m[0] for m in models_in(settings)] == ["hashed"]


async def test_a_response_that_is_not_gguf_is_described_never_quoted(client, files, settings):
    page = b"<html><title>SECRET-PAGE</title>" + random.Random(4).randbytes(200 * KB)
    served = files.add("/fake.gguf", page, content_type="text/html; charset=utf-8")
    files.add("/odd-type.gguf", page, content_type="<script>SECRET-TYPE</script>")
    url, odd = files.url("/fake.gguf"), files.url("/odd-type.gguf")

    await post(client, url=url)
    await post(client, url=odd)
    failed = await finished(client, url)
    assert failed["status"] == "failed"
    assert failed["error"] == "the server's response is not a GGUF file (HTTP 200, text/html)"
    assert (await finished(client, odd))["error"] == (
        "the server's response is not a GGUF file (HTTP 200, an unreadable Content-Type)")
    assert files_under(settings) == [] and models_in(settings) == []
    assert served.sent < 200 * KB  # it stopped at the first bytes


async def test_upstream_failures_end_in_failed_with_the_reason_and_zenow_keeps_serving(client, files, settings):
    files.add("/tls.gguf", gguf(100 * KB))
    files.add("/huge.gguf", gguf(100 * KB), announce_length=2**60)
    cases = {
        files.url("/missing.gguf"): "HTTP 404",
        files.url("/tls.gguf", scheme="https"): "TLS error",
        files.url("/huge.gguf"): "too large: the server announces 1 EiB, over the limit of 64 GiB (max_download_size)",
    }
    for url in cases:
        assert (await post(client, url=url)).status_code == 200
    for url, reason in cases.items():
        failed = await finished(client, url)
        assert failed["status"] == "failed" and failed["error"].startswith(reason), failed
        assert failed["progress"] == 0.0
    assert files_under(settings) == [] and models_in(settings) == []
    assert (await client.get("/api/health")).status_code == 200


async def test_bad_input_is_refused_with_400_and_nothing_is_written(client, files, settings):
    served = files.add("/ok.gguf", gguf(100 * KB))
    ok = files.url("/ok.gguf")
    bad = [
        ({"url": "file:///etc/passwd", "filename": "x.gguf"}, "url"),
        ({"url": "ftp://example.com/x.gguf"}, "url"),
        ({"url": "example.com/x.gguf"}, "url"),
        ({"url": ""}, "url"),
        ({"url": 42}, "url"),
        ({"filename": "x.gguf"}, "url"),
        ({"url": ok, "filename": "sub/x.gguf"}, "filename"),
        ({"url": ok, "filename": "sub\\x.gguf"}, "filename"),
        ({"url": ok, "filename": "../x.gguf"}, "filename"),
        ({"url": ok, "filename": ".."}, "filename"),
        ({"url": ok, "filename": ".hidden.gguf"}, "filename"),
        ({"url": ok, "filename": "nul\x00.gguf"}, "filename"),
        ({"url": ok, "filename": "model.bin"}, "filename"),
        ({"url": ok, "filename": ""}, "filename"),
        ({"url": files.url("/model.bin")}, "filename"),
        ({"url": files.url("/dir/")}, "filename"),
        ({"url": files.url("/x/..%2F..%2Fescape.gguf")}, "filename"),
        ({"url": ok, "mode": "chat"}, "mode"),
        ({"url": ok, "sha256": "abc"}, "sha256"),
    ]
    for body, field in bad:
        response = await post(client, **body)
        assert response.status_code == 400, (body, response.text)
        assert field in response.json()["detail"].lower(), (body, response.json())
    assert (await client.get("/api/models/download/status")).json() == {"success": True, "downloads": []}
    assert files_under(settings) == [] and served.requests == []
    assert stored_download(settings, ok) is None


async def test_status_lists_every_download_and_an_unknown_url_is_404(client, files):
    files.add("/one.gguf", gguf(100 * KB))
    files.add("/two.gguf", gguf(100 * KB, seed=5))
    urls = [files.url("/one.gguf"), files.url("/two.gguf")]
    for url in urls:
        await post(client, url=url)
        await finished(client, url)

    body = (await client.get("/api/models/download/status")).json()
    assert body["success"] is True and isinstance(body["downloads"], list)
    assert [d["url"] for d in body["downloads"]] == urls
    assert all(list(d) == RECORD_FIELDS and d["status"] == "completed" for d in body["downloads"])

    unknown = await client.get("/api/models/download/status", params={"url": files.url("/three.gguf")})
    assert unknown.status_code == 404 and unknown.json()["detail"]


async def test_default_urls_have_the_spec_shape(client, settings):
    response = await client.get("/api/downloads/default-urls")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["urls", "browser_path"]
    assert set(body["urls"]) == {"llm", "embed", "rerank"}
    assert body["urls"] == {mode: list(urls) for mode, urls in settings.default_urls.items()}
    assert all(u.startswith("https://") and u.endswith(".gguf") for urls in body["urls"].values() for u in urls)
    assert body["browser_path"] == settings.browser_path == "https://modelscope.cn/models"


async def test_load_with_a_download_url_downloads_through_the_actor_then_starts_the_server(
        nursery, files, tmp_path, tiny_models):
    settings = make_settings(tmp_path / "load-home", llama_server=str(FAKE_LLAMA_SERVER), stop_grace=1.0)
    data = tiny_models["llm"].read_bytes()  # a whole model: loading checks the GGUF header
    served = files.add("/remote/model.gguf", data, drops=[100 * KB])
    url = files.url("/remote/model.gguf")

    async with start_zenow(nursery, settings) as zenow:
        response = await zenow.client.post("/api/models/load",
                                           json={"model_name": "remote-q4", "download_url": url, "mode": "llm"})
        assert response.status_code == 200, response.text
        loaded = response.json()
        final = settings.mode_dir("llm") / "remote-q4.gguf"
        assert (loaded["model_path"], loaded["server_status"]) == (str(final), "running")
        assert (await status(zenow.client, url))["status"] == "completed"
    assert final.read_bytes() == data
    assert served.ranges_asked == [None, f"bytes={100 * KB}-"]  # resumed inside the load


# ---------------------------------------------------------------- limits: size and free space


async def test_a_body_of_unknown_size_is_cut_off_at_max_download_size(nursery, files, tmp_path):
    # a server once pushed 772 MB in 8 s into the home: no Content-Length, no limit
    settings = make_settings(tmp_path / "home", max_download_size=256 * KB)
    endless = b"GGUF" + bytes(32 * MB)
    served = files.add("/endless.gguf", endless, send_length=False)
    url = files.url("/endless.gguf")

    async with start_zenow(nursery, settings) as zenow:
        await post(zenow.client, url=url)
        failed = await finished(zenow.client, url)
    assert (failed["status"], failed["downloaded"], failed["total"]) == ("failed", 0, None)
    assert failed["error"] == ("too large: the server sent more than 256 KiB without announcing a size;"
                               " the limit is 256 KiB (max_download_size)")
    assert files_under(settings) == []  # the .part is deleted: it can never complete under the limit
    assert served.sent < 16 * MB  # stopped reading, not drained (at most the socket buffers were sent)


async def test_an_announced_size_over_max_download_size_is_refused_at_once(nursery, files, tmp_path):
    settings = make_settings(tmp_path / "home", max_download_size=256 * KB)
    data = gguf(1 * MB)
    files.add("/big.gguf", data, holds=[0])  # nothing of the body would ever come
    resumed = files.add("/big-part.gguf", data, holds=[0])
    settings.mode_dir("rerank").mkdir(parents=True)
    (settings.mode_dir("rerank") / "big-part.gguf.part").write_bytes(data[:100 * KB])
    url, part_url = files.url("/big.gguf"), files.url("/big-part.gguf")

    async with start_zenow(nursery, settings) as zenow:
        await post(zenow.client, url=url)
        await post(zenow.client, url=part_url, mode="rerank")
        for each in (url, part_url):
            failed = await finished(zenow.client, each)
            assert (failed["status"], failed["downloaded"]) == ("failed", 0)
            assert failed["error"] == ("too large: the server announces 1 MiB, over the limit of 256 KiB"
                                       " (max_download_size)")
    assert resumed.requests[0].status == 206  # the total came from Content-Range
    assert files_under(settings) == []


async def test_a_download_that_would_eat_the_free_margin_is_refused_on_the_real_disk(nursery, files, tmp_path):
    settings = make_settings(tmp_path / "home", download_free_margin=2**62)  # more than any disk has
    files.add("/sized.gguf", gguf(300 * KB), holds=[0])
    files.add("/unsized.gguf", gguf(300 * KB, seed=1), holds=[0], send_length=False)
    sized, unsized = files.url("/sized.gguf"), files.url("/unsized.gguf")

    async with start_zenow(nursery, settings) as zenow:
        await post(zenow.client, url=sized)
        await post(zenow.client, url=unsized)
        refused = await finished(zenow.client, sized)
        assert refused["error"].startswith("not enough disk space: the download needs 300 KiB more, ")
        assert refused["error"].endswith(f" are free in {settings.mode_dir('llm')}, and 4 EiB must stay free"
                                         " (download_free_margin)")
        refused = await finished(zenow.client, unsized)
        assert refused["error"].startswith("not enough disk space: ")
        assert refused["error"].endswith("after 0 bytes of a file whose size the server did not announce,"
                                         " and 4 EiB must stay free (download_free_margin)")
    assert files_under(settings) == []


# ---------------------------------------------------------------- discarding a partial download


async def test_discard_cancels_deletes_the_part_and_forgets_the_download(client, files, settings):
    data = gguf(700 * KB)
    served = files.add("/discard.gguf", data, holds=[128 * KB])
    url = files.url("/discard.gguf")

    await post(client, url=url)
    await reaches(client, url, 128 * KB)
    response = await delete(client, url, discard="true")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "success": True, "discarded": True,
        "message": "Download cancelled and discarded: its partial file was deleted and its record removed",
        "download": {"url": url, "filename": "discard.gguf", "status": "failed", "downloaded": 128 * KB,
                     "total": len(data), "progress": round(128 * KB * 100 / len(data), 2), "error": CANCELLED},
    }
    assert files_under(settings) == []
    assert stored_download(settings, url) is None  # gone from the store: a restart does not bring it back
    assert (await client.get("/api/models/download/status", params={"url": url})).status_code == 404
    assert (await client.get("/api/models/download/status")).json()["downloads"] == []

    served.release.set()
    await post(client, url=url)
    assert (await finished(client, url))["status"] == "completed"
    assert served.ranges_asked == [None, None]  # started over: nothing was left to resume


async def test_discard_of_a_stopped_download_deletes_its_part_and_keeps_a_completed_file(client, files, settings):
    files.add("/stopped.gguf", gguf(400 * KB), holds=[64 * KB])
    files.add("/done.gguf", gguf(100 * KB, seed=1))
    stopped, done = files.url("/stopped.gguf"), files.url("/done.gguf")
    await post(client, url=stopped)
    await reaches(client, stopped, 64 * KB)
    await delete(client, stopped)  # cancel only: the .part stays for a resume, as before
    assert files_under(settings) == ["llm/stopped.gguf.part"]
    await post(client, url=done)
    await finished(client, done)

    assert (await delete(client, stopped, discard="maybe")).status_code == 400
    body = (await delete(client, stopped, discard="true")).json()
    assert body["message"] == "Download discarded: its partial file was deleted and its record removed"
    assert files_under(settings) == ["llm/done.gguf"]

    body = (await delete(client, done, discard="true")).json()
    assert body["message"] == "Download record removed; the downloaded model file is kept"
    assert files_under(settings) == ["llm/done.gguf"]
    assert [m[0] for m in models_in(settings)] == ["done"]
    assert (await delete(client, done, discard="true")).status_code == 404


# ---------------------------------------------------------------- credentials in a URL


async def test_credentials_in_a_url_are_sent_as_basic_auth_and_never_shown(client, files, settings, caplog):
    caplog.set_level(logging.DEBUG)
    data = gguf(200 * KB)
    served = files.add("/private.gguf", data)
    url = f"http://alice:s3cret@127.0.0.1:{files.port}/private.gguf"
    shown = f"http://***@127.0.0.1:{files.port}/private.gguf"
    missing = f"http://alice:s3cret@127.0.0.1:{files.port}/missing.gguf"

    started = await post(client, url=url)
    assert started.json() == {"success": True, "url": shown, "mode": "llm", "message": "Download started"}
    assert (await finished(client, url))["status"] == "completed"
    await post(client, url=missing)
    failed = await finished(client, missing)
    assert failed["error"] == f"HTTP 404 Not Found from http://127.0.0.1:{files.port}/missing.gguf"

    assert (await status(client, url))["url"] == shown  # looked up by the URL the client sent...
    assert (await status(client, shown))["url"] == shown  # ...or by the one it was shown
    listing = await client.get("/api/models/download/status")
    assert [d["url"] for d in listing.json()["downloads"]] == [shown, shown.replace("private", "missing")]
    refused = await post(client, url="ftp://bob:hunter2@example.com/x.gguf")
    assert refused.status_code == 400 and "hunter2" not in refused.text
    refused = await post(client, url="https://bob:hun/ter2@example.com/x.gguf")
    assert refused.status_code == 400 and "hun" not in refused.text
    assert "s3cret" not in started.text + failed["error"] + listing.text

    request = served.requests[0]
    assert request.target == "/private.gguf"  # not in the request line...
    assert request.authorization == "Basic " + base64.b64encode(b"alice:s3cret").decode()  # ...but as Basic auth
    assert models_in(settings)[0][3] == shown  # the model registry keeps no password either
    leaks = [r.getMessage() for r in caplog.records
             if "s3cret" in r.getMessage() and "/api/models/download" not in r.getMessage()]  # the test's own requests
    assert leaks == []


# ---------------------------------------------------------------- redirects


async def test_a_redirect_is_followed_with_the_range_and_one_to_another_scheme_is_refused(client, files, settings):
    data = gguf(300 * KB)
    real = files.add("/real.gguf", data, drops=[100 * KB])
    files.add("/moved.gguf", b"", location=files.url("/real.gguf"))
    files.add("/to-ftp.gguf", b"", location="ftp://127.0.0.1/x.gguf")
    files.add("/to-file.gguf", b"", location="file:///etc/passwd", status=301)
    moved, to_ftp, to_file = files.url("/moved.gguf"), files.url("/to-ftp.gguf"), files.url("/to-file.gguf")

    for url in (moved, to_ftp, to_file):
        await post(client, url=url)
    assert (await finished(client, moved))["status"] == "completed"
    assert real.ranges_asked == [None, f"bytes={100 * KB}-"]  # resumed through the redirect
    assert (settings.mode_dir("llm") / "moved.gguf").read_bytes() == data
    for url, scheme in ((to_ftp, "ftp"), (to_file, "file")):
        failed = await finished(client, url)
        assert failed["error"] == (f"redirect refused: {url} redirected to a URL with scheme '{scheme}';"
                                   " only http and https URLs are followed")
    assert files_under(settings) == ["llm/moved.gguf"]


# ---------------------------------------------------------------- the handle other actors use

FAST = DownloadPolicy(backoff_initial=0.01, backoff_max=0.04, attempts_without_progress=3)


async def download_actor(nursery: trio.Nursery, settings, policy: DownloadPolicy = FAST) -> Downloads:
    """The download actor alone, over a real store."""
    supervisor = Supervisor(nursery)
    store = Store(await supervisor.start("store", partial(StoreActor, settings.database_path), critical=True))
    return Downloads(await supervisor.start("download actor", partial(DownloadActor, settings, store, policy)))


@pytest.fixture
async def downloads(nursery: trio.Nursery, settings) -> Downloads:
    """The download actor alone, over a real store, with short retries."""
    return await download_actor(nursery, settings)


async def reached(downloads: Downloads, url: str, size: int) -> None:
    """Wait until the handle reports `size` bytes of `url` received (once the download exists)."""

    async def probe() -> bool:
        try:
            return (await downloads.status(url)).downloaded >= size
        except DownloadNotFound:
            return False

    await wait_for(probe, timeout=10, what=f"{url} to reach {size} bytes")


async def test_fetch_waits_for_the_file_and_raises_when_it_fails(downloads, files, settings):
    data = gguf(500 * KB)
    # more drops than attempts allowed without progress: each drop made progress, so it goes on
    served = files.add("/fetched.gguf", data, drops=[100 * KB] * 4)
    record = await downloads.fetch(files.url("/fetched.gguf"), None, "rerank")
    assert (record.status, record.downloaded, record.total, record.error) == ("completed", len(data), len(data), None)
    assert len(served.requests) == 5 and served.sent == len(data)
    assert (settings.mode_dir("rerank") / "fetched.gguf").read_bytes() == data

    with pytest.raises(DownloadFailed, match="HTTP 404"):
        await downloads.fetch(files.url("/absent.gguf"), None, "llm")
    with pytest.raises(InvalidRequest, match=r"^url:"):
        await downloads.fetch("file:///etc/passwd", "x.gguf", "llm")


async def test_a_download_gives_up_after_attempts_without_progress(downloads, files):
    served = files.add("/busy.gguf", gguf(100 * KB), status=503)
    with pytest.raises(DownloadFailed, match=r"HTTP 503 .*gave up after 3 attempts"):
        await downloads.fetch(files.url("/busy.gguf"), None, "llm")
    assert len(served.requests) == 3


async def test_cancelling_a_waiting_caller_does_not_cancel_the_download(downloads, files):
    served = files.add("/patient.gguf", gguf(300 * KB), holds=[32 * KB])
    url = files.url("/patient.gguf")

    async with trio.open_nursery() as waiting:
        waiting.start_soon(downloads.fetch, url, None, "llm")
        await reached(downloads, url, 32 * KB)
        waiting.cancel_scope.cancel()
    assert (await downloads.status(url)).status == "downloading"

    served.release.set()
    assert (await downloads.fetch(url, None, "llm")).status == "completed"  # joins the same transfer
    assert len(served.requests) == 1


async def test_a_fetch_of_a_cancelled_download_fails_with_cancelled(downloads, files, settings):
    files.add("/stopped.gguf", gguf(300 * KB), holds=[32 * KB])
    url = files.url("/stopped.gguf")
    outcome: list[BaseException] = []

    async def fetch() -> None:
        try:
            await downloads.fetch(url, None, "llm")
        except DownloadFailed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        await reached(downloads, url, 32 * KB)
        record = await downloads.cancel(url)
    assert (record.status, record.error, record.downloaded) == ("failed", CANCELLED, 32 * KB)
    assert len(outcome) == 1 and str(outcome[0]).endswith(f"failed: {CANCELLED}")
    assert (settings.mode_dir("llm") / "stopped.gguf.part").stat().st_size == 32 * KB


class NearlyFullDisk:
    """A file system of `capacity` bytes that holds the models folder and nothing else."""

    def __init__(self, models: Path, capacity: int) -> None:
        self.models = models
        self.capacity = capacity
        self.asked: list[Path] = []

    def __call__(self, directory: Path) -> int:
        self.asked.append(directory)
        return self.capacity - sum(p.stat().st_size for p in self.models.rglob("*") if p.is_file())


async def test_a_download_of_unknown_size_stops_before_the_disk_fills_and_keeps_its_part(nursery, files, tmp_path):
    settings = make_settings(tmp_path / "home", download_free_margin=1 * MB)
    disk = NearlyFullDisk(settings.models_dir, capacity=3 * MB)
    downloads = await download_actor(nursery, settings, DownloadPolicy(
        backoff_initial=0.01, attempts_without_progress=3, flush_bytes=64 * KB, free_space=disk))
    data = gguf(4 * MB)
    served = files.add("/unsized.gguf", data, send_length=False)
    url = files.url("/unsized.gguf")
    part = settings.mode_dir("llm") / "unsized.gguf.part"

    with pytest.raises(DownloadFailed) as failed:
        await downloads.fetch(url, None, "llm")
    assert "not enough disk space: " in str(failed.value)
    assert str(failed.value).endswith("of a file whose size the server did not announce,"
                                      " and 1 MiB must stay free (download_free_margin)")
    kept = part.stat().st_size
    assert 3 * MB - kept >= 1 * MB and kept > 1.5 * MB  # written up to the margin, not past it
    assert set(disk.asked) == {settings.mode_dir("llm")}
    assert len(disk.asked) <= kept // (64 * KB) + 2  # looked at when writing, not for every chunk

    disk.capacity = 8 * MB  # space was freed: the kept .part is resumed
    assert (await downloads.fetch(url, None, "llm")).status == "completed"
    assert served.ranges_asked == [None, f"bytes={kept}-"]
    assert (settings.mode_dir("llm") / "unsized.gguf").read_bytes() == data


async def test_a_download_of_known_size_that_would_fill_the_disk_never_starts(nursery, files, tmp_path):
    settings = make_settings(tmp_path / "home", download_free_margin=1 * MB)
    disk = NearlyFullDisk(settings.models_dir, capacity=3 * MB)
    downloads = await download_actor(nursery, settings, DownloadPolicy(free_space=disk))
    files.add("/sized.gguf", gguf(2 * MB + 512 * KB))
    url = files.url("/sized.gguf")

    with pytest.raises(DownloadFailed, match=r"not enough disk space: the download needs 2\.5 MiB more, 3 MiB"):
        await downloads.fetch(url, None, "rerank")
    assert (await downloads.status(url)).downloaded == 0
    assert files_under(settings) == []


async def test_an_answer_that_breaks_http_is_named_never_quoted(downloads, files):
    files.add("/garbage.gguf", b"", raw_answer=b"SECRET-STATUS-LINE\r\n\r\n")
    files.add("/reason.gguf", b"", raw_answer=b"HTTP/1.1 404 SECRET-REASON\r\nContent-Length: 0\r\n\r\n")

    with pytest.raises(DownloadFailed) as failed:
        await downloads.fetch(files.url("/garbage.gguf"), None, "llm")
    assert str(failed.value).endswith("failed: RemoteProtocolError: illegal status line (gave up after 3 attempts)")
    with pytest.raises(DownloadFailed) as failed:
        await downloads.fetch(files.url("/reason.gguf"), None, "llm")
    assert str(failed.value).endswith(f"failed: HTTP 404 Not Found from {files.url('/reason.gguf')}")


async def test_a_redirect_loop_ends_after_max_redirects(downloads, files):
    served = files.add("/loop.gguf", b"", location=files.url("/loop.gguf"))
    with pytest.raises(DownloadFailed, match=r"failed: too many redirects \(more than 10\)$"):
        await downloads.fetch(files.url("/loop.gguf"), None, "llm")
    assert len(served.requests) == 11


def test_a_redirect_from_https_down_to_http_is_refused():
    from zenow.downloads._exchange import Failure as _Failure
    from zenow.downloads._exchange import check_redirect as _check_redirect

    _check_redirect(httpx.URL("http://a.example/x.gguf"), httpx.URL("https://b.example/x.gguf"))
    with pytest.raises(_Failure, match="redirected from https down to plain http"):
        _check_redirect(httpx.URL("https://a.example/x.gguf"), httpx.URL("http://a.example/x.gguf"))


async def test_start_compares_an_existing_file_by_its_sha256(downloads, files, settings):
    data = gguf(200 * KB)
    files.add("/kept.gguf", data)
    settings.mode_dir("llm").mkdir(parents=True)
    (settings.mode_dir("llm") / "kept.gguf").write_bytes(data)
    url = files.url("/kept.gguf")

    with pytest.raises(FileAlreadyExists):
        await downloads.start(url, None, "llm", sha256=hashlib.sha256(b"other").hexdigest())
    digest = hashlib.sha256(data).hexdigest()
    record = await downloads.start(url, None, "llm", sha256=digest)
    assert (record.status, record.downloaded, record.sha256) == ("completed", len(data), digest)


def test_a_length_or_range_in_other_digits_is_no_length():
    from zenow.downloads._headers import content_length, parse_content_range

    assert content_length({"content-length": "²"}) is None  # "²".isdigit(), and int() refused it
    assert content_length({"content-length": " 42 "}) == 42
    assert parse_content_range("bytes \u0661-\u0662/\u0663") is None  # Arabic-Indic 1-2/3


# ---------------------------------------------------------------- the exchange in its worker thread


async def test_a_chunked_body_is_downloaded_and_resumed_after_a_drop(downloads, files, settings):
    data = gguf(700 * KB)
    served = files.add("/chunked.gguf", data, chunked=True, drops=[300 * KB])  # no Content-Length
    whole = files.add("/whole-chunked.gguf", data, chunked=True)

    record = await downloads.fetch(files.url("/chunked.gguf"), None, "llm")
    assert (record.status, record.downloaded, record.total) == ("completed", len(data), len(data))
    assert served.ranges_asked == [None, f"bytes={300 * KB}-"]
    assert served.sent == len(data)
    assert (settings.mode_dir("llm") / "chunked.gguf").read_bytes() == data
    assert (await downloads.fetch(files.url("/whole-chunked.gguf"), None, "embed")).downloaded == len(data)
    assert whole.ranges_asked == [None]
    assert (settings.mode_dir("embed") / "whole-chunked.gguf").read_bytes() == data


async def test_a_drop_in_the_middle_of_a_read_buffer_keeps_every_byte_received(downloads, files, settings):
    data = gguf(3 * MB + 123)
    cut = MB + 512 * KB + 7  # neither on a buffer's edge nor a chunk's
    served = files.add("/big.gguf", data, drops=[cut], chunk_size=48 * KB)

    assert (await downloads.fetch(files.url("/big.gguf"), None, "llm")).status == "completed"
    assert served.ranges_asked == [None, f"bytes={cut}-"]  # everything before the cut was written
    assert served.sent == len(data)
    assert (settings.mode_dir("llm") / "big.gguf").read_bytes() == data


async def test_cancel_while_the_thread_waits_on_a_stalled_server_returns_at_once_and_keeps_the_bytes(
        nursery, files, settings):
    # a read timeout far longer than the test: only shutting the socket down can end the read
    downloads = await download_actor(nursery, settings, DownloadPolicy(read_timeout=600))
    served = files.add("/stalled.gguf", gguf(900 * KB), holds=[200 * KB + 5])
    url = files.url("/stalled.gguf")

    await downloads.start(url, None, "llm")
    await reached(downloads, url, 200 * KB + 5)
    with trio.fail_after(5):
        record = await downloads.cancel(url)
    assert (record.status, record.error, record.downloaded) == ("failed", CANCELLED, 200 * KB + 5)
    part = settings.mode_dir("llm") / "stalled.gguf.part"
    assert part.read_bytes() == served.data[:200 * KB + 5]  # no hole, no half write
    served.release.set()


async def test_header_values_that_are_not_ascii_are_read_as_latin_1(downloads, files, settings):
    data = gguf(100 * KB)
    utf8 = "modèle-ü".encode().decode("latin-1")  # the UTF-8 bytes, sent as they are
    files.add("/accents.gguf", data, headers={"X-Note": utf8, "Content-Disposition": f'attachment; filename="{utf8}"'},
              content_type=f"application/octet-stream; name={utf8}")
    files.add("/page.gguf", b"<html>" + bytes(100), content_type="text/h\u00e9ml")

    assert (await downloads.fetch(files.url("/accents.gguf"), None, "llm")).status == "completed"
    assert (settings.mode_dir("llm") / "accents.gguf").read_bytes() == data
    with pytest.raises(InvalidModelFile, match=r"not a GGUF file \(HTTP 200, an unreadable Content-Type\)$"):
        await downloads.fetch(files.url("/page.gguf"), None, "llm")
