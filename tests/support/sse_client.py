"""Reads an SSE response the way a browser does: bytes as they arrive, with arrival times."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

# How the stand-in's chatflow (its default app, as real Dify 1.16.1) opens and closes an answer
# around its `message` events: the run starts, then after the answer the Start and Answer nodes'
# events, `message_end`, and `workflow_finished` last.
OPENING = ["workflow_started"]
CLOSING = ["node_started", "node_finished"] * 2 + ["message_end", "workflow_finished"]
AROUND = len(OPENING) + len(CLOSING)  # data events that are not the answer's messages


@dataclass
class Received:
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    ended: bool = False  # the response ended cleanly (zero-length chunk), not by our choice

    @property
    def body(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def events(self) -> list[bytes]:
        """Each event block as sent, `id:` line included."""
        return [part + b"\n\n" for part in self.body.split(b"\n\n") if part]

    def data_events(self) -> list[bytes]:
        """Each data event as Dify sent it: the block without the proxy's `id:` line (pings,
        the opening one with its empty `data:` line included, are not data events)."""
        return [_without_id(e) for e in self.events() if b"data: " in e]

    def ids(self) -> list[str]:
        return [
            line[4:].decode()
            for e in self.events()
            for line in e.split(b"\n")
            if line.startswith(b"id: ")
        ]

    def data(self) -> list[dict]:
        return [json.loads(e[len(b"data: ") :]) for e in self.data_events()]

    def kinds(self) -> list[str]:
        """Each data event's type, in order."""
        return [d["event"] for d in self.data()]

    def messages(self) -> list[dict]:
        """The answer's `message` events."""
        return [d for d in self.data() if d["event"] == "message"]

    def last(self, kind: str) -> dict:
        """The last data event of this type."""
        return [d for d in self.data() if d["event"] == kind][-1]

    def pings(self) -> int:
        return sum(1 for e in self.events() if _without_id(e).startswith(b"event: ping\n"))


def _without_id(event: bytes) -> bytes:
    """The block without the proxy's `id:` and `retry:` lines."""
    return b"\n".join(
        line for line in event.split(b"\n") if not line.startswith((b"id: ", b"retry: "))
    )


def read_stream(
    response: requests.Response,
    until: Callable[[Received], bool] | None = None,
    seconds: float = 20,
) -> Received:
    """Read until the body ends, or until `until(received)` holds (then stop reading)."""
    received = Received()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = response.raw.read1(65536)
        if not chunk:
            received.ended = True
            break
        received.chunks.append((time.monotonic(), chunk))
        if until is not None and until(received):
            break
    return received
