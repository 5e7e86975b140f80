"""The errors `/v1` raises, defined with the rest in `zenow.errors`::

    ServerNotRunning
    └── ModelNotLoaded      503: the mode runs no model and the request named none
    ServerStartFailed
    └── ModelLoadFailed     500: the model the request named could not be started
    ZenowError
    └── ModelBusy           409: a switch to the named model waited too long for requests in flight
"""

from __future__ import annotations

from ..errors import ModelBusy as ModelBusy
from ..errors import ModelLoadFailed as ModelLoadFailed
from ..errors import ModelNotLoaded as ModelNotLoaded

__all__ = ["ModelBusy", "ModelLoadFailed", "ModelNotLoaded"]
