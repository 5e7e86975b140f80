"""Zenow's Prometheus metrics: the one registry, the few calls actors make, and the scrape.

Actors and routes record what happens with plain function calls (`server_crashed`,
`first_delta`, ...): each is a few dictionary lookups and an addition, never blocks and
never raises, so recording costs a request nothing.  What is a state rather than an event
(each mode's server state, the chats open) is read from the handles when scraped.
`GET /metrics` answers `scrape`: zenow's own figures, then every running llama-server's
own (`llama-server --metrics`), fetched at that moment and relabelled with `mode`.

Metrics (Prometheus text format 0.0.4; counters end in `_total`):

==========================================  =========  =====================================
name                                        type       labels
==========================================  =========  =====================================
zenow_http_requests_total                   counter    method, route (the pattern), status
zenow_http_request_duration_seconds         histogram  method, route (until the answer's
                                                       headers: a stream's body not included)
zenow_chat_streams_open                     gauge      (chats being answered on /api/chat)
zenow_chat_tokens_generated_total           counter    (tokens of /api/chat replies)
zenow_chat_prefills_total                   counter    (replies, /api/chat's and /v1's, after which
                                                       the next turn's prefix was read into
                                                       llama-server's cache)
zenow_chat_prefill_tokens_total             counter    (the tokens that took)
zenow_chat_time_to_first_token_seconds      histogram  (from the request, a restart of an
                                                       idle llm server included)
zenow_server_state                          stateset   mode, zenow_server_state (1 for the
                                                       state the mode is in, 0 for the others)
zenow_server_starts_total                   counter    mode (llama-server children spawned)
zenow_server_start_seconds                  histogram  mode (spawn to healthy)
zenow_server_crashes_total                  counter    mode (children that exited unexpectedly)
zenow_server_restarts_total                 counter    mode (automatic restarts after a crash)
zenow_server_idle_stops_total               counter    mode (stopped after `keep_alive` idle)
zenow_download_bytes_total                  counter    mode (bytes received by downloads)
zenow_store_query_seconds                   histogram  query (the store function's name)
zenow_llama_server_metrics_up               gauge      mode (1: its figures are in this scrape)
llamacpp:*                                  as sent    mode, plus llama-server's own labels
==========================================  =========  =====================================

The registry is the process's (one zenow runs per process); a test that runs several
zenows in one process reads differences, not absolute values.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .settings import MODES

__all__ = [
    "CONTENT_TYPE",
    "REGISTRY",
    "ServerMetricsSource",
    "download_bytes",
    "first_delta",
    "next_turn_prefilled",
    "relabelled",
    "render",
    "request_answered",
    "scrape",
    "server_crashed",
    "server_idle_stopped",
    "server_restarting",
    "server_started",
    "server_starting",
    "store_query",
    "tokens_generated",
]

log = logging.getLogger(__name__)

#: The classic text format: what every Prometheus version and most scrapers read.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No `*_created` series: they double the output and say only when zenow started.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

SERVER_STATES = ("not_started", "starting", "running", "error", "stopped")

_HTTP_REQUESTS = Counter(
    "zenow_http_requests", "HTTP requests answered, by method, route pattern and status",
    ["method", "route", "status"], registry=REGISTRY)
_HTTP_SECONDS = Histogram(
    "zenow_http_request_duration_seconds",
    "Seconds from a request to its answer's headers (a streamed body is not included)",
    ["method", "route"], registry=REGISTRY)
_CHAT_STREAMS = Gauge("zenow_chat_streams_open", "Chats (/api/chat) being answered now", registry=REGISTRY)
_CHAT_TOKENS = Counter(
    "zenow_chat_tokens_generated", "Tokens generated for /api/chat replies (llama-server's usage count)",
    registry=REGISTRY)
_PREFILLS = Counter(
    "zenow_chat_prefills",
    "Replies (/api/chat and /v1/chat/completions) after which llama-server read the next turn's prefix into its cache",
    registry=REGISTRY)
_PREFILL_TOKENS = Counter(
    "zenow_chat_prefill_tokens", "Prompt tokens llama-server computed ahead for the next turn of a conversation",
    registry=REGISTRY)
_TTFT = Histogram(
    "zenow_chat_time_to_first_token_seconds",
    "Seconds from a /api/chat request to its first generated token (starting an idle llm server included)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0), registry=REGISTRY)
_SERVER_STATE = Enum(
    "zenow_server_state", "The state of each mode's llama-server (as /api/server/status says)",
    ["mode"], states=list(SERVER_STATES), registry=REGISTRY)
_SERVER_STARTS = Counter("zenow_server_starts", "llama-server children spawned", ["mode"], registry=REGISTRY)
_SERVER_START_SECONDS = Histogram(
    "zenow_server_start_seconds", "Seconds from spawning a llama-server to its first healthy answer", ["mode"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0), registry=REGISTRY)
_SERVER_CRASHES = Counter(
    "zenow_server_crashes", "llama-server children that exited while they should run", ["mode"], registry=REGISTRY)
_SERVER_RESTARTS = Counter(
    "zenow_server_restarts", "Automatic restarts of a llama-server after a crash", ["mode"], registry=REGISTRY)
_SERVER_IDLE_STOPS = Counter(
    "zenow_server_idle_stops", "llama-server children stopped after keep_alive seconds without a request",
    ["mode"], registry=REGISTRY)
_DOWNLOAD_BYTES = Counter("zenow_download_bytes", "Bytes received by model downloads", ["mode"], registry=REGISTRY)
_STORE_SECONDS = Histogram(
    "zenow_store_query_seconds", "Seconds a store query took, waiting for its worker thread included", ["query"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0), registry=REGISTRY)

for _mode in MODES:  # every mode's series exists from the start, so rate() sees its first increase
    for _metric in (_SERVER_STARTS, _SERVER_CRASHES, _SERVER_RESTARTS, _SERVER_IDLE_STOPS, _DOWNLOAD_BYTES):
        _metric.labels(_mode)


# ---------------------------------------------------------------- what actors and routes record


#: The HTTP series' children by (method, route, status), made once: `labels()` checks and joins its
#: values on every call, which was most of the cost of counting a request.  Bounded like the series.
_http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def request_answered(method: str, route: str, status: int, seconds: float | None) -> None:
    """An HTTP request was answered with `status`; `route` is its URL pattern (bounded), not its path."""
    children = _http_children.get((method, route, status))
    if children is None:
        children = _http_children[(method, route, status)] = (
            _HTTP_REQUESTS.labels(method, route, str(status)), _HTTP_SECONDS.labels(method, route))
    counted, timed = children
    counted.inc()
    if seconds is not None:
        timed.observe(seconds)


def first_delta(received: list[bytes], since: float) -> None:
    """A chat's reply receives a delta, after `received` ones, for a request that arrived at
    `since` (trio's clock): the first one is its time to first token."""
    if not received:
        _TTFT.observe(trio.current_time() - since)


def tokens_generated(count: int) -> None:
    if count > 0:
        _CHAT_TOKENS.inc(count)


def next_turn_prefilled(tokens: int) -> None:
    """llama-server read `tokens` of a conversation's next turn into its cache after a reply."""
    _PREFILLS.inc()
    _PREFILL_TOKENS.inc(max(tokens, 0))


def server_starting(mode: str) -> None:
    _SERVER_STARTS.labels(mode).inc()


def server_started(mode: str, seconds: float) -> None:
    """A child of `mode` answered healthy `seconds` after it was spawned."""
    _SERVER_START_SECONDS.labels(mode).observe(seconds)


def server_crashed(mode: str) -> None:
    _SERVER_CRASHES.labels(mode).inc()


def server_restarting(mode: str) -> None:
    """An automatic restart after a crash begins."""
    _SERVER_RESTARTS.labels(mode).inc()


def server_idle_stopped(mode: str) -> None:
    _SERVER_IDLE_STOPS.labels(mode).inc()


def store_query(query: str, seconds: float) -> None:
    _STORE_SECONDS.labels(query).observe(seconds)


def download_bytes(mode: str, count: int) -> None:
    """A download for `mode` received `count` bytes."""
    _DOWNLOAD_BYTES.labels(mode).inc(count)


# ---------------------------------------------------------------- the scrape

#: Where a mode's llama-server figures come from: its `/metrics` text, or None (not running, no answer).
ServerMetricsSource = Callable[[], Awaitable[str | None]]


async def scrape(sources: Mapping[str, ServerMetricsSource], states: Mapping[str, str], chats_open: int) -> bytes:
    """zenow's metrics and every mode's llama-server figures (fetched at once), as Prometheus text.

    `states` is each mode's server state now, `chats_open` the chats being answered now.
    """
    for mode, state in states.items():
        if state in SERVER_STATES:
            _SERVER_STATE.labels(mode).state(state)
    _CHAT_STREAMS.set(chats_open)
    texts: dict[str, str | None] = {}

    async def fetch(mode: str, source: ServerMetricsSource) -> None:
        texts[mode] = await source()

    async with trio.open_nursery() as nursery:
        for mode, source in sources.items():
            nursery.start_soon(fetch, mode, source)
    return render({mode: texts.get(mode) for mode in sources})


def render(server_texts: Mapping[str, str | None]) -> bytes:
    """zenow's metrics, then the llama-server figures of each mode in `server_texts` with a `mode` label.

    A text that is not Prometheus text is left out (and `zenow_llama_server_metrics_up` says 0).
    """
    up = GaugeMetricFamily("zenow_llama_server_metrics_up",
                           "Whether the mode's llama-server figures are in this scrape (0: not running or no answer)",
                           labels=["mode"])
    merged: dict[str, Metric] = {}
    for mode, text in server_texts.items():
        families: list[Metric] = []
        if text is not None:
            try:
                families = relabelled(text, mode)
            except ValueError as exc:
                log.warning("%s llama-server sent metrics that do not parse: %s", mode, exc)
                text = None
        up.add_metric([mode], 0.0 if text is None else 1.0)
        for family in families:
            same = merged.setdefault(family.name, family)
            if same is not family and same.type == family.type:
                same.samples.extend(family.samples)
    answer: bytes = generate_latest(_Scrape([up, *merged.values()]))
    return answer


def relabelled(text: str, mode: str) -> list[Metric]:
    """The metric families in the Prometheus `text`, each sample labelled `mode`.

    Raises `ValueError` when `text` is not Prometheus text.
    """
    families = []
    for family in text_string_to_metric_families(text):
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            copy.add_sample(sample.name, {**sample.labels, "mode": mode}, sample.value, sample.timestamp)
        families.append(copy)
    return families


class _Scrape(Collector):
    """zenow's registry followed by the families of one scrape."""

    def __init__(self, extra: Iterable[Metric]) -> None:
        self._extra = list(extra)

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()
        yield from self._extra
