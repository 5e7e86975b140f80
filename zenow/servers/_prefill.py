"""Reading the next turn's prefix into llama-server's cache while the user reads the reply.

After a reply, the slot that generated it holds the conversation up to the reply's last
token.  The next turn's prompt goes on with text the model never computed: the end of
the reply's message and the start of the next user message (ChatML: `<|im_end|>`,
`<|im_start|>user`, newlines), and whatever of the reply the chat template renders
differently from how it was generated.  On a long conversation each of those tokens
attends to the whole history, and they are on the next first token's way.

`next_turn_prefix` renders the conversation with a placeholder user message through the
model's own chat template (llama-server's `/apply-template`) and keeps what comes before
the placeholder: the text every next turn's prompt starts with, whatever the user writes.
`prefill` has llama-server read it (`/completion` with `n_predict: 0`, which evaluates the
prompt into the slot's cache and generates nothing): the slot holding the conversation is
the one llama-server picks, by the longest common prefix.  The next turn then computes
only its own message (unless the conversation outgrew its history budget and the next turn
drops old messages, `zenow.chat._prompt`: then it computes the history again, prefill or not).

Its callers do it after the client got the reply's end, and keep the conversation's next
request from racing it into another slot: the chat streamer under the session's lock
(`zenow.chat._streamer`), `/v1` by having a request that continues the conversation wait
for it (`zenow.v1._readahead`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx
import trio

from .. import metrics

__all__ = ["PLACEHOLDER", "PREFILL_DEADLINE", "next_turn_prefix", "prefill"]

log = logging.getLogger(__name__)

#: Seconds a prefill may take (the conversation's next request waits for it meanwhile).
PREFILL_DEADLINE = 30.0
#: The next user message's stand-in: text no template changes and no conversation holds.
PLACEHOLDER = "<<zenow: the next message>>"


def next_turn_prefix(rendered: str) -> str | None:
    """What `rendered` (the conversation and a `PLACEHOLDER` user message, through the chat
    template) holds before the placeholder; None when the template did not keep it."""
    at = rendered.rfind(PLACEHOLDER)
    return rendered[:at] if at > 0 else None


async def prefill(http: httpx.AsyncClient, endpoint: str, headers: Mapping[str, str],
                  conversation: list[dict[str, Any]]) -> int | None:
    """Have the llama-server at `endpoint` read the prompt every next turn of `conversation` starts
    with into its cache (counted in `/metrics`), in at most `PREFILL_DEADLINE` seconds; the tokens it
    computed, or None when it did not (a server without the routes, an error: logged; past the deadline;
    never raised but for cancellation)."""
    with trio.move_on_after(PREFILL_DEADLINE):
        return await _prefill(http, endpoint, headers, conversation)
    log.debug("prefilling the next turn took over %g s", PREFILL_DEADLINE)
    return None


async def _prefill(http: httpx.AsyncClient, endpoint: str, headers: Mapping[str, str],
                   conversation: list[dict[str, Any]]) -> int | None:
    try:
        rendered = await http.post(f"{endpoint}/apply-template", headers=headers, json={
            "messages": [*conversation, {"role": "user", "content": PLACEHOLDER}]})
        rendered.raise_for_status()
        prefix = next_turn_prefix(rendered.json()["prompt"])
        if prefix is None:
            log.debug("the chat template drops or changes the placeholder: no prefill")
            return None
        read = await http.post(f"{endpoint}/completion", headers=headers, json={
            "prompt": prefix, "n_predict": 0, "cache_prompt": True})
        read.raise_for_status()
        computed = read.json().get("timings", {}).get("prompt_n")
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.debug("prefilling the next turn failed: %s", exc)
        return None
    if not isinstance(computed, int):
        return None
    metrics.next_turn_prefilled(computed)
    return computed
