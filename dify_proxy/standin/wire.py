"""How the stand-in writes what Dify writes, in Dify's three JSON styles, and errors in Dify's
`{code, message, status}` shape (raised anywhere in a handler, answered by the server).

Dify writes JSON three ways, and the captures of Dify 1.16.1 show each byte: stream events are
compact raw UTF-8 (`dumps`); the service API's ordinary answers and errors go through
Flask-RESTX, compact, ASCII-escaped and ending in a newline (`json_response`); and a few answers
built by hand (a blocking answer, a human-input form, the events of a finished run) are Python's
`json.dumps` defaults, with spaces and no newline (`spaced`)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def dumps(obj: Any) -> bytes:
    """Dify's stream encoding: compact, raw UTF-8 (so U+2028 reaches the proxy unescaped).

    A lone surrogate (legal in JSON text, not in UTF-8) goes out as its `\\udxxx` escape, which
    JSON reads back as the same string: a message carrying one can neither crash a stream nor
    break the call log."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")


def spaced(obj: Any) -> bytes:
    """Python's default `json.dumps`, as Dify writes its hand-built answers."""
    return json.dumps(obj).encode()


def json_response(answer: Any, status: int = 200) -> web.Response:
    """Flask-RESTX's way: compact, `\\uXXXX` escapes, and a final newline."""
    body = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
    return web.Response(status=status, body=body, content_type="application/json")


def spaced_response(answer: Any, content_type: str = "application/json") -> web.Response:
    response = web.Response(body=spaced(answer))
    response.headers["Content-Type"] = content_type
    return response


class DifyError(Exception):
    """An answer in Dify's error shape; `close` says the connection cannot be reused, and
    `escape_slashes` writes `/` as `\\/`, as Flask does in the 404s that suggest a route."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        close: bool = False,
        escape_slashes: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close
        self.escape_slashes = escape_slashes

    def response(self) -> web.Response:
        answer = {"code": self.code, "message": self.message, "status": self.status}
        response = json_response(answer, self.status)
        if self.escape_slashes:
            response.body = response.body.replace(b"/", b"\\/")
        if self.close:
            response.force_close()
        return response


def bad(message: str) -> DifyError:
    return DifyError(400, "invalid_param", message)


def not_found(what: str) -> DifyError:
    return DifyError(404, "not_found", f"{what} Not Exists.")


def user_of(value: Any) -> str:
    """The `user` every Dify call names, checked as Dify checks it."""
    if not isinstance(value, str) or not value:
        raise bad("user is required and must be a non-empty string")
    return value


def required_user(value: Any) -> str:
    """The `user` of Dify's newer routes (forms, workflow stop, run events), checked by
    Flask-RESTX's reqparse, whose message the captures show."""
    if not isinstance(value, str) or not value:
        raise bad("Arg user must be provided.")
    return value
