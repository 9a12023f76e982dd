"""Local stand-in for Dify's service API (a chat app's calls), standard library only.

Why: the proxy has to be tested and benchmarked against real HTTP/1.1 over TCP (real chunk
boundaries, half events, abrupt disconnects, long silent streams), which mocked `requests`
cannot produce and real Dify cannot be scripted or loaded to produce. Each request picks its
behaviour through `inputs["_standin"]` (see `_Knobs`), so one running instance serves every test
and benchmark scenario. The wire format follows /work/shared/dify-protocol.md.

Besides chat and stop it serves the rest of a chat app's API (conversations, messages, feedback,
suggestions, file and audio uploads, text-to-audio, parameters/meta/info), with conversations
and messages kept in memory per `user` as Dify scopes them: another user's conversation is a 404.
Uploads are parsed as they arrive (`_Multipart`), so a large one is counted, never held.

Run: python -m dify_proxy.standin [--host 127.0.0.1] [--port 0] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

DEFAULT_API_KEY = "app-standin-dev-key"
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
PING = b"event: ping\n\n"
LAST_CHUNK = b"0\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: %s\r\n\r\n"
)
ENDS = ("message_end", "error", "drop", "drop_mid_event", "hang")
WORD = re.compile(r"\s*\S+\s*")
STOP_PATH = re.compile(r"/v1/chat-messages/([^/]+)/stop")
UPLOAD_PATHS = ("/v1/files/upload", "/v1/audio-to-text")
MAX_UPLOAD_BODY = 1024 * 1024 * 1024  # upload bodies are parsed as they arrive, never held
MAX_FILE = 64 * 1024 * 1024  # Dify's own limits are configurable; these are generous
MAX_AUDIO = 30 * 1024 * 1024
MAX_FIELD = 64 * 1024  # a non-file multipart field
MAX_RECORDS = 10_000  # conversations and messages kept; the oldest go first (benchmarks)
BLOCKED_EXTENSIONS = ("bat", "exe", "sh")
SORT_ORDERS = ("created_at", "-created_at", "updated_at", "-updated_at")
PARAM = re.compile(r';\s*([\w*-]+)=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')  # name="x"; filename=y
FAKE_AUDIO = (b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xf3\x44\xc4" * 512, b"\xff\xf3" * 256)


def _dumps(obj: Any) -> bytes:
    """Dify's current encoding: compact, raw UTF-8 (so U+2028 reaches the proxy unescaped)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _HTTPError(Exception):
    """An answer in Dify's `{code, message, status}` shape; `close`: the connection is unusable."""

    def __init__(self, status: int, code: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close

    def body(self) -> bytes:
        return _dumps({"code": self.code, "message": self.message, "status": self.status})


def _bad(message: str) -> _HTTPError:
    return _HTTPError(400, "invalid_param", message)


def _opt(raw: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """Typed knob lookup, strict so a typo in a test's scenario fails loudly instead of silently."""
    value = raw.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad(f"inputs._standin.{key} must be {kind.__name__}")
    if kind in (int, float) and value < 0:
        raise _bad(f"inputs._standin.{key} must not be negative")
    return value


class _Knobs:
    """The scenario of one request, read from `inputs["_standin"]`."""

    def __init__(self, raw: Any) -> None:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise _bad("inputs._standin must be an object")
        self.text: str | None = _opt(raw, "text", str, None)
        self.events: int | None = _opt(raw, "events", int, None)
        self.pad: int = _opt(raw, "pad", int, 0)
        self.interval: float = _opt(raw, "interval", float, 0.05)
        self.header_delay: float = _opt(raw, "header_delay", float, 0.0)
        self.first_delay: float = _opt(raw, "first_delay", float, 0.0)
        self.pings: int = _opt(raw, "pings", int, 0)
        self.ping_interval: float = _opt(raw, "ping_interval", float, 0.0)
        self.split: int = _opt(raw, "split", int, 0)
        self.split_delay: float = _opt(raw, "split_delay", float, 0.005)
        self.coalesce: bool = _opt(raw, "coalesce", bool, False)
        self.end: str = _opt(raw, "end", str, "message_end")
        if self.end not in ENDS:
            raise _bad(f"inputs._standin.end must be one of {', '.join(ENDS)}")
        self.status: int | None = _opt(raw, "status", int, None)
        self.body: str | None = _opt(raw, "body", str, None)
        self.content_type: str = _opt(raw, "content_type", str, "text/html")
        self.code: str = _opt(raw, "code", str, "stand_in_error")
        self.message: str = _opt(raw, "message", str, "stand-in error")
        self.retry_after = raw.get("retry_after")
        # A recorded stream, sent byte for byte instead of a generated answer: `replay` is the
        # body as Dify framed it, cut into `replay_pieces` (sizes, cycled; empty: one piece per
        # event), `replay_delay` seconds apart, with one `replay_stall`-second silence before
        # piece `replay_stall_at` (to let keep-alives fire mid-answer).
        self.replay: str | None = _opt(raw, "replay", str, None)
        # Or the name of a recording stored with `PUT /_standin/recordings/<name>`, for clients
        # that can only GET, whose whole question must fit in a URL.
        self.replay_recording: str | None = _opt(raw, "replay_recording", str, None)
        pieces = raw.get("replay_pieces", [])
        if not isinstance(pieces, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in pieces
        ):
            raise _bad("inputs._standin.replay_pieces must be a list of positive integers")
        self.replay_pieces: list[int] = pieces
        self.replay_delay: float = _opt(raw, "replay_delay", float, 0.002)
        self.replay_stall: float = _opt(raw, "replay_stall", float, 0.0)
        self.replay_stall_at: int = _opt(raw, "replay_stall_at", int, 0)

    def replay_writes(self) -> list[bytes]:
        """The recorded body cut into the writes that deliver it."""
        data = (self.replay or "").encode("utf-8", "surrogatepass")
        if not self.replay_pieces:
            return [part + b"\n\n" for part in data.split(b"\n\n") if part]
        writes, at = [], 0
        for size in itertools.cycle(self.replay_pieces):
            if at >= len(data):
                return writes
            writes.append(data[at : at + size])
            at += size
        return writes

    def delta(self) -> str:
        """The one answer every event carries in `events` mode."""
        return (self.text if self.text is not None else "tok ") + "x" * self.pad

    def answers(self, query: str) -> tuple[Iterable[str], int]:
        """The answer deltas and their count; `events` mode repeats one delta without a list."""
        if self.events is not None:
            return itertools.repeat(self.delta(), self.events), self.events
        text = self.text
        if text is None:
            text = (
                f"You said: {query}. This reply comes from the local Dify stand-in, "
                "streamed word by word."
            )
        words = WORD.findall(text) or ([text] if text else [])
        return words, len(words)


class _Conn:
    """Own buffering over StreamReader, so the EOF watcher can read during a stream without
    swallowing bytes of a keep-alive client's next request."""

    __slots__ = ("reader", "writer", "buf")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.buf = reader, writer, bytearray()

    async def fill(self) -> bool:
        data = await self.reader.read(65536)
        self.buf += data
        return bool(data)

    async def read_head(self) -> bytes | None:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise _HTTPError(431, "bad_request", "request head too large", close=True)
            if not await self.fill():
                return None
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        return head

    async def read_some(self, n: int) -> bytes:
        """At most `n` bytes of a body read piece by piece (at least one byte)."""
        if not self.buf and not await self.fill():
            raise ConnectionResetError("client closed inside the request body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_body(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self.fill():
                raise ConnectionResetError("client closed inside the request body")
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return body


class _Multipart:
    """An incremental multipart/form-data parser: `feed` it the body in any slices.

    Non-file fields are kept (up to MAX_FIELD), file parts only counted, and the buffer never
    holds more than one slice plus a delimiter, so a 1 GB upload costs what a 1 KB one does.
    """

    def __init__(self, content_type: str) -> None:
        match = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type)
        self.error: _HTTPError | None = None
        if not content_type.lower().startswith("multipart/form-data") or match is None:
            self.error = _HTTPError(415, "unsupported_media_type", "Send multipart/form-data.")
        boundary = (match[1] or match[2]) if match else "-"
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self.buf = bytearray(b"\r\n")  # so the first delimiter looks like every other one
        self.state = "preamble"  # then: delimiter, headers, content, ..., done
        self.fields: dict[str, str] = {}
        self.files: list[dict[str, Any]] = []
        self._part: dict[str, Any] | None = None
        self._value = bytearray()

    def feed(self, data: bytes) -> None:
        if self.error is not None or self.state == "done":
            return  # the rest of the body is read and dropped
        self.buf += data
        while self.error is None:
            if self.state in ("preamble", "content"):
                end = self.buf.find(self.delimiter)
                if end < 0:  # keep what could be the start of a delimiter
                    n = max(0, len(self.buf) - len(self.delimiter) + 1)
                    self._content(self.buf[:n])
                    del self.buf[:n]
                    return
                self._content(self.buf[:end])
                del self.buf[: end + len(self.delimiter)]
                self._end_part()
                self.state = "delimiter"
            elif self.state == "delimiter":
                if len(self.buf) < 2:
                    return
                if self.buf[:2] == b"--":
                    self.state = "done"
                else:
                    line_end = self.buf.find(b"\r\n")  # transport padding may precede it
                    if line_end < 0:
                        return
                    del self.buf[: line_end + 2]
                    self.state = "headers"
            elif self.state == "headers":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self.error = _bad("multipart part headers too large")
                    return
                self._start_part(bytes(self.buf[:end]))
                del self.buf[: end + 4]
                self.state = "content"
            else:  # done: an epilogue is ignored
                self.buf.clear()
                return

    def finish(self) -> None:
        if self.error is None and self.state != "done":
            self.error = _bad("the multipart body is incomplete")
        if self.error is not None:
            raise self.error

    def _start_part(self, head: bytes) -> None:
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        params = {m[1].lower(): m[3] if m[2] is None else m[2] for m in PARAM.finditer(disposition)}
        self._part = {
            "field": params.get("name"),
            "filename": params.get("filename"),
            "content_type": headers.get("content-type", ""),
            "size": 0,
        }
        self._value.clear()

    def _content(self, data: bytes | bytearray) -> None:
        part = self._part
        if part is None or not data:
            return  # the preamble
        part["size"] += len(data)
        if part["filename"] is None:
            if part["size"] > MAX_FIELD:
                self.error = _HTTPError(413, "request_entity_too_large", "field too large")
            else:
                self._value += data

    def _end_part(self) -> None:
        part, self._part = self._part, None
        if part is None or part["field"] is None:
            return
        if part["filename"] is None:
            self.fields[part["field"]] = self._value.decode("utf-8", "replace")
        else:
            self.files.append(part)


def _remember(store: dict[str, dict[str, Any]], key: str, record: dict[str, Any]) -> None:
    store[key] = record
    while len(store) > MAX_RECORDS:
        del store[next(iter(store))]


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as Dify shows it: the stand-in's own keys start with `_`."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _answer_preview(k: _Knobs, query: str, limit: int = 1_000) -> str:
    """The start of the answer a chat streams, in constant time even for a benchmark's
    thousands of padded events."""
    if k.events is None:
        return "".join(k.answers(query)[0])[:limit]
    delta = k.delta()[:limit]
    return (delta * min(k.events, limit // max(len(delta), 1) + 1))[:limit]


def _user(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad("user is required and must be a non-empty string")
    return value


class _ApiCall:
    """One request to the non-chat API: its query, JSON body and multipart form."""

    def __init__(self, query: str, body: Any, form: _Multipart | None) -> None:
        parsed = parse_qs(query, keep_blank_values=True)
        self.query = {k: v[0] for k, v in parsed.items()}
        self.body, self.form = body, form

    def json(self) -> dict[str, Any]:
        if not isinstance(self.body, dict):
            raise _bad("the body must be a JSON object")
        return self.body

    def limit(self) -> int:
        raw = self.query.get("limit") or "20"
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise _bad("limit must be an integer from 1 to 100")
        return int(raw)

    def upload(self, missing: _HTTPError) -> tuple[str, dict[str, Any]]:
        """The uploading user and the one `file` part, checked as Dify checks them."""
        assert self.form is not None
        self.form.finish()
        user = _user(self.form.fields.get("user"))
        files = [f for f in self.form.files if f["field"] == "file"]
        if not files:
            raise missing
        if len(self.form.files) > 1:
            raise _HTTPError(400, "too_many_files", "Only one file is allowed.")
        if not files[0]["filename"]:
            raise _HTTPError(
                400, "filename_not_exists_error", "The specified filename does not exist."
            )
        return user, files[0]


API_ROUTES = (
    ("GET", re.compile(r"/v1/conversations"), "_list_conversations"),
    ("POST", re.compile(r"/v1/conversations/([^/]+)/name"), "_rename_conversation"),
    ("DELETE", re.compile(r"/v1/conversations/([^/]+)"), "_delete_conversation"),
    ("GET", re.compile(r"/v1/messages"), "_list_messages"),
    ("POST", re.compile(r"/v1/messages/([^/]+)/feedbacks"), "_feedback"),
    ("GET", re.compile(r"/v1/messages/([^/]+)/suggested"), "_suggested"),
    ("POST", re.compile(r"/v1/files/upload"), "_upload"),
    ("POST", re.compile(r"/v1/audio-to-text"), "_audio_to_text"),
    ("POST", re.compile(r"/v1/text-to-audio"), "_text_to_audio"),
    ("GET", re.compile(r"/v1/(parameters|meta|info)"), "_app_info"),
)
APP_INFO: dict[str, Any] = {
    "parameters": {
        "opening_statement": "Hello from the local Dify stand-in.",
        "suggested_questions": ["What can you do?"],
        "suggested_questions_after_answer": {"enabled": True},
        "speech_to_text": {"enabled": True},
        "text_to_speech": {"enabled": True, "voice": "alloy", "language": "en-US"},
        "retriever_resource": {"enabled": False},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "sensitive_word_avoidance": {"enabled": False},
        "user_input_form": [],
        "file_upload": {
            "image": {
                "enabled": True,
                "number_limits": 3,
                "transfer_methods": ["remote_url", "local_file"],
            }
        },
        "system_parameters": {
            "file_size_limit": MAX_FILE // 2**20,
            "image_file_size_limit": 10,
            "audio_file_size_limit": MAX_AUDIO // 2**20,
            "video_file_size_limit": 100,
        },
    },
    "meta": {"tool_icons": {}},
    "info": {
        "name": "Dify stand-in",
        "description": "A local stand-in for a Dify chat app.",
        "tags": [],
        "mode": "chat",
        "author_name": "dify-proxy",
    },
}


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HTTPError(400, "bad_request", "malformed request line", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _HTTPError(400, "bad_request", "malformed header line", close=True)
        headers[name.strip().lower()] = value.strip()
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "keep-alive" in tokens if parts[2] == "HTTP/1.0" else "close" not in tokens
    path, _, query = parts[1].partition("?")
    return parts[0], path, query, headers, keep


class _Task:
    """One chat run: the handle through which stop and the EOF watcher reach a sleeping stream."""

    __slots__ = (
        "task_id",
        "message_id",
        "conversation_id",
        "created_at",
        "user",
        "record",
        "streaming",
        "wake",
        "stopped",
        "closed",
    )

    def __init__(
        self, conversation_id: str, user: str, record: dict[str, Any], streaming: bool
    ) -> None:
        self.task_id, self.message_id = str(uuid.uuid4()), str(uuid.uuid4())
        self.conversation_id, self.user, self.record = conversation_id, user, record
        self.created_at, self.streaming = int(time.time()), streaming
        self.wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stopped = self.closed = False

    def interrupt(self) -> None:
        if not self.wake.done():
            self.wake.set_result(None)

    async def pause(self, seconds: float | None) -> None:
        """Sleep that stop and client disconnect cut short; `None` waits for one of them."""
        if seconds is None or seconds > 0:
            await asyncio.wait((self.wake,), timeout=seconds)

    def finish(self, how: str) -> None:
        if self.record["stream_end"] is None:
            self.record["stream_end"], self.record["ended_at"] = how, time.time()

    def event(self, kind: str, **extra: Any) -> bytes:
        head = {
            "event": kind,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "created_at": self.created_at,
            "task_id": self.task_id,
            "id": self.message_id,
        }
        return b"data: " + _dumps({**head, **extra}) + b"\n\n"

    def error_event(self) -> bytes:
        return (
            b"data: "
            + _dumps(
                {
                    "event": "error",
                    "conversation_id": self.conversation_id,
                    "message_id": self.message_id,
                    "created_at": self.created_at,
                    "status": 400,
                    "code": "completion_request_error",
                    "message": "stand-in error",
                }
            )
            + b"\n\n"
        )

    def usage(self, query: str, completion: int) -> dict[str, Any]:
        prompt = len(query.split()) + 1
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "total_price": f"{(prompt + completion) * 2e-6:.7f}",
            "currency": "USD",
            "latency": round(time.time() - self.record["started_at"], 3),
        }


class StandIn:
    """The server state: recorded calls and running tasks; one instance per listening socket."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()
        self.calls: list[dict[str, Any]] = []
        self.tasks: dict[str, _Task] = {}
        self.conversations: dict[str, dict[str, Any]] = {}  # by id; each has its "user"
        self.messages: dict[str, dict[str, Any]] = {}
        self.recordings: dict[str, str] = {}  # by name, for the replay_recording knob
        self._seq = itertools.count()  # orders records created within the same second
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen and return the bound port (the backlog absorbs a benchmark's connect burst)."""
        self._server = await asyncio.start_server(self._handle, host, port, backlog=8192)
        return self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and cut every connection, so hanging streams cannot block shutdown."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(reader, writer)
        try:
            while await self._one_request(conn):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # shutdown; re-raising makes 3.11's start_server log it
            pass
        finally:
            self._handlers.discard(me)
            writer.close()

    async def _send(
        self,
        conn: _Conn,
        status: int,
        body: bytes,
        keep: bool,
        ctype: str = "application/json",
        extra: bytes = b"",
    ) -> None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: %s\r\n" % (
            status,
            reason.encode(),
            ctype.encode(),
            len(body),
            b"keep-alive" if keep else b"close",
        )
        conn.writer.write(head + extra + b"\r\n" + body)
        await conn.writer.drain()

    async def _reply(
        self,
        conn: _Conn,
        rec: dict[str, Any],
        status: int,
        body: bytes,
        keep: bool,
        ctype: str = "application/json",
        extra: bytes = b"",
    ) -> bool:
        rec["status"] = status
        await self._send(conn, status, body, keep, ctype, extra)
        if rec["ended_at"] is None:
            rec["ended_at"] = time.time()
        return keep

    async def _one_request(self, conn: _Conn) -> bool:
        """Serve one request; False means hang up."""
        try:
            head = await conn.read_head()
            if head is None:
                return False
            method, path, query, headers, keep = _parse_head(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise _HTTPError(
                    411, "length_required", "chunked request bodies are not supported", close=True
                )
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise _HTTPError(400, "bad_request", "bad Content-Length", close=True) from None
            streamed = method == "POST" and path in UPLOAD_PATHS  # parsed below, as it arrives
            if not 0 <= length <= (MAX_UPLOAD_BODY if streamed else MAX_BODY):
                raise _HTTPError(413, "request_entity_too_large", "body too large", close=True)
            if length and headers.get("expect", "").lower() == "100-continue":
                conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = b"" if streamed else await conn.read_body(length)
        except _HTTPError as e:
            await self._send(conn, e.status, e.body(), keep=False)
            return False
        if path != "/v1" and not path.startswith("/v1/"):
            return await self._inspect(conn, method, path, body, keep)
        auth = headers.get("authorization")
        scheme, _, token = (auth or "").partition(" ")
        auth_ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._key
        )
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        rec: dict[str, Any] = {
            "method": method,
            "path": path,
            "query": query,
            "headers": {**headers, "authorization": "present" if auth is not None else "absent"},
            "auth_ok": auth_ok,
            "json": parsed,
            "task_id": None,
            "status": None,
            "stream_end": None,
            "started_at": time.time(),
            "ended_at": None,
        }
        self.calls.append(rec)
        form = await self._read_form(conn, headers, length, rec) if streamed else None
        try:
            if not auth_ok:
                raise _HTTPError(401, "unauthorized", "Access token is invalid")
            match = STOP_PATH.fullmatch(path)
            if (path == "/v1/chat-messages" or match) and method != "POST":
                raise _HTTPError(405, "method_not_allowed", "Method not allowed here.")
            if path == "/v1/chat-messages":
                return await self._chat(conn, rec, parsed, keep)
            if match:
                return await self._stop(conn, rec, parsed, match[1], keep)
            return await self._api(conn, rec, method, path, query, parsed, form, keep)
        except _HTTPError as e:
            return await self._reply(conn, rec, e.status, e.body(), keep and not e.close)

    async def _inspect(self, conn: _Conn, method: str, path: str, body: bytes, keep: bool) -> bool:
        """Test-only routes (no auth): what the stand-in saw, so tests can assert on the proxy;
        and recordings to replay, stored by name."""
        if method == "PUT" and path.startswith("/_standin/recordings/"):
            self.recordings[path.removeprefix("/_standin/recordings/")] = body.decode()
            body = b'{"result":"success"}'
        elif (method, path) == ("GET", "/_standin/calls"):
            body = _dumps(self.calls)
        elif (method, path) == ("POST", "/_standin/reset"):
            self.calls.clear()
            self.conversations.clear()
            self.messages.clear()
            body = b'{"result":"success"}'
        elif (method, path) == ("GET", "/_standin/open"):
            n = sum(t.streaming and t.record["stream_end"] is None for t in self.tasks.values())
            body = _dumps({"open_streams": n})
        else:
            body = _HTTPError(404, "not_found", "The requested URL was not found.").body()
            await self._send(conn, 404, body, keep)
            return keep
        await self._send(conn, 200, body, keep)
        return keep

    async def _stop(
        self, conn: _Conn, rec: dict[str, Any], req: Any, task_id: str, keep: bool
    ) -> bool:
        user = req.get("user") if isinstance(req, dict) else None
        if not isinstance(user, str) or not user:
            raise _bad("user is required and must be a non-empty string")
        rec["task_id"] = task_id
        task = self.tasks.get(task_id)
        if task is not None and task.user == user:  # like Dify: a stranger's stop is a silent no-op
            task.stopped = True
            task.interrupt()
        return await self._reply(conn, rec, 200, b'{"result":"success"}', keep)

    async def _read_form(
        self, conn: _Conn, headers: dict[str, str], length: int, rec: dict[str, Any]
    ) -> _Multipart:
        """Read an upload's body to its end, parsing as it arrives; the call log gets the form
        fields (`user` among them) and each file's name, type and size."""
        form = _Multipart(headers.get("content-type", ""))
        remaining = length
        while remaining:
            data = await conn.read_some(min(remaining, 65536))
            remaining -= len(data)
            form.feed(data)
        rec["form"] = form.fields
        rec["files"] = [dict(f) for f in form.files]
        return form

    def _remember_chat(self, task: _Task, inputs: dict[str, Any], query: str, k: _Knobs) -> None:
        """What Dify's conversation and message lists show once this chat has run."""
        now, seq = task.created_at, next(self._seq)
        conversation = self.conversations.get(task.conversation_id)
        if conversation is None:
            conversation = {
                "id": task.conversation_id,
                "name": query[:40] or "New conversation",
                "inputs": inputs,
                "status": "normal",
                "introduction": "",
                "created_at": now,
                "_user": task.user,
                "_created": (now, seq),
            }
        conversation.update(updated_at=now, _updated=(now, seq))
        _remember(self.conversations, task.conversation_id, conversation)
        message = {
            "id": task.message_id,
            "conversation_id": task.conversation_id,
            "parent_message_id": None,
            "inputs": inputs,
            "query": query,
            "answer": _answer_preview(k, query),
            "message_files": [],
            "feedback": None,
            "retriever_resources": [],
            "agent_thoughts": [],
            "status": "normal",
            "error": None,
            "created_at": now,
            "_user": task.user,
        }
        _remember(self.messages, task.message_id, message)

    def _conversation(self, conversation_id: str, user: str) -> dict[str, Any]:
        found = self.conversations.get(conversation_id)
        if found is None or found["_user"] != user:
            raise _HTTPError(404, "not_found", "Conversation Not Exists.")
        return found

    def _message(self, message_id: str, user: str) -> dict[str, Any]:
        found = self.messages.get(message_id)
        if found is None or found["_user"] != user:
            raise _HTTPError(404, "not_found", "Message Not Exists.")
        return found

    async def _api(
        self,
        conn: _Conn,
        rec: dict[str, Any],
        method: str,
        path: str,
        query: str,
        body: Any,
        form: _Multipart | None,
        keep: bool,
    ) -> bool:
        """The non-chat calls: each handler answers (status, JSON), (204, None) or audio."""
        for route_method, pattern, name in API_ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method != route_method:
                raise _HTTPError(405, "method_not_allowed", "Method not allowed here.")
            status, answer = getattr(self, name)(_ApiCall(query, body, form), *match.groups())
            if isinstance(answer, tuple):
                return await self._audio(conn, rec, answer, keep)
            if answer is None:
                rec["status"] = status
                conn.writer.write(
                    b"HTTP/1.1 %d No Content\r\nConnection: %s\r\n\r\n"
                    % (status, b"keep-alive" if keep else b"close")
                )
                await conn.writer.drain()
                rec["ended_at"] = time.time()
                return keep
            return await self._reply(conn, rec, status, _dumps(answer), keep)
        raise _HTTPError(404, "not_found", "The requested URL was not found on the server.")

    async def _audio(
        self, conn: _Conn, rec: dict[str, Any], chunks: tuple[bytes, ...], keep: bool
    ) -> bool:
        """Audio as Dify's text-to-audio sends it: chunked, a piece at a time."""
        rec["status"] = 200
        conn.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: %s\r\n\r\n" % (b"keep-alive" if keep else b"close")
        )
        for data in chunks:
            conn.writer.write(_chunk(data))
            await conn.writer.drain()
            await asyncio.sleep(0.01)
        conn.writer.write(LAST_CHUNK)
        await conn.writer.drain()
        rec["ended_at"] = time.time()
        return keep

    def _list_conversations(self, call: _ApiCall) -> tuple[int, Any]:
        user, limit = _user(call.query.get("user")), call.limit()
        sort_by = call.query.get("sort_by") or "-updated_at"
        if sort_by not in SORT_ORDERS:
            raise _bad(f"sort_by must be one of {', '.join(SORT_ORDERS)}")
        key = "_created" if sort_by.endswith("created_at") else "_updated"
        mine = sorted(
            (c for c in self.conversations.values() if c["_user"] == user),
            key=lambda c: c[key],
            reverse=sort_by.startswith("-"),
        )
        last_id = call.query.get("last_id")
        if last_id:
            ids = [c["id"] for c in mine]
            if last_id not in ids:
                raise _HTTPError(404, "not_found", "Last Conversation Not Exists.")
            mine = mine[ids.index(last_id) + 1 :]
        page = [_public(c) for c in mine[:limit]]
        return 200, {"limit": limit, "has_more": len(mine) > limit, "data": page}

    def _rename_conversation(self, call: _ApiCall, conversation_id: str) -> tuple[int, Any]:
        req = call.json()
        conversation = self._conversation(conversation_id, _user(req.get("user")))
        if req.get("auto_generate") is True:
            conversation["name"] = "Stand-in generated name"
        else:
            name = req.get("name")
            if not isinstance(name, str) or not name.strip():
                raise _bad("name is required unless auto_generate is true")
            conversation["name"] = name
        now = int(time.time())
        conversation.update(updated_at=now, _updated=(now, next(self._seq)))
        return 200, _public(conversation)

    def _delete_conversation(self, call: _ApiCall, conversation_id: str) -> tuple[int, Any]:
        self._conversation(conversation_id, _user(call.json().get("user")))
        del self.conversations[conversation_id]
        for message_id in [
            m["id"] for m in self.messages.values() if m["conversation_id"] == conversation_id
        ]:
            del self.messages[message_id]
        return 204, None

    def _list_messages(self, call: _ApiCall) -> tuple[int, Any]:
        user, limit = _user(call.query.get("user")), call.limit()
        conversation_id = call.query.get("conversation_id")
        if not conversation_id:
            raise _bad("conversation_id is required")
        self._conversation(conversation_id, user)
        history = [m for m in self.messages.values() if m["conversation_id"] == conversation_id]
        first_id = call.query.get("first_id")
        if first_id:
            ids = [m["id"] for m in history]
            if first_id not in ids:
                raise _HTTPError(404, "not_found", "First Message Not Exists.")
            history = history[: ids.index(first_id)]
        page = [_public(m) for m in history[-limit:]]
        return 200, {"limit": limit, "has_more": len(history) > limit, "data": page}

    def _feedback(self, call: _ApiCall, message_id: str) -> tuple[int, Any]:
        req = call.json()
        message = self._message(message_id, _user(req.get("user")))
        rating = req.get("rating")
        if rating not in ("like", "dislike", None):
            raise _bad("rating must be like, dislike or null")
        message["feedback"] = None if rating is None else {"rating": rating}
        return 200, {"result": "success"}

    def _suggested(self, call: _ApiCall, message_id: str) -> tuple[int, Any]:
        message = self._message(message_id, _user(call.query.get("user")))
        topic = message["query"][:30]
        questions = [f"Tell me more about {topic}?", "Can you give an example?", "What else?"]
        return 200, {"result": "success", "data": questions}

    def _upload(self, call: _ApiCall) -> tuple[int, Any]:
        user, file = call.upload(_HTTPError(400, "no_file_uploaded", "Please upload your file."))
        name = file["filename"]
        extension = name.rpartition(".")[2].lower() if "." in name else ""
        if extension in BLOCKED_EXTENSIONS:
            raise _HTTPError(415, "unsupported_file_type", "File type not allowed.")
        if file["size"] > MAX_FILE:
            raise _HTTPError(413, "file_too_large", "File size exceeded.")
        return 201, {
            "id": str(uuid.uuid4()),
            "name": name,
            "size": file["size"],
            "extension": extension,
            "mime_type": file["content_type"],
            "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
            "created_at": int(time.time()),
        }

    def _audio_to_text(self, call: _ApiCall) -> tuple[int, Any]:
        _, file = call.upload(_HTTPError(400, "no_audio_uploaded", "Please upload your audio."))
        if not file["content_type"].startswith("audio/"):
            raise _HTTPError(415, "unsupported_audio_type", "Audio type not allowed.")
        if file["size"] > MAX_AUDIO:
            raise _HTTPError(413, "audio_too_large", "Audio size exceeded.")
        return 200, {"text": f"Stand-in transcript of {file['filename']} ({file['size']} bytes)."}

    def _text_to_audio(self, call: _ApiCall) -> tuple[int, Any]:
        req = call.json()
        user = _user(req.get("user"))
        if req.get("message_id"):
            self._message(req["message_id"], user)
        elif not isinstance(req.get("text"), str) or not req["text"].strip():
            raise _bad("message_id or text is required")
        return 200, FAKE_AUDIO

    def _app_info(self, call: _ApiCall, name: str) -> tuple[int, Any]:
        return 200, APP_INFO[name]

    async def _watch(self, conn: _Conn, task: _Task) -> None:
        """Notice a client leaving while the stream is silent; pipelined bytes stay in conn.buf."""
        with contextlib.suppress(OSError):
            while await conn.fill():
                pass
        task.closed = True
        task.finish("client_closed")
        task.interrupt()

    async def _chat(self, conn: _Conn, rec: dict[str, Any], req: Any, keep: bool) -> bool:
        if not isinstance(req, dict):
            raise _bad("the body must be a JSON object")
        query, inputs, user = req.get("query"), req.get("inputs"), req.get("user")
        if not isinstance(query, str):
            raise _bad("query is required and must be a string")
        if not isinstance(inputs, dict):
            raise _bad("inputs is required and must be an object")
        if not isinstance(user, str) or not user:
            raise _bad("user is required and must be a non-empty string")
        conversation_id = req.get("conversation_id") or str(uuid.uuid4())
        if not isinstance(conversation_id, str):
            raise _bad("conversation_id must be a string")
        known = self.conversations.get(conversation_id)
        if known is not None and known["_user"] != user:
            raise _HTTPError(404, "not_found", "Conversation Not Exists.")
        knobs = _Knobs(inputs.get("_standin"))
        if knobs.replay_recording is not None:
            knobs.replay = self.recordings.get(knobs.replay_recording)
            if knobs.replay is None:
                raise _bad(f"no recording named {knobs.replay_recording!r}")
        streaming = req.get("response_mode") == "streaming"
        task = _Task(conversation_id, user, rec, streaming and knobs.status is None)
        rec["task_id"] = task.task_id
        self.tasks[task.task_id] = task
        if knobs.status is None:
            self._remember_chat(task, inputs, query, knobs)
        watcher = asyncio.create_task(self._watch(conn, task))
        try:
            await task.pause(knobs.header_delay)
            if task.closed:
                return False
            if knobs.status is not None:
                return await self._knob_status(conn, rec, knobs, keep)
            if streaming:
                return await self._stream(conn, task, knobs, query, keep)
            return await self._blocking(conn, task, knobs, query, keep)
        except ConnectionError:
            task.finish("client_closed")
            return False
        finally:
            watcher.cancel()
            await asyncio.wait((watcher,))
            self.tasks.pop(task.task_id, None)

    async def _knob_status(self, conn: _Conn, rec: dict[str, Any], k: _Knobs, keep: bool) -> bool:
        status = k.status or 500
        extra = b""
        if k.retry_after is not None:
            extra = b"Retry-After: %s\r\n" % str(k.retry_after).encode()
        if k.body is not None:
            body, ctype = k.body.encode(), k.content_type
            return await self._reply(conn, rec, status, body, keep, ctype, extra)
        body = _HTTPError(status, k.code, k.message).body()
        return await self._reply(conn, rec, status, body, keep, extra=extra)

    async def _blocking(self, conn: _Conn, task: _Task, k: _Knobs, query: str, keep: bool) -> bool:
        """Blocking mode honours the end knob too: drop and hang cut or stall the JSON answer."""
        if k.end in ("drop", "drop_mid_event"):
            conn.writer.transport.abort()
            task.finish("dropped")
            return False
        if k.end == "hang":
            await task.pause(None)
            if task.closed:
                return False
        if k.end == "error" and not task.stopped:
            task.finish("error_event")
            err = _HTTPError(400, "completion_request_error", "stand-in error")
            return await self._reply(conn, task.record, 400, err.body(), keep)
        answers, count = k.answers(query)
        body = _dumps(
            {
                "event": "message",
                "task_id": task.task_id,
                "id": task.message_id,
                "message_id": task.message_id,
                "conversation_id": task.conversation_id,
                "mode": "chat",
                "answer": "".join(answers),
                "metadata": {"usage": task.usage(query, count)},
                "created_at": task.created_at,
            }
        )
        keep = await self._reply(conn, task.record, 200, body, keep)
        task.finish("stopped" if task.stopped else "completed")
        return keep

    async def _emit(self, conn: _Conn, task: _Task, data: bytes, k: _Knobs) -> None:
        """One scenario write: one chunk, or `split`-byte chunks split_delay apart; each drained."""
        step = k.split or len(data)
        for i in range(0, len(data), step):
            if i:
                await task.pause(k.split_delay)
            if task.closed:
                return
            conn.writer.write(_chunk(data[i : i + step]))
            await conn.writer.drain()

    async def _stream(self, conn: _Conn, task: _Task, k: _Knobs, query: str, keep: bool) -> bool:
        conn.writer.write(STREAM_HEAD % (b"keep-alive" if keep else b"close"))
        await conn.writer.drain()
        task.record["status"] = 200
        if k.replay is not None:
            return await self._replay(conn, task, k, keep)
        await task.pause(k.first_delay)
        for _ in range(k.pings):
            await task.pause(k.ping_interval)
            if task.stopped or task.closed:
                break
            await self._emit(conn, task, PING, k)
        answers, _ = k.answers(query)
        same = task.event("message", answer=k.delta()) if k.events is not None else b""  # prebuilt
        held: list[bytes] = []
        sent = 0
        for answer in answers:
            if sent and k.interval and not k.coalesce:
                await task.pause(k.interval)
            if task.stopped or task.closed:
                break
            data = same or task.event("message", answer=answer)
            if k.coalesce:
                held.append(data)
            else:
                await self._emit(conn, task, data, k)
            sent += 1
        if task.closed:
            return False
        end = "stopped" if task.stopped else k.end
        if end == "hang":
            if held:
                await self._emit(conn, task, b"".join(held), k)
                held = []
            await task.pause(None)
            if task.closed:
                return False
            end = "stopped"
        if end in ("message_end", "stopped"):
            held.append(task.event("message_end", metadata={"usage": task.usage(query, sent)}))
        elif end == "error":
            held.append(task.error_event())
        elif end == "drop_mid_event":
            extra = task.event("message", answer="half of an event that never ends")
            held.append(extra[: len(extra) // 2])
        if k.coalesce and held:
            await self._emit(conn, task, b"".join(held), k)
        else:
            for data in held:
                await self._emit(conn, task, data, k)
        if task.closed:
            return False
        if end.startswith("drop"):
            conn.writer.transport.abort()
            task.finish("dropped")
            return False
        conn.writer.write(LAST_CHUNK)
        await conn.writer.drain()
        task.finish({"message_end": "completed", "error": "error_event"}.get(end, end))
        return keep

    async def _replay(self, conn: _Conn, task: _Task, k: _Knobs, keep: bool) -> bool:
        """Send a recorded stream exactly as recorded, in the pieces the scenario asks for."""
        for i, data in enumerate(k.replay_writes()):
            await task.pause(k.replay_stall if i == k.replay_stall_at else k.replay_delay)
            if task.closed:
                return False
            conn.writer.write(_chunk(data))
            await conn.writer.drain()
        conn.writer.write(LAST_CHUNK)
        await conn.writer.drain()
        task.finish("completed")
        return keep


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    *,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set (forever without one); `on_ready` gets the base URL when bound."""
    app = StandIn(api_key or os.environ.get("STANDIN_API_KEY") or DEFAULT_API_KEY)
    bound = await app.start(host, port)
    stop = stop or asyncio.Event()
    try:
        if on_ready is not None:
            on_ready(_url(host, bound))
        await stop.wait()
    finally:
        await app.aclose()


def start_in_thread(
    api_key: str | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[str, Callable[[], None]]:
    """Run the stand-in on its own loop in a daemon thread, for tests that want no subprocess.

    Returns `(base_url, stop)`; `stop()` closes every connection and joins the thread.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def on_ready(url: str) -> None:
        box["url"] = url
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["stop"] = asyncio.Event()
        try:
            loop.run_until_complete(serve(host, port, api_key, on_ready=on_ready, stop=box["stop"]))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            box["error"] = e
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=run, name="dify-standin", daemon=True)
    thread.start()
    if not ready.wait(10) or "url" not in box:
        raise RuntimeError("stand-in did not start") from box.get("error")

    def stop_fn() -> None:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(box["stop"].set)
            thread.join(10)

    return box["url"], stop_fn


def _raise_fd_limit() -> None:
    """5000 streams need more descriptors than a default soft limit of 1024."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> None:
    """CLI entry: prints `READY <base url>` once listening; SIGTERM/SIGINT end it with status 0."""
    parser = argparse.ArgumentParser(
        prog="python -m dify_proxy.standin", description="Local stand-in for Dify's service API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", help=f"default: $STANDIN_API_KEY or {DEFAULT_API_KEY}")
    args = parser.parse_args(argv)
    _raise_fd_limit()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            args.host,
            args.port,
            args.api_key,
            on_ready=lambda url: print(f"READY {url}", flush=True),
            stop=stop,
        )

    asyncio.run(run())


if __name__ == "__main__":
    main()
