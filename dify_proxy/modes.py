"""Which kind of Dify app is behind DIFY_API_KEY, and the 400 for a route that does not fit it.

Dify's `/info` says the app's `mode`. A Dify app never changes its mode, so it is asked once per
process (through the `/api/info` cache) and kept. Routes of other apps (workflow, completion,
human input) check it before calling Dify; `/api/chat` asks nothing extra: it checks a mode
already known, and otherwise learns it only when Dify refuses the question as `not_chat_app`.
"""

from __future__ import annotations

import json

from flask import current_app

from .dify import Dify
from .errors import ApiError

CHAT_MODES = ("chat", "agent-chat", "advanced-chat")
WORKFLOW_MODES = ("workflow", "advanced-chat")  # apps whose answers are workflow runs
# How each mode is named in an error, and the route its answers come from.
MODE_NAMES = {
    "chat": ("a chat app", "POST /api/chat"),
    "agent-chat": ("an agent app", "POST /api/chat"),
    "advanced-chat": ("a chatflow (advanced-chat) app", "POST /api/chat"),
    "workflow": ("a workflow app", "POST /api/workflows/run"),
    "completion": ("a completion app", "POST /api/completion-messages"),
}


def known_mode() -> str | None:
    """The mode if this process has learnt it; never calls Dify."""
    return current_app.extensions.get("dify_proxy.app_mode")


def app_mode() -> str | None:
    """The app's mode, from Dify's `/info` the first time (a 2xx there is cached for
    /api/info too); None when Dify does not say."""
    mode = known_mode()
    if mode is not None:
        return mode
    cache = current_app.extensions["dify_proxy.app_info"]
    body = cache.get("/info")
    if body is None:
        dify: Dify = current_app.extensions["dify_proxy.dify"]
        with dify.call("GET", "/info") as response:
            body = response.content
        cache.put("/info", body)
    try:
        info = json.loads(body)
    except ValueError:
        return None
    mode = info.get("mode") if isinstance(info, dict) else None
    if not isinstance(mode, str):
        return None
    current_app.extensions["dify_proxy.app_mode"] = mode
    return mode


def require_mode(*modes: str) -> str:
    """The app's mode if it is one of `modes`, else a 400 that names it and the route to use.
    An app whose mode Dify does not say is let through: Dify answers for itself then."""
    mode = app_mode()
    if mode is None or mode in modes:
        return mode or modes[0]
    raise mismatch(mode)


def mismatch(mode: str) -> ApiError:
    name, route = MODE_NAMES.get(mode, (f"a {mode} app", "the route for that kind of app"))
    return ApiError(
        400, "app_mode_mismatch", f"This Dify app is {name} (mode {mode}); use {route}."
    )


def stop_app(mode: str) -> str:
    """Which stop call a task of an app of this mode takes (dify.STOP_PATHS)."""
    return {"workflow": "workflow", "completion": "completion"}.get(mode, "chat")
