"""Request validation shared by every blueprint: checks that run before Dify is called, so
that a bad request costs no tokens and gets a 4xx a front-end developer can act on.

The limits are module constants because `openapi.py` publishes the same numbers: a limit
typed twice drifts.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from flask import current_app, request
from werkzeug.exceptions import MethodNotAllowed

from . import jsontext
from .errors import ApiError

MIN_LIMIT, MAX_LIMIT = 1, 100
RESPONSE_MODES = ("streaming", "blocking")
SORT_ORDERS = ("created_at", "-created_at", "updated_at", "-updated_at")
FLAGS = {"true": True, "false": False}
# Dify's filter for conversation variables: 1-255 letters, digits, `_`, `-` and `.`.
VARIABLE_NAME = r"[A-Za-z0-9_.\-]{1,255}"


def refuse_head() -> None:
    """Flask answers HEAD with the GET view, which here would call Dify (and, for /api/chat,
    take a stream lease that a HEAD response never gives back). No HEAD reaches Dify."""
    if request.method == "HEAD" and request.url_rule is not None:
        allowed = sorted((request.url_rule.methods or set()) - {"HEAD"})
        raise MethodNotAllowed(valid_methods=allowed)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_param", message)


def read_json_object() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the request body as Content-Type: application/json.",
        )
    raw = request.get_data(cache=False)
    try:
        body = jsontext.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def validate_uuid(value: Any, name: str) -> str:
    """Only the canonical form: Dify answers 400 to anything else, after a network round trip."""
    if isinstance(value, str):
        try:
            canonical = str(uuid.UUID(value))
        except ValueError:
            pass
        else:
            if canonical == value.lower():
                return canonical
    raise bad_request(f"{name} must be a UUID such as 3f8e5c1a-9b2d-4e6f-8a7b-1c2d3e4f5a6b.")


# --- query parameters -----------------------------------------------------------------------
# An empty value counts as absent, as it does for `conversation_id` in /api/chat.


def query_uuid(name: str, *, required: bool = False) -> str | None:
    value = request.args.get(name)
    if value in (None, ""):
        if required:
            raise bad_request(f"{name} is required.")
        return None
    return validate_uuid(value, name)


def query_limit() -> int | None:
    value = request.args.get("limit")
    if value in (None, ""):
        return None
    if not re.fullmatch(r"[0-9]{1,3}", value) or not MIN_LIMIT <= int(value) <= MAX_LIMIT:
        raise bad_request(f"limit must be a whole number from {MIN_LIMIT} to {MAX_LIMIT}.")
    return int(value)


def query_sort_by() -> str | None:
    value = request.args.get("sort_by")
    if value in (None, ""):
        return None
    if value not in SORT_ORDERS:
        raise bad_request(f"sort_by must be one of {', '.join(SORT_ORDERS)}.")
    return value


def query_flag(name: str) -> bool | None:
    value = request.args.get(name)
    if value in (None, ""):
        return None
    if value not in FLAGS:
        raise bad_request(f"{name} must be true or false.")
    return FLAGS[value]


def query_variable_name() -> str | None:
    value = request.args.get("variable_name")
    if value in (None, ""):
        return None
    if not re.fullmatch(VARIABLE_NAME, value, re.ASCII):
        raise bad_request(
            "variable_name must be 1 to 255 letters, digits, underscores, hyphens or periods."
        )
    return value


def optional_text(body: dict[str, Any], name: str, max_chars: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{name} must be a non-blank string.")
    if len(value) > max_chars:
        raise bad_request(f"{name} must be at most {max_chars:,} characters.")
    return value


def answer_body(body: dict[str, Any], user: str) -> dict[str, Any]:
    """What every question to Dify carries besides its own fields (a chat's `query`, a
    completion's): `inputs`, `files` (only the asker's own uploads) and `response_mode`, with
    `user` always the session's, never the body's."""
    inputs = body.get("inputs", {})
    if not isinstance(inputs, dict):
        raise bad_request("inputs must be a JSON object.")
    files = body.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise bad_request("files must be a list of file objects.")
    mode = body.get("response_mode", "streaming")
    if mode not in RESPONSE_MODES:
        raise bad_request("response_mode must be 'streaming' or 'blocking'.")
    own_uploads(files, inputs, user)
    payload: dict[str, Any] = {"inputs": inputs, "user": user, "response_mode": mode}
    if files:
        payload["files"] = files
    return payload


def own_uploads(files: list[Any], inputs: dict[str, Any], user: str) -> None:
    """Every uploaded file a question names (in `files`, or as a file input in `inputs`) must
    be one this user uploaded through the proxy: Dify takes any upload of the app, whoever
    made it, so without this check one user could have the model read another's file. An
    unknown id and someone else's get the same 400, before Dify is called."""
    candidates = list(files)
    for value in inputs.values():  # a file input is a file object or a list of them
        candidates += value if isinstance(value, list) else [value]
    owners = current_app.extensions["dify_proxy.owners"]
    for file in candidates:
        if not isinstance(file, dict) or file.get("transfer_method") != "local_file":
            continue
        file_id = file.get("upload_file_id")
        if not isinstance(file_id, str) or owners.owned("file", file_id, user) is None:
            raise bad_request(
                "upload_file_id must be the id of a file you uploaded with /api/files/upload."
            )
