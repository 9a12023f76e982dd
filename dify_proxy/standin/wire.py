"""How the stand-in writes what Dify writes: compact raw-UTF-8 JSON, and errors in Dify's
`{code, message, status}` shape (raised anywhere in a handler, answered by the server)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def dumps(obj: Any) -> bytes:
    """Dify's current encoding: compact, raw UTF-8 (so U+2028 reaches the proxy unescaped).

    A lone surrogate (legal in JSON text, not in UTF-8) goes out as its `\\udxxx` escape, which
    JSON reads back as the same string: a message carrying one can neither crash a stream nor
    break the call log."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")


def json_response(answer: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(answer), content_type="application/json")


class DifyError(Exception):
    """An answer in Dify's error shape; `close` says the connection cannot be reused."""

    def __init__(self, status: int, code: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close

    def response(self) -> web.Response:
        answer = {"code": self.code, "message": self.message, "status": self.status}
        response = json_response(answer, self.status)
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
