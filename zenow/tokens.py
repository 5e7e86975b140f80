"""Token counts for text when no model tokenizer is available.

`estimate_tokens` is the fallback used while no llm model is running; the chat
streamer counts with the running model's own tokenizer (llama-server
`/tokenize`) whenever it can.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable

__all__ = ["TokenCounter", "estimate_tokens"]

# CJK ideographs, kana, hangul and full-width punctuation: BPE vocabularies of
# multilingual models spend about one token per such character.
_WIDE = re.compile(
    "[\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_WORD = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """Estimate how many tokens `text` takes: one per CJK character, and for other
    text the larger of one per four characters and one per word, digit or symbol
    run.  Empty text is 0 tokens; other text at least 1."""
    if not text:
        return 0
    wide = len(_WIDE.findall(text))
    rest = _WIDE.sub(" ", text)
    pieces = _WORD.findall(rest)
    letters = sum(len(p) for p in pieces)
    narrow = max(math.ceil(letters / 4), len(pieces))
    return max(1, wide + narrow)


class TokenCounter:
    """Counts tokens with the running llm model's tokenizer when there is one.

    `tokenize` returns the count from the model, or None when no model can count
    (none running, or it failed); then the estimate is used.
    """

    def __init__(self, tokenize: Callable[[str], Awaitable[int | None]] | None = None) -> None:
        self._tokenize = tokenize

    async def count(self, text: str) -> int:
        if self._tokenize is not None and text:
            counted = await self._tokenize(text)
            if counted is not None:
                return counted
        return estimate_tokens(text)
