"""HTTP routes, one module per part of the spec.  Routes are thin: parse and
validate, make one call on an actor handle, render the answer."""

from . import chat, downloads, events, metrics, models, openai, page, sessions, system

blueprints = [system.bp, sessions.bp, models.bp, downloads.bp, chat.bp, openai.bp, events.bp, metrics.bp, page.bp]
