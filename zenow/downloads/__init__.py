"""Downloads: model files fetched over HTTP, resumable and checked, owned by one actor.

Other code holds a `Downloads` handle: `start` (returns at once), `fetch` (waits for
the end), `status`, `all`, `cancel`, `discard`.  A file lands in `models/<mode>/<filename>`
only once it is complete and checked, and is then registered as a model of its mode.
Sizes are capped (`max_download_size`), free space is kept (`download_free_margin`),
credentials in a URL are never shown (`redact_url`), and a file already at the name is
used only when it is known to be the one asked for (else `FileAlreadyExists`, 409).

Layering: `_target` checks a request (pure), `_redact` hides credentials (pure),
`_headers` reads Content-Range and Content-Length (pure), `_files` does the blocking
file work (the `.part`, its digest, the rename), `_exchange` is one attempt's HTTP
exchange, blocking (stdlib `http.client`): the request, its redirects, and the body
read into one buffer and written to the `.part` by the same worker thread (trio-free),
`_actor` holds the actor, its transfer tasks (which follow the thread's counters to
announce progress, and shut its socket down to cancel it) and the handle.
"""

from ._actor import CANCELLED as CANCELLED
from ._actor import INTERRUPTED as INTERRUPTED
from ._actor import DiscardedDownload as DiscardedDownload
from ._actor import DownloadActor as DownloadActor
from ._actor import DownloadPolicy as DownloadPolicy
from ._actor import Downloads as Downloads
from ._actor import FileAlreadyExists as FileAlreadyExists
from ._progress import progress_percent as progress_percent
from ._redact import redact_text as redact_text
from ._redact import redact_url as redact_url
from ._target import DownloadTarget as DownloadTarget
