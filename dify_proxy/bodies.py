"""Request bodies read under gunicorn's gevent worker: within a minimum pace, and with
gunicorn's own parse errors turned into a 400.

A gevent worker holds each open request in a greenlet and each connection in one of its
`worker_connections` slots. A body that trickles in (one byte every ten seconds) kept a slot
for as long as the client liked, and about 10,000 of them stopped /healthz answering for
everyone. Here every `STEP_BYTES` of a body must arrive within `STEP_SECONDS` (so at least about
400 bytes/s, and no silence longer than that), else the request ends with 408. A malformed
chunked body (`-1`, `0x10`, a missing terminator) made gunicorn's reader raise inside the app,
which became a 500; it is the client's error, a 400.

Outside gunicorn (the test client, `flask run`) bodies are read as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import BadRequest, RequestTimeout

STEP_BYTES = 4096
STEP_SECONDS = 10.0
PROGRESS_KEY = "dify_proxy.body_progress"  # environ key: called after each step that got bytes


def _too_slow() -> RequestTimeout:
    return RequestTimeout(
        f"The request body arrived too slowly: each {STEP_BYTES // 1024} KiB must arrive "
        f"within {STEP_SECONDS:g} seconds."
    )


class PacedInput:
    """`wsgi.input` whose every read of at most STEP_BYTES must finish within STEP_SECONDS."""

    def __init__(self, stream: Any, environ: dict[str, Any]) -> None:
        import gevent
        from gunicorn.http.errors import NoMoreData, ParseException

        self._stream = stream
        self._environ = environ
        self._timeout = gevent.Timeout
        self._malformed = ParseException
        self._gone = NoMoreData

    def _step(self, read: Callable[[int], bytes], size: int) -> bytes:
        try:
            with self._timeout(STEP_SECONDS, _too_slow()):
                data = read(min(size, STEP_BYTES))
        except self._malformed as exc:
            raise BadRequest(f"The request body is malformed: {type(exc).__name__}.") from None
        except self._gone:
            raise BadRequest("The request body ended early.") from None
        if data:
            progress = self._environ.get(PROGRESS_KEY)
            if progress is not None:
                progress()
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            return self._step(self._stream.read, size) if size else b""
        parts = []
        while data := self._step(self._stream.read, STEP_BYTES):
            parts.append(data)
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        limit = size if size is not None and size >= 0 else STEP_BYTES
        return self._step(self._stream.readline, limit)

    def __iter__(self) -> Iterable[bytes]:
        while line := self.readline():
            yield line


class PacedBodies:
    """WSGI middleware: puts `PacedInput` in front of gunicorn's body reader."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if "gunicorn.socket" in environ and _under_gevent():
            environ["wsgi.input"] = PacedInput(environ["wsgi.input"], environ)
        return self.app(environ, start_response)


def _under_gevent() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover -- gevent is a dependency
        return False
    return monkey.is_module_patched("socket")
