"""Server actors: one per mode (llm, embed, rerank), each owning one llama-server child."""

from ._actor import ServerActor as ServerActor
from ._actor import ServerBoard as ServerBoard
from ._actor import ServerHandle as ServerHandle
from ._actor import ServerStatus as ServerStatus
from ._binary import LLAMA_CPP_PYTHON_VERSION as LLAMA_CPP_PYTHON_VERSION
from ._binary import find_llama_server as find_llama_server
from ._params import SERVER_KEYS as SERVER_KEYS
