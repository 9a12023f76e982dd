"""A TCP relay between a client and a server that drops every open connection on command.

A browser test's network cut: the browser talks to the relay's port, the relay to the real
server. `cut()` resets the browser's side (an RST, as when a router or a NAT forgets the
connection) and closes the server's side, so both ends see the connection die at once, mid-stream,
while new connections (the client's reconnect) go through as before.

Playwright's offline switch is no such cut: it emulates offline in the DevTools network layer,
which fails new requests but may leave a response that is already streaming untouched, and the
server would not see its client go.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CuttableLink:
    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.connections = 0  # accepted so far
        self.cuts = 0  # connections dropped by cut()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> int:
        """Drop every open connection; returns how many were open."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for client, server in pairs:
            # SO_LINGER with a zero timeout: the client's side ends with an RST, not a FIN.
            # Shutting a socket down (not closing it) is what wakes a thread blocked reading it.
            _shut(client, socket.SHUT_RD, linger0=True)
            _shut(server, socket.SHUT_RDWR)
            _close(client)
            _close(server)
        self.cuts += len(pairs)
        return len(pairs)

    def close(self) -> None:
        _close(self._listener)
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self._target)
            except OSError:
                _close(client)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair) -> None:
        """Forward bytes as they come; when either side ends, end both."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        _close(source)
        _close(sink)


def _shut(sock: socket.socket, how: int, linger0: bool = False) -> None:
    try:
        if linger0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(how)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


@contextmanager
def cuttable_link(target_port: int) -> Iterator[CuttableLink]:
    link = CuttableLink(target_port)
    try:
        yield link
    finally:
        link.close()
