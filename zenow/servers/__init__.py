"""Server actors: one per mode (llm, embed, rerank), each owning one llama-server child.

Also the GGUF header reader (`read_gguf_info`, `GGUFInfo`, `has_gguf_magic`, `model_details`,
`mode_problem`): what a model file says about itself, whether llama-server can read it, and
which modes it can serve.  And `prefill`: a conversation's next turn read into llama-server's
cache ahead of it.
"""

from ._actor import ServerActor as ServerActor
from ._actor import ServerBoard as ServerBoard
from ._actor import ServerHandle as ServerHandle
from ._actor import ServerStatus as ServerStatus
from ._batching import batched_reads as batched_reads
from ._binary import LLAMA_CPP_PYTHON_VERSION as LLAMA_CPP_PYTHON_VERSION
from ._binary import find_llama_server as find_llama_server
from ._binary import find_rpc_server as find_rpc_server
from ._client import STREAM_HEADERS as STREAM_HEADERS
from ._client import upstream_client as upstream_client
from ._gate import DEFAULT_SWITCH_WAIT as DEFAULT_SWITCH_WAIT
from ._gate import Lease as Lease
from ._gate import ModelGate as ModelGate
from ._gguf import GGUF_MAGIC as GGUF_MAGIC
from ._gguf import GGUFInfo as GGUFInfo
from ._gguf import has_gguf_magic as has_gguf_magic
from ._gguf import mode_problem as mode_problem
from ._gguf import model_details as model_details
from ._gguf import read_gguf_info as read_gguf_info
from ._idle import Activity as Activity
from ._params import SERVER_KEYS as SERVER_KEYS
from ._prefill import PLACEHOLDER as PLACEHOLDER
from ._prefill import PREFILL_DEADLINE as PREFILL_DEADLINE
from ._prefill import next_turn_prefix as next_turn_prefix
from ._prefill import prefill as prefill
