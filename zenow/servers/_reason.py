"""Why a llama-server failed, in a line a user can read, from the last lines it printed (trio-free).

llama-server's log lines carry a timestamp, a level, a subsystem tag and the name
of the function that printed them, and one failure is reported several times over
("error loading model: ...", "failed to load model", "exiting due to model loading
error").  `failure_reason` keeps the lines that say what went wrong, without the
prefixes, each once, and cuts the result to a length a status can show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["failure_reason"]

#: "0.00.003.693 E " (llama.cpp's common log: minutes.seconds.millis.micros, then the level).
_TIMESTAMP = re.compile(r"^\d+(?:\.\d+)+ [A-Z] ")
#: "srv    ", "cmn  " (the subsystem tag of the server's log lines).
_TAG = re.compile(r"^[a-z]{2,5} {2,}")
#: "llama_model_load: ", "operator(): ", "main: " (the printing function).
_FUNCTION = re.compile(r"^(?!(?:error|warning|note)\b)[A-Za-z_][\w~]*(?:\(\))?: ")
#: "/path/to/ggml/src/ops.cpp:4242: " (an assertion's source location).
_SOURCE = re.compile(r"^/?(?:[\w.+-]+/)*[\w.+-]+\.(?:c|cc|cpp|h|hpp):\d+: ")

_SAYS_WHAT_WENT_WRONG = re.compile(
    r"error|fail|unable|invalid|cannot|can't|corrupt|out of memory|abort|assert|exception|terminat|"
    r"segmentation|not supported|unsupported|only supports|missing|not found|not within|no such|denied|killed",
    re.IGNORECASE,
)
#: Quoted names and paths: a model called "missing.gguf" says nothing about what went wrong.
_NAMES = re.compile(r"'[^']*'|\"[^\"]*\"|(?<!\w)/\S+")
#: Lines that only repeat that something failed, said better by another line.
_NOISE = re.compile(
    r"^failed to load model(?:, '.*')?$|^exiting due to|cleaning up before exit|"
    r"encountered an error while trying to fit params|^failed to load model '.*'$",
    re.IGNORECASE,
)

MAX_REASON = 500


def failure_reason(lines: Iterable[str], limit: int = MAX_REASON) -> str:
    """The lines among `lines` (the end of a llama-server's output) that say what went wrong,
    without their log prefixes, each once, joined with "; " and cut to `limit` characters.

    When no line says so, the last three lines are given instead; "" when there are none.
    """
    cleaned = [_strip(line) for line in lines]
    cleaned = [line for line in cleaned if line]
    telling = [line for line in cleaned
               if _SAYS_WHAT_WENT_WRONG.search(_NAMES.sub("", line)) and not _NOISE.search(line)]
    chosen = _unique(telling) if telling else _unique(cleaned)[-3:]
    reason = "; ".join(chosen)
    return reason if len(reason) <= limit else reason[: limit - 3].rstrip() + "..."


def _strip(line: str) -> str:
    line = _TIMESTAMP.sub("", line.strip())
    line = _TAG.sub("", line)
    for _ in range(3):  # "operator(): operator(): cleaning up..." repeats its prefix
        stripped = _FUNCTION.sub("", line)
        if stripped == line:
            break
        line = stripped
    return _SOURCE.sub("", line).strip()


def _unique(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for line in lines:
        if line not in seen:
            seen.add(line)
            kept.append(line)
    return kept
