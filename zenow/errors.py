"""Zenow's exception tree.

Every error zenow raises on purpose is a `ZenowError`; the HTTP layer maps the
middle classes to a status code in one place (`zenow.app`), and the message of
the exception is the `detail` the client sees::

    ZenowError
    ├── InvalidRequest            400: the request is wrong; nothing was changed
    │   ├── InvalidMode
    │   ├── InvalidModelFile      not a GGUF file, or no file at the path
    │   └── ContextOverflow       the request alone does not fit the context window
    ├── NotFound                  404
    │   ├── SessionNotFound
    │   ├── ModelNotFound
    │   └── DownloadNotFound
    ├── ServerNotRunning          400: the mode's llama-server is not running
    │   ├── ModelNotLoaded        503: nothing runs and the request named no model (`/v1`)
    │   └── BackendUnavailable    503: the mode's remote backend (`backend_url`) does not answer
    ├── ServerStartFailed         500: llama-server did not come up; says why
    │   ├── ModelLoadFailed       500: the model a request named did not start
    │   └── ModelWakeFailed       503: a model stopped for idleness did not start again
    ├── ModelBusy                 409: a switch of model waited too long for requests in flight
    ├── BackendInUse              409: a load for a mode that a remote backend serves
    ├── UpstreamError             502: llama-server answered badly or went away
    ├── DownloadFailed            the download ended in `failed`; says why
    ├── StoreError                500: the database failed (translated from sqlite3)
    │   ├── StorageFull           507: the disk holding the database is full
    │   └── StoreReadOnly         503: the database cannot be written (read-only file or folder)
    ├── TooManyStreams            503: the most chat streams zenow serves at once are open
    ├── ActorCrashed              500: a bug in an actor while serving the call (it restarts)
    └── ActorUnavailable          503: an actor is stopped, or stopped while serving the call

Errors from libraries (sqlite3, httpx, OSError from spawning) are translated
where they enter zenow, with `raise ... from`.
"""

from __future__ import annotations

from .settings import MODES  # the one list of modes (settings imports nothing of zenow)

__all__ = [
    "ActorCrashed",
    "ActorUnavailable",
    "BackendInUse",
    "BackendUnavailable",
    "ContextOverflow",
    "DownloadFailed",
    "DownloadNotFound",
    "InvalidMode",
    "InvalidModelFile",
    "InvalidRequest",
    "ModelBusy",
    "ModelLoadFailed",
    "ModelWakeFailed",
    "ModelNotLoaded",
    "ModelNotFound",
    "NotFound",
    "ServerNotRunning",
    "ServerStartFailed",
    "SessionNotFound",
    "StorageFull",
    "StoreError",
    "StoreReadOnly",
    "TooManyStreams",
    "UpstreamError",
    "ZenowError",
    "single_cause",
]


class ZenowError(Exception):
    """Base of every error zenow raises on purpose; `str(error)` is the user-facing detail.

    `param` names the request field at fault and `code` is a short machine-readable
    reason, where known (the OpenAI error shape on `/v1` shows both).
    """

    status_code = 500
    #: The `param` and `code` of every instance that does not give its own.
    default_param: str | None = None
    default_code: str | None = None

    def __init__(self, *args: object, param: str | None = None, code: str | None = None) -> None:
        super().__init__(*args)
        self.param = param if param is not None else self.default_param
        self.code = code if code is not None else self.default_code

    @property
    def detail(self) -> str:
        return str(self)


class InvalidRequest(ZenowError):
    status_code = 400


class InvalidMode(InvalidRequest):
    def __init__(self, mode: object) -> None:
        super().__init__(f"Invalid mode {mode!r}: must be one of {', '.join(repr(m) for m in MODES)}")


class InvalidModelFile(InvalidRequest):
    pass


class ContextOverflow(InvalidRequest):
    pass


class NotFound(ZenowError):
    status_code = 404


class SessionNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Session not found")


class ModelNotFound(NotFound):
    pass


class DownloadNotFound(NotFound):
    pass


class ServerNotRunning(ZenowError):
    status_code = 400


class ServerStartFailed(ZenowError):
    status_code = 500


class UpstreamError(ZenowError):
    status_code = 502


class DownloadFailed(ZenowError):
    status_code = 502


class StoreError(ZenowError):
    status_code = 500


class StorageFull(StoreError):
    status_code = 507


class StoreReadOnly(StoreError):
    status_code = 503


class TooManyStreams(ZenowError):
    status_code = 503
    default_code = "too_many_streams"


class ActorCrashed(ZenowError):
    status_code = 500


class ActorUnavailable(ZenowError):
    status_code = 503


class ModelNotLoaded(ServerNotRunning):
    """No model of the route's mode is running and the request did not name one."""

    status_code = 503
    default_param, default_code = "model", "model_not_loaded"


class BackendUnavailable(ServerNotRunning):
    """The mode is served by a remote backend that does not answer (its health check failed)."""

    status_code = 503
    default_code = "backend_unavailable"


class ModelLoadFailed(ServerStartFailed):
    """The model a request named did not start; the message says why."""

    default_param, default_code = "model", "model_load_failed"


class ModelWakeFailed(ServerStartFailed):
    """A model stopped for idleness (`keep_alive`) did not start again for a request; says why."""

    status_code = 503
    default_code = "model_wake_failed"


class ModelBusy(ZenowError):
    """Switching to the named model would cut requests still being answered by the running one."""

    status_code = 409
    default_param, default_code = "model", "model_busy"


class BackendInUse(ZenowError):
    """A local model was asked for while the mode is served by a remote backend (`backend_url`)."""

    status_code = 409
    default_param, default_code = "backend_url", "backend_in_use"


def single_cause(error: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else `error` itself.

    Trio's nurseries wrap what a task raised in an exception group; where exactly one
    thing went wrong, this is that thing.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
