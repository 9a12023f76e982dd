"""The stand-in's four Dify apps, one per API key, so a test picks the app type by the key it
gives the proxy (`DIFY_API_KEY`), as with real Dify, where each key belongs to one app.

With the stand-in started with key K (`--api-key K`, default `app-standin-dev-key`):

| key            | mode            | what it is                                                  |
|----------------|-----------------|-------------------------------------------------------------|
| K              | `advanced-chat` | a chatflow: Start -> (Human Input x n) -> Answer (default)  |
| K-workflow     | `workflow`      | a workflow app: Start (one required text input `text`) -> End |
| K-completion   | `completion`    | a completion app (no conversation)                          |
| K-chat         | `chat`          | a basic chat app: `message` events and `message_end` only   |

`/info` names the mode, `/parameters` and `/site` describe the app, and a route that does not
fit the mode answers as Dify does (400 `not_chat_app`, `not_workflow_app`, `app_unavailable`).
"""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from aiohttp import web

from dify_proxy.standin.wire import DifyError

CHATFLOW, WORKFLOW, COMPLETION, CHAT = "advanced-chat", "workflow", "completion", "chat"
SUFFIXES = {"": CHATFLOW, "-workflow": WORKFLOW, "-completion": COMPLETION, "-chat": CHAT}
MODE = web.RequestKey("app_mode", str)
WRONG_ROUTE = "Please check if your app mode matches the right API route."
TITLES = {
    CHATFLOW: "Dify stand-in chatflow",
    WORKFLOW: "Dify stand-in workflow",
    COMPLETION: "Dify stand-in completion",
    CHAT: "Dify stand-in chat",
}
TEXT_INPUT = {
    "text-input": {
        "default": "",
        "hint": "",
        "label": "text",
        "max_length": 256,
        "options": [],
        "placeholder": "",
        "required": True,
        "type": "text-input",
        "variable": "text",
    }
}
SIZES = {
    "image_file_size_limit": 10,
    "video_file_size_limit": 100,
    "audio_file_size_limit": 50,
    "file_size_limit": 15,
    "workflow_file_upload_limit": 10,
}


def mode_of(token: bytes, key: bytes) -> str | None:
    """The mode of the app a bearer token opens, or None for no app of this stand-in."""
    found = None
    for suffix, mode in SUFFIXES.items():
        if hmac.compare_digest(token, key + suffix.encode()):
            found = mode
    return found


def app_id(request: web.Request) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin-app:{request[MODE]}"))


def workflow_id(request: web.Request) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin-workflow:{request[MODE]}"))


def require(request: web.Request, *modes: str) -> str:
    """Refuse a route that is not this app's, with Dify's error for the route's family."""
    mode = request[MODE]
    if mode in modes:
        return mode
    if CHATFLOW in modes or CHAT in modes:
        raise DifyError(400, "not_chat_app", WRONG_ROUTE)
    if WORKFLOW in modes:
        raise DifyError(400, "not_workflow_app", WRONG_ROUTE)
    message = "App unavailable, please check your app configurations."
    raise DifyError(400, "app_unavailable", message)


def info(mode: str) -> dict[str, Any]:
    return {
        "name": TITLES[mode],
        "description": f"A local stand-in for a Dify {mode} app.",
        "tags": [],
        "mode": mode,
        "author_name": "dify-proxy",
    }


def parameters(mode: str) -> dict[str, Any]:
    """Byte for byte what Dify 1.16.1 answered for the captured apps (an app with no model
    features); a workflow or completion app asks for its one `text` input."""
    chatty = mode in (CHATFLOW, CHAT)
    fixed = {"audio_file_size_limit": 50, "batch_count_limit": 5, "file_size_limit": 15}
    return {
        "opening_statement": "",
        "suggested_questions": [],
        "suggested_questions_after_answer": {"enabled": False},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "language": "", "voice": ""},
        "retriever_resource": {"enabled": True},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "user_input_form": [] if chatty else [TEXT_INPUT],
        "sensitive_word_avoidance": {"enabled": False},
        "file_upload": {
            "allowed_file_extensions": [".JPG", ".JPEG", ".PNG", ".GIF", ".WEBP", ".SVG"],
            "allowed_file_types": ["image"],
            "allowed_file_upload_methods": ["local_file", "remote_url"],
            "enabled": False,
            "fileUploadConfig": {
                **fixed,
                "image_file_size_limit": 10,
                "video_file_size_limit": 100,
                "workflow_file_upload_limit": 10,
            },
            "image": {
                "enabled": False,
                "number_limits": 3,
                "transfer_methods": ["local_file", "remote_url"],
            },
            "number_limits": 3,
        },
        "system_parameters": dict(SIZES),
    }


def site(mode: str) -> dict[str, Any]:
    return {
        "title": TITLES[mode],
        "chat_color_theme": None,
        "chat_color_theme_inverted": False,
        "icon_type": "emoji",
        "icon": "\U0001f916",
        "icon_background": "#FFEAD5",
        "description": None,
        "copyright": None,
        "privacy_policy": None,
        "input_placeholder": None,
        "custom_disclaimer": "",
        "default_language": "en-US",
        "show_workflow_steps": True,
        "use_icon_as_answer_icon": False,
        "icon_url": None,
    }
