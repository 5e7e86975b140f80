"""The terminal client: `zenow pull`, `run` (`chat`), `status`, `models`, `load`, `sessions`.

It talks to a running zenow over its HTTP API only (httpx; `--url` or `ZENOW_URL`,
default http://127.0.0.1:8050) and imports no actor.  On a terminal it shows rich
tables, progress bars and streamed replies; otherwise plain lines, or JSON with
`--json`.  A failure is one line on stderr and exit code 1.

Layering: `_sse` reads event streams (pure), `_api` is zenow's HTTP API with its
errors as one line, `_output` renders, `_commands`, `_pull` and `_chat` are the
commands, `_cli` their options.
"""

from ._cli import CLIENT_COMMANDS as CLIENT_COMMANDS
from ._cli import add_client_commands as add_client_commands
from ._cli import run_client_command as run_client_command
