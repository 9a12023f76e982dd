"""The published Python SSE readers (and the Dify SDK README loop), each used as its README
shows, reduced to what they hand the application: a list of `Event`s and how the read ended."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import httpx_sse
import requests
import requests_sse
import sseclient

from tests.readers import dify_sdk_readme_loop

TIMEOUT = 30


@dataclass(frozen=True)
class Request:
    """One chat call: where, how, and with which headers (the reader adds its own defaults)."""

    url: str
    method: str
    headers: dict[str, str]
    body: str | None = None  # JSON text

    def as_dict(self) -> dict:
        return {"url": self.url, "method": self.method, "headers": self.headers, "body": self.body}


@dataclass(frozen=True)
class Event:
    type: str  # the SSE event type (or, for callback readers, the callback's name)
    data: str
    id: str = ""


@dataclass(frozen=True)
class Reading:
    events: list[Event]
    ended: str


def httpx_sse_reader(request: Request) -> Reading:
    events = []
    with httpx.Client(timeout=TIMEOUT) as client:
        with httpx_sse.connect_sse(
            client, request.method, request.url, headers=request.headers, content=request.body
        ) as source:
            for sse in source.iter_sse():
                events.append(Event(sse.event, sse.data, sse.id))
            status = source.response.status_code
    return Reading(events, f"body ended, status {status}")


def sseclient_py_reader(request: Request) -> Reading:
    # sseclient-py's README: a streamed requests response with Accept: text/event-stream.
    headers = {"Accept": "text/event-stream", **request.headers}
    response = requests.request(
        request.method,
        request.url,
        headers=headers,
        data=request.body and request.body.encode(),
        stream=True,
        timeout=TIMEOUT,
    )
    with response:
        client = sseclient.SSEClient(response)
        events = [Event(e.event, e.data, e.id or "") for e in client.events()]
    return Reading(events, f"body ended, status {response.status_code}")


class _StreamEnded(Exception):
    """Raised from requests-sse's on_error to stop it reconnecting when the body ends."""


def requests_sse_reader(request: Request) -> Reading:
    def stop() -> None:
        raise _StreamEnded

    events = []
    ended = "iteration ended"
    with requests_sse.EventSource(
        request.url,
        method=request.method,
        headers=dict(request.headers),
        data=request.body and request.body.encode(),
        timeout=TIMEOUT,
        on_error=stop,
    ) as source:
        try:
            for e in source:
                events.append(Event(e.type or "message", e.data, e.last_event_id))
        except _StreamEnded:
            ended = "on_error"
    return Reading(events, ended)


def dify_sdk_readme_loop_reader(request: Request) -> Reading:
    # What the SDK's ChatClient sends: JSON with its key, no Accept header.
    response = requests.request(
        request.method,
        request.url,
        headers=request.headers,
        data=request.body and request.body.encode(),
        stream=True,
        timeout=TIMEOUT,
    )
    events = []
    ended = "loop ended"
    with response:
        try:
            for line in dify_sdk_readme_loop.read_chat_stream(response):
                events.append(Event("parsed", json.dumps(line, ensure_ascii=False)))
        except json.JSONDecodeError as exc:
            ended = f"raised JSONDecodeError on {exc.doc!r}"
    return Reading(events, ended)


PYTHON_READERS: dict[str, Callable[[Request], Reading]] = {
    "httpx-sse": httpx_sse_reader,
    "sseclient-py": sseclient_py_reader,
    "requests-sse": requests_sse_reader,
    "dify-sdk-readme-loop": dify_sdk_readme_loop_reader,
}
