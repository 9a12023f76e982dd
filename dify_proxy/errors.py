"""Every failure leaves as JSON in Dify's own `{code, message, status}` shape.

Front ends built for Dify already show `message` from a non-2xx body, so keeping Dify's shape
for our own errors means they need no second code path. Nothing here ever renders a traceback.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with a status and a stable machine-readable code, safe to show to the caller."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify(code=code, message=message, status=status)
    response.status_code = status
    response.headers.update(headers or {})
    return response


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def _api_error(error: ApiError) -> Response:
    if "Retry-After" in error.headers:
        g.retry_after = error.headers["Retry-After"]  # see limits.keep_explicit_retry_after
    return error_response(error.status, error.code, error.message, error.headers)


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    headers = {}
    if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    if status == 413:
        message = "Request body is too large."
    elif status == 429:  # Flask-Limiter's RateLimitExceeded: the description is the limit
        message = f"Too many requests (limit: {error.description}); try again later."
    else:
        message = error.description or error.name
    return error_response(status, code, message, headers)


def _unexpected(error: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(500, "internal_server_error", "The server failed to handle this request.")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
