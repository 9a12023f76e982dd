"""The only module that talks to Dify: it holds the key, the timeouts and the error mapping.

Dify's own client errors (a bad conversation id, a rate limit) are the caller's to fix and pass
through with Dify's code and message. Failures of the server's side (a wrong key, a disabled
app, Dify down) become 502/504: the user's session is fine, so never a 401.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import requests
from flask import g, has_request_context
from requests.adapters import HTTPAdapter

from . import metrics
from .errors import ApiError
from .settings import Settings

log = logging.getLogger(__name__)

# 412: a human-input form that was already answered (`human_input_form_submitted`).
PASS_THROUGH_STATUSES = frozenset({400, 404, 412, 413, 415, 429})
STOP_TIMEOUT_SECONDS = 5.0
# Each kind of app stops its tasks at its own path.
STOP_PATHS = {
    "chat": "/chat-messages/{}/stop",
    "workflow": "/workflows/tasks/{}/stop",
    "completion": "/completion-messages/{}/stop",
}
# What `call` accepts as a path: segments of letters, digits, `-` and `_` only, so nothing a
# caller built from a request can climb out of the API (`..`), smuggle a query, or add a segment.
SAFE_PATH = re.compile(r"(?:/[A-Za-z0-9_-]+)+")


def upstream_failure(status: int, code: str, message: str) -> ApiError:
    """A failure on Dify's side (code `upstream_*`), counted for /metrics as it is raised."""
    metrics.UPSTREAM_ERRORS.labels(code).inc()
    return ApiError(status, code, message)


def unreadable_answer() -> ApiError:
    return upstream_failure(502, "upstream_error", "The chat service sent an unreadable answer.")


def new_session(pool_size: int = 1000) -> requests.Session:
    """One pooled session per worker; the pool is large because every open stream holds a
    connection, and a pool that is too small discards connections instead of reusing them."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # no proxy or .netrc surprises: this talks to one configured host
    return session


class Dify:
    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.base_url = settings.dify_api_url
        self.timeout = (settings.dify_connect_timeout, settings.dify_read_timeout)
        self.session = session or new_session()
        self._auth = {"Authorization": f"Bearer {settings.dify_api_key}"}

    def chat(self, payload: dict[str, Any], *, stream: bool) -> requests.Response:
        """POST /chat-messages; returns once Dify's status and headers are in.

        Raises `ApiError` for anything but a 2xx, so the caller only ever sees a good answer.
        """
        return self._request("POST", "/chat-messages", json=payload, stream=stream)

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """Any other service API call (`path` under the base URL, e.g. `/conversations`).

        Errors map exactly as for `chat`; `path` must already be validated (see `SAFE_PATH`).
        """
        if not SAFE_PATH.fullmatch(path):
            raise ValueError(f"unsafe Dify path: {path!r}")
        return self._request(
            method, path, params=params, json=json, data=data, headers=headers, stream=stream
        )

    def stop(
        self, task_id: str, user: str, request_id: str | None = None, app: str = "chat"
    ) -> None:
        """Best effort: a failure is logged, never raised, since the client is already gone.

        It runs after the request has ended, so the request id is handed over explicitly.
        `app` picks the stop call (see STOP_PATHS).
        """
        try:
            response = self.session.post(
                self.base_url + STOP_PATHS[app].format(task_id),
                json={"user": user},
                headers={**_request_id_header(request_id), **self._auth},
                timeout=(self.timeout[0], STOP_TIMEOUT_SECONDS),
            )
            response.close()
            if not response.ok:
                log.warning("dify stop answered %s", response.status_code)
        except requests.RequestException as exc:
            log.warning("dify stop failed: %s", type(exc).__name__)

    def _request(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> requests.Response:
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                headers={**(headers or {}), **_request_id_header(), **self._auth},
                timeout=self.timeout,
                **kwargs,
            )
        except requests.Timeout as exc:
            # A ConnectTimeout is a Timeout too, but it means Dify is unreachable, not slow.
            if isinstance(exc, requests.ConnectTimeout):
                log.error("dify unreachable: connect timeout")
                raise upstream_failure(
                    502, "upstream_unavailable", "The chat service is unreachable."
                ) from None
            log.error("dify timed out before answering")
            raise upstream_failure(
                504, "upstream_timeout", "The chat service did not answer in time."
            ) from None
        except requests.RequestException as exc:
            log.error("dify unreachable: %s", type(exc).__name__)
            raise upstream_failure(
                502, "upstream_unavailable", "The chat service is unreachable."
            ) from None
        if response.ok:
            return response
        try:
            raise upstream_error(response)
        finally:
            response.close()


def _request_id_header(request_id: str | None = None) -> dict[str, str]:
    """Dify's logs can then be matched with ours (`X-Request-ID`)."""
    if request_id is None and has_request_context():
        request_id = g.get("request_id")
    return {"X-Request-ID": request_id} if request_id else {}


def upstream_error(response: requests.Response) -> ApiError:
    """Map a non-2xx Dify answer to what our caller should see."""
    status = response.status_code
    body = _json_error(response)
    if status in PASS_THROUGH_STATUSES and body is not None:
        headers = {}
        if status == 429 and "Retry-After" in response.headers:
            headers["Retry-After"] = response.headers["Retry-After"]
        return ApiError(status, body[0], body[1], headers)
    if status in (401, 403):
        log.error(
            "dify refused the server's API key (%s %s): check DIFY_API_KEY and that the app's "
            "API access is enabled",
            status,
            body[0] if body else "non-JSON body",
        )
        return upstream_failure(502, "upstream_misconfigured", "The chat service is misconfigured.")
    log.error("dify answered %s (%s)", status, body[0] if body else "non-JSON body")
    return upstream_failure(502, "upstream_error", "The chat service failed to answer.")


def _json_error(response: requests.Response) -> tuple[str, str] | None:
    """Dify's `{code, message}`, or None when the body is not that (an edge's HTML page)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    code, message = body.get("code"), body.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        return None
    return code, message
