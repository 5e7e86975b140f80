"""OpenAI-compatible `/v1`: chat completions, embeddings, rerank and models, over the three
server actors.

`OpenAIGateway` is what routes call; `UpstreamActor` owns the HTTP client and every
upstream request in flight; `_shapes` is the pure request and answer shaping; `_readahead`
reads a chat completion's next turn into llama-server's cache, and keeps the conversation's
next request off that read.
"""

from ..servers import DEFAULT_SWITCH_WAIT as DEFAULT_SWITCH_WAIT
from ..servers import Lease as Lease
from ..servers import ModelGate as ModelGate
from ._actor import UpstreamActor as UpstreamActor
from ._errors import ModelBusy as ModelBusy
from ._errors import ModelLoadFailed as ModelLoadFailed
from ._errors import ModelNotLoaded as ModelNotLoaded
from ._gateway import CompletionStream as CompletionStream
from ._gateway import OpenAIGateway as OpenAIGateway
from ._shapes import ChatCompletionBody as ChatCompletionBody
from ._shapes import ChatCompletionRequest as ChatCompletionRequest
from ._shapes import EmbeddingsBody as EmbeddingsBody
from ._shapes import EmbeddingsRequest as EmbeddingsRequest
from ._shapes import ModelEntry as ModelEntry
from ._shapes import RerankBody as RerankBody
from ._shapes import RerankRequest as RerankRequest
from ._shapes import model_object as model_object
from ._shapes import parse_chat_completion as parse_chat_completion
from ._shapes import parse_embeddings as parse_embeddings
from ._shapes import parse_rerank as parse_rerank
