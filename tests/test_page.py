"""The page zenow serves at `/` (zenow/web/, zenow/routes/page.py), over HTTP and in a real Chromium.

The HTTP tests check what the browser is told: caching, the Content-Security-Policy, and
that the page needs no key while /api still does.  The browser tests drive Debian's
Chromium with Playwright (tests/support/browser.py) against a real zenow, and fail on any
console error; the ones that chat, stop, download and load run the real llama-server with
SmolLM2 or a tiny generated model.
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest
import trio

from tests.support.browser import browser, in_browser, screenshot, wait_until
from tests.support.file_server import FileServer
from tests.support.harness import add_message, create_session, make_settings, start_zenow, wait_for, wait_status
from zenow.routes.page import ASSET_MAX_AGE, CONTENT_SECURITY_POLICY, read_page_files

ASSET = re.compile(r'(?:src|href)="(/assets/([0-9a-f]{16})/[^"]+)"')


def check_security_headers(response: httpx.Response) -> None:
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


# ---------------------------------------------------------------- over HTTP


def test_the_policy_allows_only_this_origin_and_no_framing():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == directives["style-src"] == "'self'"  # no 'unsafe-inline', no eval
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == directives["base-uri"] == "'none'"


async def test_the_page_is_revalidated_and_its_assets_are_cached_under_their_version(client):
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Cache-Control"] == "no-cache"
    check_security_headers(page)
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline for the policy to refuse
    assets = ASSET.findall(page.text)
    assert {path.rsplit("/", 1)[1] for path, _ in assets} >= {"app.js", "page.css", "favicon.svg"}
    version = assets[0][1]
    assert {v for _, v in assets} == {version}
    assert page.headers["ETag"] == f'"{version}"'

    again = await client.get("/", headers={"If-None-Match": page.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""

    for path, _ in assets:
        asset = await client.get(path)
        assert asset.status_code == 200, path
        assert asset.headers["Cache-Control"] == f"public, max-age={ASSET_MAX_AGE}, immutable"
        check_security_headers(asset)
    kinds = {path.rsplit(".", 1)[1]: (await client.get(path)).headers["Content-Type"] for path, _ in assets}
    assert kinds == {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
                     "svg": "image/svg+xml"}

    # The modules import each other and the vendored libraries by relative paths, inside the version.
    markdown = await client.get(f"/assets/{version}/js/markdown.js")
    for relative in re.findall(r'from "\.\./([^"]+)"', markdown.text):
        assert (await client.get(f"/assets/{version}/{relative}")).status_code == 200, relative
    for licence in ("vendor/marked/LICENSE", "vendor/dompurify/LICENSE", "vendor/dompurify/LICENSE-MPL"):
        answer = await client.get(f"/assets/{version}/{licence}")
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_an_asset_of_another_version_or_outside_the_page_is_not_found(client):
    version = ASSET.findall((await client.get("/")).text)[0][1]
    for path in (f"/assets/{'0' * 16}/js/app.js", f"/assets/{version}/js/nope.js",
                 f"/assets/{version}/../routes/page.py", f"/assets/{version}/%2e%2e/__init__.py",
                 f"/assets/{version}/index.html"):
        answer = await client.get(path)
        assert answer.status_code == 404, path
        assert "detail" in answer.json()


def test_the_version_changes_with_any_file(tmp_path):
    web = tmp_path / "web"
    shutil.copytree(read_page_files.__globals__["files"]("zenow").joinpath("web"), web)
    before = read_page_files(web)
    (web / "js" / "dom.js").write_text((web / "js" / "dom.js").read_text() + "\n// changed\n")
    after = read_page_files(web)
    assert before.version != after.version
    assert after.version.encode() in after.index and b"{{version}}" not in after.index


async def test_the_page_needs_no_key_but_the_api_still_does(nursery, tmp_path):
    async with start_zenow(nursery, make_settings(tmp_path / "home", api_keys=("s3cret",))) as zenow:
        page = await zenow.client.get("/")
        assert page.status_code == 200
        path, _ = ASSET.findall(page.text)[0]
        assert (await zenow.client.get(path)).status_code == 200
        assert (await zenow.client.get("/api/sessions")).status_code == 401
        assert (await zenow.client.get("/api/sessions", headers={"x-api-key": "s3cret"})).status_code == 200
        assert (await zenow.client.post("/", json={})).status_code == 401  # only GET is let through


# ---------------------------------------------------------------- in the browser


HOSTILE_REPLY = (
    "Here you go: <img src=x onerror=\"window.__pwned = 'img'\"> and "
    "<script>window.__pwned = 'script'</script>\n\n"
    "[click me](javascript:window.__pwned='link') and ![pixel](http://203.0.113.7/track.png)\n\n"
    "```python\nprint('<b>not bold</b>')\n```\n\n**bold** text"
)


async def test_a_hostile_reply_renders_as_text_and_nothing_runs(zenow, tmp_path):
    session = await create_session(zenow.client, "Tell me about images")
    sid = session["session_id"]
    await add_message(zenow.client, sid, "user", "Tell me about images")
    await add_message(zenow.client, sid, "assistant", HOSTILE_REPLY)

    def scenario() -> dict:
        with browser(zenow.url) as b:
            page = b.window(f"/#chat/{sid}")
            reply = page.locator('#messages li.message.assistant .message-body')
            reply.wait_for()
            found = page.evaluate("""() => {
                const body = document.querySelector('#messages li.message.assistant .message-body');
                return {
                    text: body.textContent,
                    images: document.querySelectorAll('#messages img').length,
                    scripts: document.querySelectorAll('#messages script').length,
                    handlers: [...document.querySelectorAll('#messages *')]
                        .flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on')),
                    hrefs: [...body.querySelectorAll('a')].map(a => a.getAttribute('href')),
                    code: body.querySelector('pre code')?.textContent,
                    bold: [...body.querySelectorAll('strong')].map(e => e.textContent),
                    pwned: window.__pwned ?? null,
                };
            }""")
            screenshot(page, tmp_path, "hostile.png")
            return found

    found = await in_browser(scenario)
    assert '<img src=x onerror="window.__pwned = \'img\'">' in found["text"]  # shown as the text it is
    assert "<script>window.__pwned = 'script'</script>" in found["text"]
    assert found["images"] == found["scripts"] == 0 and found["handlers"] == []
    assert not any(href and href.startswith("javascript:") for href in found["hrefs"])
    assert "http://203.0.113.7/track.png" in found["hrefs"]  # an image is a link, never loaded
    assert found["code"] == "print('<b>not bold</b>')\n"
    assert found["bold"] == ["bold"]
    assert found["pwned"] is None


def messages_in(page) -> list[dict]:
    """The conversation as the window shows it: role, text, stored id (None until stored)."""
    return page.evaluate("""() => [...document.querySelectorAll('#messages li.message[data-role]')].map(li => ({
        role: li.dataset.role,
        text: li.querySelector('.message-body').textContent,
        id: li.dataset.messageId ? Number(li.dataset.messageId) : null,
    }))""")


def session_names(page) -> list[str]:
    return page.locator("#session-list .session-name").all_text_contents()


def send(page, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


async def stored(client, session_id: int) -> list[dict]:
    answer = await client.get(f"/api/sessions/{session_id}/messages")
    assert answer.status_code == 200, answer.text
    return [{"role": m["role"], "text": m["content"], "id": m["id"]} for m in answer.json()["messages"]]


@pytest.mark.real_llama
async def test_chat_streams_names_the_session_keeps_history_and_syncs_two_windows(nursery, tmp_path, llama_server,
                                                                                    smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running")
        from_trio = trio.from_thread.run

        def scenario() -> None:
            with browser(zenow.url) as b:
                first = b.window("/")
                first.locator('#llm-pill[data-status="running"]').wait_for()
                first.locator("#temperature").fill("0")
                first.locator("#max-tokens").fill("48")

                # Shift+Enter is a new line, not a send.
                first.locator("#prompt").fill("Name three colours.")
                first.locator("#prompt").press("Shift+Enter")
                assert first.locator("#prompt").input_value() == "Name three colours.\n"
                assert messages_in(first) == []

                send(first, "Name three colours.")
                # Tokens appear while the reply is still streaming.
                wait_until(first, """() => {
                    const li = document.querySelector('#messages li.message.assistant.streaming');
                    return li && li.querySelector('.message-body').textContent.trim().length > 0;
                }""")
                wait_until(first, "() => !document.querySelector('#messages li.streaming') && "
                                  "document.querySelectorAll('#messages li[data-message-id]').length === 2")
                assert session_names(first) == ["Name three colours."]
                assert first.locator("#session-title").text_content() == "Name three colours."
                sid = int(first.evaluate("location.hash").split("/")[1])
                shown = messages_in(first)
                saved = from_trio(stored, zenow.client, sid)
                assert [m["role"] for m in shown] == ["user", "assistant"] and shown[1]["text"].strip()
                assert [m["id"] for m in shown] == [m["id"] for m in saved]
                assert shown[0]["text"] == saved[0]["text"] == "Name three colours."
                assert shown[1]["text"].split() == saved[1]["text"].replace("*", "").split()
                screenshot(first, tmp_path, "page-chat.png")

                # A second window on the same session sees what the first one sends.
                second = b.window(f"/#chat/{sid}")
                wait_until(second, "() => document.querySelectorAll('#messages li[data-message-id]').length === 2")
                send(first, "And one more?")
                wait_until(second, "() => document.querySelectorAll('#messages li[data-message-id]').length === 4")
                wait_until(first, "() => document.querySelectorAll('#messages li[data-message-id]').length === 4")
                assert [m["id"] for m in messages_in(second)] == [m["id"] for m in messages_in(first)]
                assert messages_in(second)[2]["text"] == "And one more?"

                # A reload shows the history.
                first.reload()
                wait_until(first, "() => document.querySelectorAll('#messages li[data-message-id]').length === 4")
                assert [m["id"] for m in messages_in(first)] == [m["id"] for m in from_trio(stored, zenow.client, sid)]

                # Rename: both windows follow.
                first.locator("#rename-session").click()
                first.locator("#rename-input").fill("Colours, again")
                first.locator("#rename-input").press("Enter")
                for window in (first, second):
                    wait_until(window, "() => document.querySelector('#session-title').textContent === 'Colours, again'")
                    assert session_names(window) == ["Colours, again"]

                # Delete asks for a second click, then the session is gone everywhere.
                first.locator("#delete-session").click()
                assert first.locator("#delete-session").text_content() == "Confirm delete"
                first.locator("#delete-session").click()
                for window in (first, second):
                    wait_until(window, "() => document.querySelectorAll('#session-list li').length === 0")
                    assert window.locator("#session-title").text_content() == "New chat"
                    assert messages_in(window) == []

        await in_browser(scenario)
        assert (await zenow.client.get("/api/sessions")).json()["total"] == 0


@pytest.mark.real_llama
async def test_stop_mid_answer_keeps_the_partial_reply(nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running")

        def scenario() -> dict:
            with browser(zenow.url) as b:
                page = b.window("/")
                page.locator('#llm-pill[data-status="running"]').wait_for()
                page.locator("#max-tokens").fill("2000")
                send(page, "Write a very long story about a dragon who learns to bake bread.")
                wait_until(page, """() => {
                    const li = document.querySelector('#messages li.message.assistant.streaming');
                    return li && li.querySelector('.message-body').textContent.length > 40;
                }""")
                page.locator("#stop").click()
                # zenow stores the partial reply; the window then shows exactly what was stored.
                wait_until(page, "() => document.querySelectorAll('#messages li[data-message-id]').length === 2")
                assert page.locator("#messages li.message.assistant.stopped").count() == 1
                assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
                return {"sid": int(page.evaluate("location.hash").split("/")[1]), "shown": messages_in(page)}

        result = await in_browser(scenario)
        answer = (await zenow.client.get(f"/api/sessions/{result['sid']}/messages")).json()["messages"]
        assert [m["role"] for m in answer] == ["user", "assistant"]
        reply = answer[1]
        assert len(reply["content"]) > 40
        assert 0 < reply["token_count"] < 2000  # cut short, not finished
        assert result["shown"][1]["id"] == reply["id"]
