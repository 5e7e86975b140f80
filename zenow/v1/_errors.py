"""The errors only `/v1` raises, each a subclass of a `zenow.errors` class::

    ServerNotRunning
    └── ModelNotLoaded      503: the mode runs no model and the request named none
    ServerStartFailed
    └── ModelLoadFailed     500: the model the request named could not be started
    ZenowError
    └── ModelBusy           409: a switch to the named model waited too long for requests in flight
"""

from __future__ import annotations

from ..errors import ServerNotRunning, ServerStartFailed, ZenowError

__all__ = ["ModelBusy", "ModelLoadFailed", "ModelNotLoaded"]


class ModelNotLoaded(ServerNotRunning):
    """No model of the route's mode is running and the request did not name one."""

    status_code = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_loaded")


class ModelLoadFailed(ServerStartFailed):
    """The model a request named did not start; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_load_failed")


class ModelBusy(ZenowError):
    """Switching to the named model would cut requests still being answered by the running one."""

    status_code = 409

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_busy")
