#!/usr/bin/env python3
"""A fake llama.cpp ``llama-server`` for fault-injection tests (stdlib only).

Zenow starts it exactly as it starts the real binary::

    fake_llama_server.py -m MODEL.gguf --host 127.0.0.1 --port 43123 -c 2048 -t 2 \\
        -ngl 0 -b 512 --no-webui [--embedding] [--reranking] [--pooling mean]

Command line
------------
Understood: ``-m/--model PATH`` (never opened), ``--host`` (default 127.0.0.1; an
address containing ':' binds IPv6), ``--port`` (default 8080; 0 picks a free port,
printed in the listening line), ``-c/--ctx-size N`` (0 or absent: 4096),
``--embedding/--embeddings``, ``--reranking/--rerank``, ``--pooling
{none,mean,cls,last,rank}``, ``-np/--parallel N`` (slots: at most N chat
completions generate at once, later ones wait for a slot; each slot holds
n_ctx / N tokens, as the real server's split KV cache; absent: 4 slots sharing
all n_ctx, as the real server's automatic unified KV cache),
``--api-key KEY`` (then every route but ``/health`` and ``/v1/health`` answers 401
without ``Authorization: Bearer KEY``, as the real server; the key zenow gives its
children in ``LLAMA_API_KEY`` is not read), ``-h/--help``, ``--version``.
``-t``, ``-ngl``, ``-b`` and ``--no-webui`` are accepted and ignored.  Every
other argument is ignored: a hand-written parser is used instead of argparse
because argparse reads real llama-server flags such as ``-ctk q8_0`` or
``-tb 2`` as ``-c tk`` / ``-t b``.
Both ``--opt value`` and ``--opt=value`` work.

Environment (all optional)
--------------------------
FAKE_LLAMA_START_DELAY=S      seconds between binding and "model loaded" (0.05).
                              Meanwhile every endpoint answers 503 {"error":
                              {"message":"Loading model","type":
                              "unavailable_error","code":503}}, as the real one.
FAKE_LLAMA_FAIL_START=CODE    print a model-load error to stderr and exit CODE
                              before binding.
FAKE_LLAMA_NEVER_READY=1      stay "loading" (503) forever.
FAKE_LLAMA_CRASH_AFTER=S      S seconds after binding, print an error to stderr
                              and os._exit(3).
FAKE_LLAMA_TOKEN_COUNT=N      chat reply tokens: "Hello", " from", " the",
                              " fake", " server", "." repeated cyclically (or
                              cut) to exactly N tokens (default: those 6).
FAKE_LLAMA_TOKEN_DELAY=S      seconds spent "generating" each token, stream or
                              not (0.01); waited before each token.
FAKE_LLAMA_CRASH_MID_STREAM=N after N tokens have been sent (stream) or
                              generated (non-stream), os._exit(4); the
                              connection drops mid-response.  N=0: right after
                              the stream's headers and role chunk.
FAKE_LLAMA_TOKENIZE_DELAY=S   seconds /tokenize takes before answering (0).
FAKE_LLAMA_TOKENIZE_DELAY_IF=TEXT  only when the content holds TEXT.
FAKE_LLAMA_COMPLETION_DELAY=S seconds /completion takes to "read" its prompt (0).
FAKE_LLAMA_EVENT_LOG=PATH     append one JSON object per line (see below).
FAKE_LLAMA_IGNORE_SIGTERM=1   ignore SIGTERM (SIGINT still stops it).
FAKE_LLAMA_KEEPALIVE_CLOSE=S  a kept-alive connection whose next request comes S
                              seconds or more after its last answer is closed
                              unanswered: what the real server (cpp-httplib, which
                              closes idle connections after 5 s) does to a request
                              that crosses its close.
FAKE_LLAMA_WITHOUT=PATHS      comma-separated paths (e.g. /health,/tokenize) that
                              answer 404, like a server that has no such route.

Signals: SIGTERM and SIGINT stop the accept loop and exit 0 within ~0.1 s, even
with streams in flight (those connections just drop).

Event log
---------
Each line is a JSON object with ``event``, ``time`` (time.time()), ``pid`` and,
once bound, ``port``, written with a single O_APPEND write (several fakes can
share one file).  Events:

- ``listening`` {host}; ``ready``; ``shutdown`` {reason: "SIGTERM"|"SIGINT"};
  ``start_failed`` {code, reason}; ``crash`` {reason: "crash_after"|"mid_stream",
  tokens_sent?};
- ``request`` {method, path, body, connection}: every request, before any other handling
  (503 while loading included); body is the parsed JSON or null;
- ``token_sent`` {n}: streamed token number n (1-based) was written;
- ``client_disconnected`` {tokens_sent, stream, how}: the client went away
  during generation; ``how`` is "eof" (seen while waiting between tokens: the
  socket polled readable and MSG_PEEK read 0 bytes) or "write_error"
  (BrokenPipeError/ConnectionResetError while writing).  Generation stops and
  nothing more is logged for that request;
- ``stream_finished`` {tokens_sent, finish_reason}: [DONE] written;
- ``token_generated`` {n} and ``completion_finished`` {tokens, finish_reason}:
  the same for non-streamed chat completions;
- ``prompt_read`` {tokens}: a ``/completion`` request's prompt was "read" (it
  answers right after).

``/completion`` takes ``prompt`` (a string) and reads it like a chat prompt (it
holds a slot meanwhile) but generates nothing, whatever ``n_predict`` says:
``{"content": "", "tokens_evaluated": N, "tokens_predicted": 0, "stop": true,
"timings": {"prompt_n": N, ...}}``, which is what the real server answers for
``n_predict: 0`` on a prompt it has not cached.

Fake tokenizer
--------------
Text is cut into tokens, in order: each special token ``<|...|>`` (no
whitespace or '|' inside) is one token; each CJK character (U+3000-U+303F,
U+3040-U+30FF, U+3400-U+4DBF, U+4E00-U+9FFF, U+AC00-U+D7AF, U+F900-U+FAFF,
U+FF00-U+FFEF, U+20000-U+2FFFF) is one token; each maximal run of other
non-whitespace characters is one token; whitespace is never a token.  So
"hello world" = 2, "你好" = 2, "hello你好!" = 4 ("hello", "你", "好", "!").
Ids: <|im_start|>=1, <|im_end|>=2, <|endoftext|>=0, other specials
3 + crc32 % 97, everything else 100 + crc32(utf-8) % 50000.

Chat prompts are rendered ChatML (what /apply-template returns)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

so prompt_tokens = sum over messages of (tokens(content) + 3) + 2.  Content may be
a string, null, or a list of {"type":"text","text":...} parts (joined with
"\\n").  completion_tokens is the number of fake tokens sent.  A prompt with
prompt_tokens >= n_ctx is a 400 exceed_context_size_error, as in the real
server; max_tokens / max_completion_tokens / n_predict (>= 0) and the room left
in the context cut the reply, with finish_reason "length".

Embeddings: a deterministic L2-normalised vector of 8 floats
seeded by crc32 of the text.  Rerank: relevance_score = 2*overlap - 4 +
(crc32(utf-8 document) % 1000)/1000, overlap being the number of distinct
lower-cased query tokens present in the document; sorted best first (ties keep
input order), cut to top_n.
"""

import json
import math
import os
import random
import re
import select
import signal
import socket
import string
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_TOKENS = ["Hello", " from", " the", " fake", " server", "."]
EMBED_DIM = 8
DEFAULT_N_CTX = 4096
BUILD_INFO = "fake"
SYSTEM_FINGERPRINT = "b0-fake"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

# ---------------------------------------------------------------------------
# stderr and the event log

_stderr_lock = threading.Lock()


def log(line):
    """Write one line to stderr, never raising (the reader may be gone)."""
    with _stderr_lock:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


class EventLog:
    """Appends JSON lines to FAKE_LLAMA_EVENT_LOG, one os.write per event."""

    def __init__(self, path):
        self._fd = None
        self._lock = threading.Lock()
        self.port = None
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event, **fields):
        if self._fd is None:
            return
        record = {"event": event, "time": time.time(), "pid": os.getpid()}
        if self.port is not None:
            record["port"] = self.port
        record.update(fields)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError:
                pass


# ---------------------------------------------------------------------------
# configuration

def _env_float(name, default):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        log(f"fake-llama-server: ignoring {name}={raw!r}: not a number")
        return default


def _env_int(name, default=None):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        log(f"fake-llama-server: ignoring {name}={raw!r}: not an integer")
        return default


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_tokens():
    tokens = list(DEFAULT_TOKENS)
    count = _env_int("FAKE_LLAMA_TOKEN_COUNT")
    if count is not None:
        tokens = [tokens[i % len(tokens)] for i in range(max(count, 0))]
    return tokens


# option name -> (key, takes_value)
_OPTIONS = {
    "-m": ("model", True), "--model": ("model", True),
    "--host": ("host", True), "--port": ("port", True),
    "-c": ("ctx_size", True), "--ctx-size": ("ctx_size", True),
    "-t": ("threads", True), "--threads": ("threads", True),
    "-ngl": ("n_gpu_layers", True), "--gpu-layers": ("n_gpu_layers", True),
    "--n-gpu-layers": ("n_gpu_layers", True),
    "-b": ("batch_size", True), "--batch-size": ("batch_size", True),
    "-np": ("parallel", True), "--parallel": ("parallel", True),
    "--pooling": ("pooling", True),
    "--embedding": ("embedding", False), "--embeddings": ("embedding", False),
    "--reranking": ("reranking", False), "--rerank": ("reranking", False),
    "--no-webui": ("no_webui", False), "--no-ui": ("no_webui", False),
    "-h": ("help", False), "--help": ("help", False),
    "--version": ("version", False),
    "--api-key": ("api_key", True),
}


def parse_args(argv):
    """Parse the llama-server flags the fake understands; ignore everything else."""
    opts = {"model": "models/7B/ggml-model-f16.gguf", "host": "127.0.0.1", "port": "8080",
            "ctx_size": "0", "parallel": "-1", "pooling": None,
            "embedding": False, "reranking": False, "api_key": None,
            "help": False, "version": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        spec = _OPTIONS.get(name)
        if spec is None:
            i += 1  # unknown flag or a value of one: ignored
            continue
        key, takes_value = spec
        if takes_value:
            if inline:
                opts[key] = inline
            elif i + 1 < len(argv):
                opts[key] = argv[i + 1]
                i += 1
            else:
                raise SystemExit(f"error: option {arg} needs a value")
        else:
            opts[key] = True
        i += 1
    for key in ("port", "ctx_size", "parallel"):
        try:
            opts[key] = int(opts[key])
        except ValueError:
            log(f"error while handling argument \"{key}\": invalid value {opts[key]!r}")
            raise SystemExit(1) from None
    if opts["reranking"]:
        opts["embedding"] = True
        opts["pooling"] = "rank"
    if opts["pooling"] == "rank" and opts["embedding"]:
        opts["reranking"] = True
    opts["n_ctx"] = opts["ctx_size"] if opts["ctx_size"] > 0 else DEFAULT_N_CTX
    if opts["parallel"] <= 0:  # automatic: 4 slots over one unified KV cache
        opts["parallel"], opts["n_ctx_slot"] = 4, opts["n_ctx"]
    else:
        opts["n_ctx_slot"] = max(1, opts["n_ctx"] // opts["parallel"])
    opts["model_name"] = os.path.basename(opts["model"])
    return opts


class State:
    """What every handler thread reads; written only by the lifecycle code."""

    def __init__(self, opts, events):
        self.opts = opts
        self.events = events
        self.ready = threading.Event()
        self.tokens = _env_tokens()
        self.token_delay = max(_env_float("FAKE_LLAMA_TOKEN_DELAY", 0.01), 0.0)
        self.tokenize_delay = max(_env_float("FAKE_LLAMA_TOKENIZE_DELAY", 0.0), 0.0)
        self.tokenize_delay_if = os.environ.get("FAKE_LLAMA_TOKENIZE_DELAY_IF", "")
        self.completion_delay = max(_env_float("FAKE_LLAMA_COMPLETION_DELAY", 0.0), 0.0)
        self.crash_mid_stream = _env_int("FAKE_LLAMA_CRASH_MID_STREAM")
        self.without = {p.strip() for p in os.environ.get("FAKE_LLAMA_WITHOUT", "").split(",") if p.strip()}
        self.keepalive_close = _env_float("FAKE_LLAMA_KEEPALIVE_CLOSE", 0.0)
        #: One per slot: a chat completion generates only while it holds one.
        self.slots = threading.BoundedSemaphore(opts["parallel"])
        self.started = time.time()


# ---------------------------------------------------------------------------
# fake tokenizer

_CJK = ("\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
        "\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff")
_SPECIAL = r"<\|[^|\s]*\|>"
_TOKEN_RE = re.compile(rf"{_SPECIAL}|[{_CJK}]|(?:(?!{_SPECIAL})[^\s{_CJK}])+")
_SPECIAL_RE = re.compile(_SPECIAL)
_CJK_RE = re.compile(f"[{_CJK}]")
_FIXED_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
_pieces = dict((v, k) for k, v in _FIXED_IDS.items())
_pieces_lock = threading.Lock()


def split_tokens(text):
    return _TOKEN_RE.findall(text)


def token_id(piece):
    if piece in _FIXED_IDS:
        return _FIXED_IDS[piece]
    h = zlib.crc32(piece.encode("utf-8"))
    return 3 + h % 97 if _SPECIAL_RE.fullmatch(piece) else 100 + h % 50000


def tokenize(text):
    pieces = split_tokens(text)
    ids = [token_id(p) for p in pieces]
    with _pieces_lock:
        for i, p in zip(ids, pieces, strict=True):
            _pieces[i] = p
    return ids, pieces


def count_tokens(text):
    return len(split_tokens(text))


def detokenize(ids):
    out = ""
    prev = None
    with _pieces_lock:
        pieces = [_pieces.get(i, "") for i in ids]
    for p in pieces:
        if not p:
            continue
        glue = (prev is not None and not _CJK_RE.fullmatch(prev) and not _CJK_RE.fullmatch(p)
                and not _SPECIAL_RE.fullmatch(prev) and not _SPECIAL_RE.fullmatch(p))
        out += (" " if glue else "") + p
        prev = p
    return out


def message_text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content
                         if isinstance(part, dict) and part.get("type", "text") == "text")
    raise ValueError("content must be a string, null or a list of parts")


def render_chat(messages):
    if not isinstance(messages, list):
        raise ValueError("'messages' is required and must be an array")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("each message must be an object with a string 'role'")
        out.append(f"<|im_start|>{m['role']}\n{message_text(m.get('content'))}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def embedding_for(text, dim):
    rng = random.Random(zlib.crc32(text.encode("utf-8")))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def rerank_score(query, document):
    q = {p.lower() for p in split_tokens(query)}
    d = {p.lower() for p in split_tokens(document)}
    overlap = len(q & d)
    return 2.0 * overlap - 4.0 + (zlib.crc32(document.encode("utf-8")) % 1000) / 1000.0


def error_body(message, type_, code, **extra):
    err = {"code": code, "message": message, "type": type_}
    err.update(extra)
    return {"error": err}


def _sse(obj):
    return ("data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n").encode("utf-8")


def _cmpl_id():
    return "chatcmpl-" + "".join(random.choice(string.ascii_letters + string.digits) for _ in range(32))


class ClientGone(Exception):
    def __init__(self, how):
        super().__init__(how)
        self.how = how


class RequestError(Exception):
    def __init__(self, status, body):
        super().__init__(body)
        self.status = status
        self.body = body


# ---------------------------------------------------------------------------
# HTTP

class FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (*DISCONNECT_ERRORS, TimeoutError)):
            return
        log(f"srv  handle_error: exception while serving {client_address}: {exc!r}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llama.cpp"
    sys_version = ""

    # -- plumbing ----------------------------------------------------------

    @property
    def state(self):
        return self.server.state

    def setup(self):
        super().setup()
        self._answered_at = None  # when this connection's last answer was written
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def handle_one_request(self):
        limit = self.state.keepalive_close
        if limit > 0 and self._answered_at is not None:
            select.select([self.connection], [], [])  # the next request (or the client's close)
            if time.monotonic() - self._answered_at >= limit:
                log("srv  keep-alive: closing a connection idle past FAKE_LLAMA_KEEPALIVE_CLOSE unanswered")
                self.close_connection = True
                return
        super().handle_one_request()
        self._answered_at = time.monotonic()

    def log_request(self, code="-", size="-"):
        code = getattr(code, "value", code)
        log(f"srv  log_server_r: request: {self.command} {self.path} {self.client_address[0]} {code}")

    def log_message(self, format, *args):
        log("srv  log_server_r: " + (format % args))

    def _common_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")

    def send_json(self, status, obj):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self._common_headers()
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, status, text, content_type="text/plain; version=0.0.4"):
        data = text.encode("utf-8")
        self.send_response(status)
        self._common_headers()
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write_chunk(self, data):
        """Write one HTTP chunk with a single sendall; ClientGone if the peer is gone."""
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except DISCONNECT_ERRORS:
            raise ClientGone("write_error") from None

    def _wait_or_gone(self, seconds):
        """Sleep `seconds`, raising ClientGone as soon as the client closes its end."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            remaining = deadline - time.monotonic()
            events = poller.poll(max(remaining, 0.0) * 1000.0)
            if events:
                try:
                    peek = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    peek = b"x"
                except OSError:
                    raise ClientGone("eof") from None
                if not peek:
                    raise ClientGone("eof")
                # the client sent more bytes (a pipelined request): it is still there
                time.sleep(max(deadline - time.monotonic(), 0.0))
                return
            if remaining <= 0:
                return

    # -- dispatch ----------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_OPTIONS(self):
        self._read_body()
        self.state.events.emit("request", method="OPTIONS", path=self.path, body=None)
        self.send_response(200)
        self._common_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _dispatch(self):
        st = self.state
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        body, parse_error = None, None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as e:
                parse_error = e
        fields = {"method": self.command, "path": path, "body": body, "connection": self.headers.get("Connection")}
        if parse_error is not None:
            fields["raw"] = raw[:2000].decode("utf-8", "replace")
        st.events.emit("request", **fields)
        key = st.opts["api_key"]
        if key and path not in ("/health", "/v1/health") and self.headers.get("Authorization") != f"Bearer {key}":
            self.send_json(401, error_body("Invalid API Key", "authentication_error", 401))
            return
        try:
            if not st.ready.is_set():
                self.send_json(503, error_body("Loading model", "unavailable_error", 503))
                return
            route = None if path in st.without else ROUTES.get((self.command, path))
            if route is None:
                self.send_json(404, error_body("File Not Found", "not_found_error", 404))
                return
            if parse_error is not None:
                raise RequestError(500, error_body(
                    f"[json.exception.parse_error.101] parse error: {parse_error}",
                    "server_error", 500))
            route(self, body if body is not None else {})
        except RequestError as e:
            try:
                self.send_json(e.status, e.body)
            except DISCONNECT_ERRORS:
                self.close_connection = True
        except DISCONNECT_ERRORS:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug in the fake: answer like ex_wrapper does
            log(f"srv  operator(): got exception: {e!r}")
            try:
                self.send_json(500, error_body(str(e), "server_error", 500))
            except DISCONNECT_ERRORS:
                self.close_connection = True

    # -- simple endpoints --------------------------------------------------

    def get_health(self, body):
        self.send_json(200, {"status": "ok"})

    def get_props(self, body):
        o = self.state.opts
        self.send_json(200, {
            "default_generation_settings": {"n_ctx": o["n_ctx_slot"], "params": {}},
            "total_slots": o["parallel"],
            "model_path": o["model"],
            "modalities": {"vision": False, "audio": False},
            "chat_template": CHAT_TEMPLATE,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "build_info": BUILD_INFO,
            "is_sleeping": False,
        })

    def get_models(self, body):
        o = self.state.opts
        self.send_json(200, {
            "models": [{"name": o["model_name"], "model": o["model_name"], "type": "model",
                        "capabilities": ["completion"], "details": {"format": "gguf"}}],
            "object": "list",
            "data": [model_info(self.state)],
        })

    def post_tokenize(self, body):
        tokens = []
        if "content" in body:
            content = body["content"]
            # a list mixes texts (each tokenized on its own) and token ids (kept), as the real server's
            parts = content if isinstance(content, list) else [content if isinstance(content, str) else str(content)]
            texts = [p for p in parts if isinstance(p, str)]
            if self.state.tokenize_delay and any(self.state.tokenize_delay_if in t for t in texts):
                time.sleep(self.state.tokenize_delay)
            ids, pieces = [], []
            for part in parts:
                if isinstance(part, str):
                    more_ids, more_pieces = tokenize(part)
                    ids += more_ids
                    pieces += more_pieces
                else:
                    ids.append(int(part))
                    pieces.append(_pieces.get(int(part), ""))
            with_pieces = [{"id": i, "piece": p} for i, p in zip(ids, pieces, strict=True)]
            tokens = with_pieces if body.get("with_pieces") else ids
        self.send_json(200, {"tokens": tokens})

    def post_detokenize(self, body):
        ids = body.get("tokens") or []
        self.send_json(200, {"content": detokenize([i for i in ids if isinstance(i, int)])})

    def post_apply_template(self, body):
        try:
            prompt = render_chat(body.get("messages"))
        except ValueError as e:
            raise RequestError(400, error_body(str(e), "invalid_request_error", 400)) from None
        self.send_json(200, {"prompt": prompt})

    # -- embeddings and rerank ---------------------------------------------

    def _inputs(self, value):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return [" ".join(str(v) for v in value)]
        if isinstance(value, list):
            out = []
            for v in value:
                if isinstance(v, str):
                    out.append(v)
                elif isinstance(v, list):
                    out.append(" ".join(str(x) for x in v))
                elif isinstance(v, dict) and "content" in v:
                    out.append(message_text(v["content"]))
                else:
                    out.append(str(v))
            return out
        raise RequestError(400, error_body("\"input\" or \"content\" must be provided",
                                           "invalid_request_error", 400))

    def _embeddings(self, body, oai):
        st = self.state
        o = st.opts
        if not o["embedding"]:
            raise RequestError(501, error_body(
                "This server does not support embeddings. Start it with `--embeddings`",
                "not_supported_error", 501))
        if "input" in body:
            value = body["input"]
        elif "content" in body:
            value, oai = body["content"], False
        else:
            raise RequestError(400, error_body("\"input\" or \"content\" must be provided",
                                               "invalid_request_error", 400))
        if oai and o["pooling"] == "none":
            raise RequestError(400, error_body(
                "Pooling type 'none' is not OAI compatible. Please use a different pooling type",
                "invalid_request_error", 400))
        texts = self._inputs(value)
        if not texts:
            raise RequestError(400, error_body("\"input\" must not be empty", "invalid_request_error", 400))
        if any(count_tokens(t) == 0 for t in texts):
            raise RequestError(400, error_body("Input content cannot be empty", "invalid_request_error", 400))
        if oai:
            data, n = [], 0
            for i, t in enumerate(texts):
                data.append({"embedding": embedding_for(t, EMBED_DIM), "index": i, "object": "embedding"})
                n += count_tokens(t)
            self.send_json(200, {"model": body.get("model", o["model_name"]), "object": "list",
                                 "usage": {"prompt_tokens": n, "total_tokens": n}, "data": data})
            return
        out = []
        for i, t in enumerate(texts):
            if o["pooling"] == "none":
                rows = [embedding_for(p, EMBED_DIM) for p in split_tokens(t)]
            else:
                rows = [embedding_for(t, EMBED_DIM)]
            out.append({"index": i, "embedding": rows})
        self.send_json(200, out)

    def post_embedding(self, body):
        self._embeddings(body, oai=False)

    def post_embeddings_oai(self, body):
        self._embeddings(body, oai=True)

    def post_rerank(self, body):
        o = self.state.opts
        if not o["reranking"]:
            raise RequestError(501, error_body(
                "This server does not support reranking. Start it with `--reranking`",
                "not_supported_error", 501))
        tei = "texts" in body
        if "query" not in body:
            raise RequestError(400, error_body("\"query\" must be provided", "invalid_request_error", 400))
        query = body["query"]
        if not isinstance(query, str):
            raise RequestError(400, error_body("\"query\" must be a string", "invalid_request_error", 400))
        docs = body.get("documents", body.get("texts"))
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            raise RequestError(400, error_body("\"documents\" must be a non-empty string array",
                                               "invalid_request_error", 400))
        top_n = body.get("top_n", len(docs))
        if not isinstance(top_n, int):
            top_n = len(docs)
        label = "score" if tei else "relevance_score"
        results = [{"index": i, label: rerank_score(query, d)} for i, d in enumerate(docs)]
        if tei and body.get("return_text"):
            for r in results:
                r["text"] = docs[r["index"]]
        results.sort(key=lambda r: -r[label])
        results = results[:max(top_n, 0)]
        if tei:
            self.send_json(200, results)
            return
        n = sum(count_tokens(query) + count_tokens(d) for d in docs)
        self.send_json(200, {"model": body.get("model", o["model_name"]), "object": "list",
                             "usage": {"prompt_tokens": n, "total_tokens": n}, "results": results})

    # -- chat --------------------------------------------------------------

    def post_completion(self, body):
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(400, error_body('"prompt" must be a string', "invalid_request_error", 400))
        n_prompt = count_tokens(prompt)
        if n_prompt >= self.state.opts["n_ctx_slot"]:
            raise RequestError(400, error_body("the prompt exceeds the available context size",
                                               "exceed_context_size_error", 400))
        with self.state.slots:
            time.sleep(self.state.completion_delay)
        self.state.events.emit("prompt_read", tokens=n_prompt)
        self.send_json(200, {"content": "", "tokens_evaluated": n_prompt, "tokens_predicted": 0, "stop": True,
                             "timings": {"cache_n": 0, "prompt_n": n_prompt, "predicted_n": 0}})

    def post_chat(self, body):
        st = self.state
        o = st.opts
        try:
            prompt = render_chat(body.get("messages"))
        except ValueError as e:
            raise RequestError(400, error_body(str(e), "invalid_request_error", 400)) from None
        if o["embedding"]:
            log("srv    send_error: task id = 0, error: the current context does not support logits "
                "computation. skipping")
            raise RequestError(500, error_body(
                "the current context does not support logits computation. skipping", "server_error", 500))
        n_prompt = count_tokens(prompt)
        n_ctx = o["n_ctx_slot"]
        if n_prompt >= n_ctx:
            raise RequestError(400, error_body(
                f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it",
                "exceed_context_size_error", 400, n_prompt_tokens=n_prompt, n_ctx=n_ctx))
        tokens = list(st.tokens)
        finish = "stop"
        limit = None
        for key in ("max_tokens", "max_completion_tokens", "n_predict"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
                limit = body[key]
                break
        if limit is not None and 0 <= limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        room = n_ctx - n_prompt
        if len(tokens) > room:
            tokens, finish = tokens[:room], "length"
        ctx = {
            "id": _cmpl_id(), "created": int(time.time()),
            "model": body.get("model") if isinstance(body.get("model"), str) else o["model_name"],
            "n_prompt": n_prompt, "tokens": tokens, "finish": finish,
            "include_usage": isinstance(body.get("stream_options"), dict)
            and bool(body["stream_options"].get("include_usage")),
        }
        with st.slots:  # wait for a free slot, as the real server queues a task
            if body.get("stream"):
                self._chat_stream(ctx)
            else:
                self._chat_blocking(ctx)

    def _crash_mid_stream(self, n):
        st = self.state
        log(f"/fake/ggml/src/ggml-cpu/ops.cpp:4242: GGML_ASSERT(n_tokens <= n_batch) failed "
            f"(simulated crash after {n} tokens)")
        st.events.emit("crash", reason="mid_stream", tokens_sent=n)
        os._exit(4)

    def _timings(self, ctx, started, n):
        gen_ms = max((time.monotonic() - started) * 1000.0, 1e-3)
        return {"cache_n": 0, "prompt_n": ctx["n_prompt"], "prompt_ms": 0.0,
                "prompt_per_token_ms": 0.0, "prompt_per_second": 0.0,
                "predicted_n": n, "predicted_ms": gen_ms,
                "predicted_per_token_ms": gen_ms / max(n, 1),
                "predicted_per_second": n / (gen_ms / 1000.0)}

    def _usage(self, ctx, n):
        return {"completion_tokens": n, "prompt_tokens": ctx["n_prompt"],
                "total_tokens": n + ctx["n_prompt"]}

    def _chunk(self, ctx, delta, finish=None, **extra):
        obj = {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
               "created": ctx["created"], "id": ctx["id"], "model": ctx["model"],
               "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion.chunk"}
        obj.update(extra)
        return obj

    def _chat_stream(self, ctx):
        st = self.state
        sent = 0
        started = time.monotonic()
        try:
            self.send_response(200)
            self._common_headers()
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            try:
                self.end_headers()
            except DISCONNECT_ERRORS:
                raise ClientGone("write_error") from None
            self._write_chunk(_sse(self._chunk(ctx, {"role": "assistant", "content": None})))
            if st.crash_mid_stream == 0:
                self._crash_mid_stream(0)
            for tok in ctx["tokens"]:
                self._wait_or_gone(st.token_delay)
                self._write_chunk(_sse(self._chunk(ctx, {"content": tok})))
                sent += 1
                st.events.emit("token_sent", n=sent)
                if st.crash_mid_stream == sent:
                    self._crash_mid_stream(sent)
            timings = self._timings(ctx, started, sent)
            usage = self._usage(ctx, sent)
            final = self._chunk(ctx, {}, ctx["finish"], usage=usage)
            if not ctx["include_usage"]:
                final["timings"] = timings
            data = _sse(final)
            if ctx["include_usage"]:  # the pinned build's extra usage-only chunk
                data += _sse({"choices": [], "created": ctx["created"], "id": ctx["id"],
                              "model": ctx["model"], "system_fingerprint": SYSTEM_FINGERPRINT,
                              "object": "chat.completion.chunk", "usage": usage, "timings": timings})
            data += b"data: [DONE]\n\n"
            self._write_chunk(data)
            try:
                self.wfile.write(b"0\r\n\r\n")
            except DISCONNECT_ERRORS:
                raise ClientGone("write_error") from None
        except ClientGone as gone:
            self.close_connection = True
            st.events.emit("client_disconnected", tokens_sent=sent, stream=True, how=gone.how)
            log(f"srv  operator(): client disconnected after {sent} streamed tokens ({gone.how})")
            return
        st.events.emit("stream_finished", tokens_sent=sent, finish_reason=ctx["finish"])

    def _chat_blocking(self, ctx):
        st = self.state
        made = 0
        started = time.monotonic()
        try:
            if st.crash_mid_stream == 0:
                self._crash_mid_stream(0)
            for _ in ctx["tokens"]:
                self._wait_or_gone(st.token_delay)
                made += 1
                st.events.emit("token_generated", n=made)
                if st.crash_mid_stream == made:
                    self._crash_mid_stream(made)
        except ClientGone as gone:
            self.close_connection = True
            st.events.emit("client_disconnected", tokens_sent=made, stream=False, how=gone.how)
            log(f"srv  operator(): client disconnected after {made} generated tokens ({gone.how})")
            return
        self.send_json(200, {
            "choices": [{"finish_reason": ctx["finish"], "index": 0,
                         "message": {"role": "assistant", "content": "".join(ctx["tokens"])}}],
            "created": ctx["created"], "model": ctx["model"],
            "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion",
            "usage": self._usage(ctx, made), "id": ctx["id"],
            "timings": self._timings(ctx, started, made),
        })
        st.events.emit("completion_finished", tokens=made, finish_reason=ctx["finish"])


def model_info(state):
    o = state.opts
    return {"id": o["model_name"], "aliases": [], "tags": [], "object": "model",
            "created": int(time.time()), "owned_by": "llamacpp",
            "meta": {"vocab_type": 2, "n_vocab": 50100, "n_ctx": o["n_ctx"],
                     "n_ctx_train": o["n_ctx"], "n_embd": EMBED_DIM,
                     "n_params": 0, "size": 0, "ftype": "fake"}}


ROUTES = {
    ("GET", "/health"): Handler.get_health,
    ("GET", "/v1/health"): Handler.get_health,
    ("GET", "/props"): Handler.get_props,
    ("GET", "/models"): Handler.get_models,
    ("GET", "/v1/models"): Handler.get_models,
    ("POST", "/tokenize"): Handler.post_tokenize,
    ("POST", "/detokenize"): Handler.post_detokenize,
    ("POST", "/apply-template"): Handler.post_apply_template,
    ("POST", "/completion"): Handler.post_completion,
    ("POST", "/chat/completions"): Handler.post_chat,
    ("POST", "/v1/chat/completions"): Handler.post_chat,
    ("POST", "/embedding"): Handler.post_embedding,
    ("POST", "/embeddings"): Handler.post_embedding,
    ("POST", "/v1/embeddings"): Handler.post_embeddings_oai,
    ("POST", "/rerank"): Handler.post_rerank,
    ("POST", "/reranking"): Handler.post_rerank,
    ("POST", "/v1/rerank"): Handler.post_rerank,
    ("POST", "/v1/reranking"): Handler.post_rerank,
}


# ---------------------------------------------------------------------------
# lifecycle

def _lifecycle(state, stop):
    if stop.wait(max(_env_float("FAKE_LLAMA_START_DELAY", 0.05), 0.0)):
        return
    if _env_flag("FAKE_LLAMA_NEVER_READY"):
        return
    state.ready.set()
    log("srv   load_model: model loaded")
    state.events.emit("ready")


def _crash_after(seconds, events):
    time.sleep(seconds)
    log("/fake/src/llama-context.cpp:1234: GGML_ASSERT(ubatch.n_tokens > 0) failed "
        f"(simulated crash after {seconds} s, FAKE_LLAMA_CRASH_AFTER)")
    events.emit("crash", reason="crash_after")
    os._exit(3)


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts["help"]:
        print(__doc__)
        return 0
    if opts["version"]:
        log(f"version: 0 ({BUILD_INFO})")
        return 0

    events = EventLog(os.environ.get("FAKE_LLAMA_EVENT_LOG"))
    stop = threading.Event()
    stop_reason = {}

    def on_signal(signum, frame):
        stop_reason.setdefault("reason", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, signal.SIG_IGN if _env_flag("FAKE_LLAMA_IGNORE_SIGTERM") else on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log(f"build: 0 ({BUILD_INFO}) with python {sys.version.split()[0]} for fake-llama-server")
    log(f"system info: n_threads = {opts.get('threads', '?')} | fake")
    log(f"main: loading model '{opts['model']}'")

    fail_start = _env_int("FAKE_LLAMA_FAIL_START")
    if fail_start is not None:
        log("gguf_init_from_file_impl: failed to read key-value pairs")
        log(f"llama_model_load: error loading model: llama_model_loader: failed to load model from "
            f"{opts['model']} (fake failure requested by FAKE_LLAMA_FAIL_START)")
        log("llama_model_load_from_file_impl: failed to load model")
        log("main: exiting due to model loading error")
        events.emit("start_failed", code=fail_start, reason="FAKE_LLAMA_FAIL_START")
        return fail_start

    host = opts["host"]
    FakeHTTPServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = FakeHTTPServer((host, opts["port"]), Handler)
    except OSError as e:
        log(f"srv    start: couldn't bind HTTP server socket, hostname: {host}, port: {opts['port']} ({e})")
        log("srv  llama_server: exiting due to HTTP server error")
        events.emit("start_failed", code=1, reason=f"bind: {e}")
        return 1
    state = State(opts, events)
    server.state = state
    port = server.server_address[1]
    events.port = port
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    log(f"main: server is listening on http://{shown}:{port}")
    events.emit("listening", host=host)

    threading.Thread(target=_lifecycle, args=(state, stop), daemon=True).start()
    crash_after = _env_float("FAKE_LLAMA_CRASH_AFTER", None)
    if crash_after is not None:
        threading.Thread(target=_crash_after, args=(crash_after, events), daemon=True).start()

    while not stop.wait(0.1):
        pass

    log("srv    operator(): operator(): cleaning up before exit...")
    events.emit("shutdown", reason=stop_reason.get("reason", "unknown"))
    server.shutdown()
    server.server_close()
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
