"""A real JWKS endpoint on loopback, and the forgeries PyJWT refuses to produce for us."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

JWKS_PATH = "/auth/v1/.well-known/jwks.json"


class JwksServer:
    """Serves `{"keys": keys}` at Supabase's JWKS path on 127.0.0.1 and counts the fetches.

    `keys`, `status` and `body` may be changed while it runs (a key rotation, an outage, an edge
    answering with an HTML page): every fetch reads them afresh.
    """

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = list(keys)
        self.status = 200
        self.body: bytes | None = None  # when set, sent as-is instead of the JWKS
        self.fetches = 0
        self.user_agents: list[str | None] = []  # one per fetch
        self._lock = threading.Lock()
        self._stopped = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        """What SUPABASE_URL is set to."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> JwksServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; idempotent, so a test may take the JWKS host down mid-way."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> JwksServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _respond(self, user_agent: str | None) -> tuple[int, bytes, str]:
        with self._lock:
            self.fetches += 1
            self.user_agents.append(user_agent)
            if self.body is not None:
                return self.status, self.body, "text/html; charset=utf-8"
            return self.status, json.dumps({"keys": self.keys}).encode(), "application/json"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path != JWKS_PATH:
                    status, body, content_type = 404, b"{}", "application/json"
                else:
                    status, body, content_type = server._respond(self.headers.get("User-Agent"))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep the test output quiet

        return Handler


def free_port() -> int:
    """A loopback port nothing listens on (the OS just handed it out and it was released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """An http://127.0.0.1 URL where nothing listens: the JWKS host is down."""
    return f"http://127.0.0.1:{free_port()}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def hmac_forgery(claims: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """A token MACed with arbitrary bytes, e.g. the project's public key PEM (key confusion).

    PyJWT refuses to use a PEM as an HMAC secret, so the signature is computed by hand.
    """
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{_b64(hmac.new(key, signing_input, digest).digest())}"


def tampered(token: str, **changes: Any) -> str:
    """`token` with some claims changed and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
