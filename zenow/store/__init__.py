"""The store: zenow's one SQLite database, owned by one actor.

Sessions, messages, the model registry, per-mode parameters and downloads.
Other code reaches it through `Store`, the actor's typed handle.
"""

from ._actor import Store as Store
from ._actor import StoreActor as StoreActor
from ._backup import backup_database as backup_database
from ._records import DownloadRecord as DownloadRecord
from ._records import MessageInfo as MessageInfo
from ._records import ModelDetails as ModelDetails
from ._records import ModelInfo as ModelInfo
from ._records import Role as Role
from ._records import SessionInfo as SessionInfo
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
