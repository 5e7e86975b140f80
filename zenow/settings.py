"""The one settings object, built once at start and handed down.

Precedence: command-line options over environment variables over defaults.
Nothing else in zenow reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeGuard, get_args

__all__ = ["MODES", "DEFAULT_SYSTEM_PROMPT", "DEFAULT_URLS", "Mode", "Settings", "is_mode", "on_or_off",
           "stream_batch_window"]

#: The three kinds of model zenow serves, each by its own llama-server child.
Mode = Literal["llm", "embed", "rerank"]
MODES: tuple[Mode, ...] = get_args(Mode)


def is_mode(value: object) -> TypeGuard[Mode]:
    """Whether `value` names one of the modes."""
    return value in MODES


DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

DEFAULT_URLS: dict[str, list[str]] = {
    "llm": [
        "https://modelscope.cn/models/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/master/qwen2.5-0.5b-instruct-q4_0.gguf",
        "https://modelscope.cn/models/unsloth/Qwen3-0.6B-GGUF/resolve/main/Qwen3-0.6B-Q4_K_M.gguf",
    ],
    "embed": [
        "https://modelscope.cn/models/AI-ModelScope/bge-small-zh-v1.5-gguf/resolve/master/bge-small-zh-v1.5-q4_0.gguf",
    ],
    "rerank": [
        "https://modelscope.cn/models/AI-ModelScope/bge-reranker-v2-m3-gguf/resolve/master/bge-reranker-v2-m3-q4_0.gguf",
    ],
}
DEFAULT_BROWSER_PATH = "https://modelscope.cn/models"


def cache_root(environ: Mapping[str, str]) -> Path:
    cache = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(cache).expanduser()


#: How long a streamed token may be held to share a read with the next ones, by default (seconds).
DEFAULT_STREAM_BATCH_WINDOW = 0.05
#: The longest a streamed token may be held to share a read with the next ones (seconds).
MAX_STREAM_BATCH_WINDOW = 0.2


def stream_batch_window(milliseconds: str) -> float:
    """The batch window in seconds from its text in milliseconds (`ZENOW_STREAM_BATCH_MS`,
    `--stream-batch-ms`); ValueError names what is wrong."""
    try:
        value = float(milliseconds) / 1000
    except ValueError:
        raise ValueError(f"the stream batch window is a number of milliseconds, not {milliseconds!r}") from None
    if not 0 <= value <= MAX_STREAM_BATCH_WINDOW:
        raise ValueError(f"the stream batch window must be 0 to {MAX_STREAM_BATCH_WINDOW * 1000:g} ms, "
                         f"not {milliseconds}")
    return value


def on_or_off(text: str, name: str) -> bool:
    """A switch's value from its text: on/off, 1/0, true/false, yes/no (any case)."""
    value = text.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"{name} is on or off, not {text!r}")


def default_home(environ: Mapping[str, str]) -> Path:
    if environ.get("ZENOW_HOME"):
        return Path(environ["ZENOW_HOME"]).expanduser()
    return cache_root(environ) / "zenow"


@dataclass(frozen=True)
class Settings:
    """Everything configurable about one zenow process."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 8050
    #: Extra CORS origins allowed beyond the built-in local ones (exact strings; "null" for file:// pages).
    cors_origins: tuple[str, ...] = ()
    #: Host names accepted in the `Host` header besides localhost, 127.0.0.1 and [::1].
    allowed_hosts: tuple[str, ...] = ()
    #: Keys a client must present (`Authorization: Bearer KEY` or `x-api-key: KEY`); none: no check.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Allow listening beyond loopback without an API key.
    insecure: bool = False
    #: llama-server binary; None means "look it up" (ZENOW_LLAMA_SERVER, PATH, the ops cache).
    llama_server: str | None = None
    #: llama.cpp's rpc-server for `zenow worker`; None means "look it up" (see `find_rpc_server`).
    rpc_server: str | None = None
    #: A GGUF file to register and load as the llm model when the home has none.
    default_llm: Path | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    default_urls: Mapping[str, list[str]] = field(default_factory=lambda: DEFAULT_URLS)
    browser_path: str = DEFAULT_BROWSER_PATH
    #: Seconds a stopping llama-server gets between SIGTERM and SIGKILL.
    stop_grace: float = 5.0
    #: First delay before restarting a crashed llama-server (doubling, capped at 30 s).
    restart_backoff: float = 1.0
    #: Seconds allowed for llama-server to become healthy: base + per GiB of model file.
    start_timeout_base: float = 30.0
    start_timeout_per_gib: float = 60.0
    #: Seconds between health checks of a mode's remote backend (`backend_url`).
    backend_check_interval: float = 2.0
    #: Seconds a database write waits for a lock held by another connection.
    db_busy_timeout: float = 5.0
    #: Seconds a shutdown gives open HTTP requests before cancelling them.
    graceful_timeout: float = 3.0
    #: The PATH searched for llama-server (captured at start).
    search_path: str = ""
    #: The user's cache directory, where ops/provide-llama-server.sh caches the binary it builds.
    cache_root: Path = field(default_factory=lambda: Path("~/.cache").expanduser())
    #: The largest model file a download may write (bytes); also the limit when no Content-Length is sent.
    max_download_size: int = 64 * 2**30
    #: Free space a download must leave on the file system of the mode's models folder (bytes).
    download_free_margin: int = 512 * 2**20
    #: The largest request body accepted (bytes); larger ones answer 413 unread.
    max_body_size: int = 8 * 2**20
    #: Open HTTP connections served at once; more wait in the listen backlog.
    max_connections: int = 256
    #: Chats (`/api/chat`) generating at once; more answer 503 until one ends.
    max_chat_streams: int = 64
    #: Seconds a streamed token may wait to share one read with the next ones, when the model is fast
    #: enough for that (`zenow.servers.batched_reads`); 0: each token is read as it comes.
    stream_batch_window: float = DEFAULT_STREAM_BATCH_WINDOW
    #: After a chat's reply, have llama-server read the start of the session's next turn into its cache
    #: (`zenow.servers.prefill`), so the next turn's first token comes sooner on a long conversation.
    prefill_next_turn: bool = True
    #: Seconds a client may take to send a request's body before it is answered 408.
    read_timeout: float = 30.0
    #: Seconds a connection may sit idle, or take to send a request's headers, before it is closed.
    keep_alive_timeout: float = 5.0

    @property
    def database_path(self) -> Path:
        return self.home / "zenow.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def mode_dir(self, mode: Mode) -> Path:
        return self.models_dir / mode

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from `environ` (default: os.environ) and explicit overrides.

        Overrides whose value is None are ignored, so unset command-line options fall
        through to the environment and then to the defaults.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {"home": default_home(env)}
        if env.get("ZENOW_HOST"):
            values["host"] = env["ZENOW_HOST"]
        if env.get("ZENOW_PORT"):
            values["port"] = int(env["ZENOW_PORT"])
        if env.get("ZENOW_CORS_ORIGINS"):
            values["cors_origins"] = tuple(o.strip() for o in env["ZENOW_CORS_ORIGINS"].split(",") if o.strip())
        if env.get("ZENOW_ALLOWED_HOSTS"):
            values["allowed_hosts"] = tuple(h.strip() for h in env["ZENOW_ALLOWED_HOSTS"].split(",") if h.strip())
        if env.get("ZENOW_API_KEY"):
            values["api_keys"] = (env["ZENOW_API_KEY"].strip(),)
        if env.get("ZENOW_LLAMA_SERVER"):
            values["llama_server"] = env["ZENOW_LLAMA_SERVER"]
        if env.get("ZENOW_RPC_SERVER"):
            values["rpc_server"] = env["ZENOW_RPC_SERVER"]
        if env.get("ZENOW_SYSTEM_PROMPT"):
            values["system_prompt"] = env["ZENOW_SYSTEM_PROMPT"]
        if env.get("ZENOW_DEFAULT_LLM"):
            values["default_llm"] = Path(env["ZENOW_DEFAULT_LLM"])
        if env.get("ZENOW_STREAM_BATCH_MS"):
            values["stream_batch_window"] = stream_batch_window(env["ZENOW_STREAM_BATCH_MS"])
        if env.get("ZENOW_PREFILL_NEXT_TURN"):
            values["prefill_next_turn"] = on_or_off(env["ZENOW_PREFILL_NEXT_TURN"], "ZENOW_PREFILL_NEXT_TURN")
        values["search_path"] = env.get("PATH", "")
        values["cache_root"] = cache_root(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
