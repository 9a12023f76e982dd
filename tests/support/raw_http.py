"""Hand-built HTTP/1.1 requests, for what `requests` will not send (bad chunk sizes, a body
that trickles in) and to see exactly what gunicorn answers."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def connect(base_url: str, timeout: float = 10) -> socket.socket:
    url = urlsplit(base_url)
    return socket.create_connection((url.hostname, url.port), timeout=timeout)


def read_response(sock: socket.socket) -> RawResponse:
    """One response with a Content-Length (what the proxy sends for errors), or up to close."""
    f = sock.makefile("rb")
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("closed without a response")
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    else:
        body = f.read()
    return RawResponse(int(status_line.split()[1]), headers, body)


def exchange(base_url: str, data: bytes, timeout: float = 10) -> RawResponse:
    with connect(base_url, timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
