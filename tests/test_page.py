"""The page zenow serves at `/` (zenow/web/, zenow/routes/page.py), over HTTP and in a real Chromium.

The HTTP tests check what the browser is told: caching, the Content-Security-Policy, and
that the page needs no key while /api still does.  The browser tests drive Debian's
Chromium with Playwright (tests/support/browser.py) against a real zenow, and fail on any
console error; the ones that chat, stop, download and load run the real llama-server with
SmolLM2 or a tiny generated model.
"""

from __future__ import annotations

import re
import shutil
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.browser import browser, in_browser, screenshot, wait_until
from tests.support.file_server import FileServer
from tests.support.harness import add_message, create_session, make_settings, start_zenow, wait_status
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
    shutil.copytree(Path(str(files("zenow").joinpath("web"))), web)
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
                assert shown[1]["text"].split() == markdown_words(saved[1]["text"])
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
                    wait_until(window, "() => document.querySelector('#session-title').textContent"
                                       " === 'Colours, again'")
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


@pytest.mark.real_llama
async def test_a_download_shows_progress_to_the_end_and_the_model_loads_live(nursery, tmp_path, llama_server,
                                                                            tiny_models):
    files = FileServer()
    await files.start(nursery)
    data = tiny_models["llm"].read_bytes()
    # Trickled, so the download takes a few seconds and its progress is seen on the way.
    files.add("/models/tiny-chat.gguf", data, chunk_size=len(data) // 40 + 1, trickle=0.1)
    url = files.url("/models/tiny-chat.gguf")
    settings = make_settings(tmp_path / "home", llama_server=llama_server)
    async with start_zenow(nursery, settings) as zenow:

        def scenario() -> dict:
            with browser(zenow.url) as b:
                page = b.window("/#models")
                page.locator('.mode-card[data-mode="llm"] .pill[data-status="not_started"]').wait_for()
                page.evaluate("window.__samePage = true")
                page.locator("#download-url").fill(url)
                page.locator("#download-mode").select_option("llm")
                page.locator("#download-name").fill("tiny-chat")
                page.locator("#download-form button[type=submit]").click()

                row = page.locator('.download-row[data-status="downloading"]')
                row.wait_for()
                midway = wait_until(page, """() => {
                    const bar = document.querySelector('.download-row progress');
                    return bar && bar.value > 0 && bar.value < 100 && bar.value;
                }""")
                page.locator('.download-row[data-status="completed"]').wait_for()
                final = page.evaluate("document.querySelector('.download-row progress').value")
                facts = page.locator(".download-row .download-facts").text_content()

                model = page.locator('.mode-card[data-mode="llm"] .model-row[data-model="tiny-chat"]')
                model.wait_for()
                size = model.locator(".model-size").text_content()

                # Every state the llm card shows from now on, as it changes.
                page.evaluate("""() => {
                    window.__seen = [];
                    const pill = document.querySelector('.mode-card[data-mode="llm"] .pill');
                    new MutationObserver(() => window.__seen.push(pill.dataset.status))
                        .observe(pill, {attributes: true, childList: true, characterData: true, subtree: true});
                }""")
                model.locator("button").click()
                page.locator('.mode-card[data-mode="llm"] .pill[data-status="running"]').wait_for()
                page.locator('#llm-pill[data-status="running"]').wait_for()
                model.locator("button", has_text="Loaded").wait_for()
                screenshot(page, tmp_path, "page-models.png")
                return {"midway": midway, "final": final, "facts": facts, "size": size,
                        "seen": page.evaluate("window.__seen"), "same": page.evaluate("window.__samePage === true"),
                        "card": page.locator('.mode-card[data-mode="llm"] .mode-line').text_content()}

        seen = await in_browser(scenario)
        assert 0 < seen["midway"] < 100
        assert seen["final"] == 100 and seen["facts"].startswith("100 %")
        assert seen["size"] == f"{len(data) / 1000:.0f} kB"
        assert "starting" in seen["seen"] and seen["seen"][-1] == "running"
        assert seen["seen"].index("starting") < len(seen["seen"]) - 1
        assert seen["same"]  # no reload happened
        assert seen["card"] == "Model: tiny-chat"
        assert (await wait_status(zenow.client, "running"))["model_name"] == "tiny-chat"


async def test_the_page_says_when_no_chat_model_runs_and_when_zenow_is_gone(zenow, tmp_path):
    def scenario() -> dict:
        # Once zenow is stopped the browser itself reports the refused connections; nothing else may fail.
        with browser(zenow.url, expected_errors=("ERR_CONNECTION_REFUSED", "ERR_EMPTY_RESPONSE")) as b:
            page = b.window("/")
            banner = page.locator("#banner")
            wait_until(page, "() => document.querySelector('#banner').textContent.includes('No chat model is running')")
            assert "llm not started" in banner.text_content()
            send(page, "hello?")  # not sent: the banner says why
            assert page.locator("#messages li").count() == 0
            assert page.locator("#prompt").input_value() == "hello?"
            assert page.evaluate("document.querySelector('#banner').classList.contains('flash')")

            trio.from_thread.run_sync(zenow.shutdown.set)
            wait_until(page, "() => document.querySelector('#banner').textContent.includes('unreachable')")
            return {"kind": banner.get_attribute("data-kind")}

    seen = await in_browser(scenario)
    assert seen["kind"] == "error"


async def test_the_page_asks_for_the_api_key_once_and_keeps_it(nursery, tmp_path):
    async with start_zenow(nursery, make_settings(tmp_path / "home", api_keys=("s3cret",))) as zenow:
        zenow.client.headers["x-api-key"] = "s3cret"
        await create_session(zenow.client, "Kept behind a key")

        def scenario() -> dict:
            with browser(zenow.url) as b:
                page = b.window("/")
                dialog = page.locator("#key-dialog")
                dialog.wait_for(state="visible")
                page.locator("#key-input").fill("wrong")
                page.locator("#key-input").press("Enter")
                wait_until(page, "() => document.querySelector('#key-message').textContent.includes('did not accept')")
                assert dialog.is_visible()
                page.locator("#key-input").fill("s3cret")
                page.locator("#key-input").press("Enter")
                page.locator("#session-list .session-name", has_text="Kept behind a key").wait_for()
                assert not dialog.is_visible()

                again = b.window("/")  # another window of the same browser: the key is kept
                again.locator("#session-list .session-name", has_text="Kept behind a key").wait_for()
                again.locator('#llm-pill[data-status="not_started"]').wait_for()  # the events are in
                return {"dialog": again.locator("#key-dialog").is_visible(),
                        "stored": again.evaluate("localStorage.getItem('zenow.apiKey')")}

        seen = await in_browser(scenario)
        assert seen == {"dialog": False, "stored": "s3cret"}


async def test_parameters_are_edited_with_the_restart_note(zenow, tmp_path):
    def scenario() -> dict:
        # The browser reports the refused update (the test makes it on purpose) as a failed resource.
        with browser(zenow.url, expected_errors=(r"status of 400 .*update_param",)) as b:
            page = b.window("/#models")
            card = page.locator('.mode-card[data-mode="llm"]')
            card.locator("summary").click()
            card.locator('[data-parameter="temperature"]').fill("0.3")
            card.locator("button", has_text="Save parameters").click()
            note = card.locator(".parameters .form-message")
            wait_until(page, "() => document.querySelector('.mode-card[data-mode=llm] .parameters .form-message')"
                             ".textContent.startsWith('Saved')")
            first = note.text_content()
            card.locator('[data-parameter="context_size"]').fill("1024")
            card.locator("button", has_text="Save parameters").click()
            wait_until(page, "() => document.querySelector('.mode-card[data-mode=llm] .parameters .form-message')"
                             ".textContent.includes('next starts')")
            card.locator('[data-parameter="context_size"]').fill("-5")
            card.locator("button", has_text="Save parameters").click()
            wait_until(page, "() => document.querySelector('.mode-card[data-mode=llm] .parameters .form-message')"
                             ".dataset.kind === 'error'")
            refused = note.text_content()
            page.locator("#tab-chat").click()
            return {"first": first, "refused": refused,
                    "placeholder": page.locator("#temperature").get_attribute("placeholder")}

    seen = await in_browser(scenario)
    assert seen["first"] == "Saved: applies to the next request."
    assert "context_size" in seen["refused"]
    assert seen["placeholder"] == "0.3"  # the chat's default follows the parameter
    parameters = (await zenow.client.get("/api/models/get_param", params={"mode": "llm"})).json()
    assert parameters["temperature"] == 0.3 and parameters["context_size"] == 1024


async def test_a_narrow_window_puts_the_sessions_in_a_drawer(zenow, tmp_path):
    await create_session(zenow.client, "A session on a phone")

    def scenario() -> dict:
        with browser(zenow.url) as b:
            page = b.window("/", width=390, height=760)
            page.locator("#session-list .session-name").first.wait_for(state="attached")
            hidden = page.locator("#sessions").bounding_box()
            page.locator("#toggle-sessions").click()
            page.locator("#session-list .session-name", has_text="A session on a phone").wait_for()
            wait_until(page, "() => document.querySelector('#sessions').getBoundingClientRect().left >= 0")
            shown = page.locator("#sessions").bounding_box()
            page.locator("#session-list .session-name").first.click()
            wait_until(page, "() => document.querySelector('#sessions').getBoundingClientRect().right <= 0")
            screenshot(page, tmp_path, "narrow.png")
            return {"hidden": hidden, "shown": shown,
                    "overflow": page.evaluate("document.documentElement.scrollWidth - window.innerWidth"),
                    "composer": page.locator("#send").is_visible() and page.locator("#prompt").is_visible(),
                    "title": page.locator("#session-title").text_content()}

    seen = await in_browser(scenario)
    assert seen["hidden"]["x"] + seen["hidden"]["width"] <= 0 and seen["shown"]["x"] >= 0
    assert seen["overflow"] <= 0 and seen["composer"]
    assert seen["title"] == "A session on a phone"


async def test_a_running_download_is_cancelled_from_the_page(zenow, nursery, tmp_path, tiny_models):
    files = FileServer()
    await files.start(nursery)
    data = tiny_models["embed"].read_bytes()
    served = files.add("/embedder.gguf", data, holds=[len(data) // 3])
    url = files.url("/embedder.gguf")

    def scenario() -> dict:
        with browser(zenow.url) as b:
            page = b.window("/#models")
            page.locator("#download-url").fill(url)
            page.locator("#download-mode").select_option("embed")
            page.locator("#download-form button[type=submit]").click()
            page.locator('.download-row[data-status="downloading"] button', has_text="Cancel").click()
            page.locator('.download-row[data-status="failed"]').wait_for()
            return {"error": page.locator(".download-row .mode-error").text_content(),
                    "actions": page.locator(".download-row .download-actions button").all_text_contents()}

    seen = await in_browser(scenario)
    served.release.set()
    assert "cancel" in seen["error"].lower()
    assert seen["actions"] == ["Resume", "Discard"]
    record = (await zenow.client.get("/api/models/download/status", params={"url": url})).json()["download"]
    assert record["status"] == "failed" and record["downloaded"] < len(data)


def markdown_words(text: str) -> list[str]:
    """The words of a Markdown reply as the page shows them: no emphasis stars, no list markers
    (a numbered or bulleted list is drawn as a list, its "1." or "-" is not text)."""
    return re.sub(r"^[ \t]*(?:\d+\.|[-*+])[ \t]+", "", text, flags=re.MULTILINE).replace("*", "").split()
