"""Dify's streaming endpoint on loopback, fed by the test piece by piece, for the relay's tests.

The relay reads a real `requests` response (urllib3's reader, a real socket, real chunked
encoding), so end of stream, broken bodies, read timeouts and the proxy hanging up behave as
they do against Dify; the test decides what is sent, in which pieces, and when.
"""

from __future__ import annotations

import queue
import select
import socket
import socketserver
import threading
import time

import requests

_END = object()  # finish the body properly (the last chunk)
_DROP = object()  # cut the connection mid-body


class FakeDify:
    """One script for every connection: a piece goes to whichever open stream takes it next,
    so a test with two streams sends only while one of them is open."""

    def __init__(self) -> None:
        self._pieces: queue.Queue = queue.Queue()
        self.hung_up = threading.Event()  # the proxy closed its side of the connection
        self.requests = 0
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                fake._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,))
        self._thread.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1/chat-messages"

    def __enter__(self) -> FakeDify:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pieces.put(_DROP)
        self._server.shutdown()
        self._server.server_close()

    # -- what the test does ------------------------------------------------------------------

    def open(self, read_timeout: float = 5.0) -> requests.Response:
        """The proxy's side: Dify's streaming response, headers read, body not yet."""
        return requests.post(self.url, json={}, stream=True, timeout=(2, read_timeout))

    def send(self, *pieces: bytes, pause: float = 0.0) -> None:
        """Each piece goes out as its own network write, `pause` seconds apart."""
        for piece in pieces:
            self._pieces.put(piece)
            if pause:
                self._pieces.put(pause)

    def end(self) -> None:
        self._pieces.put(_END)

    def drop(self) -> None:
        self._pieces.put(_DROP)

    # -- the server side ---------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        self.requests += 1
        request = b""
        while b"\r\n\r\n" not in request:
            request += sock.recv(65536)
        head, _, body = request.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            body += sock.recv(65536)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        while True:
            if self._client_left(sock):
                return
            try:
                item = self._pieces.get(timeout=0.01)
            except queue.Empty:
                continue
            if isinstance(item, float):
                time.sleep(item)
            elif isinstance(item, bytes):
                sock.sendall(b"%x\r\n%b\r\n" % (len(item), item))
            elif item is _END:
                sock.sendall(b"0\r\n\r\n")
                while not self._client_left(sock):
                    time.sleep(0.01)
                return
            else:  # _DROP
                sock.close()
                return

    def _client_left(self, sock: socket.socket) -> bool:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            left = sock.recv(1) == b""
        except OSError:
            left = True
        if left:
            self.hung_up.set()
        return left
