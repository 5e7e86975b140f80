"""The chat streamer: `/api/chat` prompts, streaming and saving."""

from ._events import DONE as DONE
from ._events import Delta as Delta
from ._events import Failed as Failed
from ._events import Finished as Finished
from ._events import sse as sse
from ._prompt import Turn as Turn
from ._prompt import history_anchor as history_anchor
from ._prompt import history_in_steps as history_in_steps
from ._prompt import history_step as history_step
from ._prompt import history_within as history_within
from ._streamer import NOT_RUNNING as NOT_RUNNING
from ._streamer import ChatRequest as ChatRequest
from ._streamer import ChatResult as ChatResult
from ._streamer import ChatStream as ChatStream
from ._streamer import ChatStreamer as ChatStreamer
from ._streamer import ChatStreamerActor as ChatStreamerActor
