"""Load generator for bench/run.py: one process, one asyncio loop, raw sockets, stdlib only.

It is started by run.py (never imported by the app), reads one JSON spec line on stdin, sets
up, prints `READY`, waits for a `GO` line (so that several generator processes start their
burst together), runs, and prints one `RESULT {json}` line. With `notify_open` it also prints
`OPEN` once every stream has received its first data event (or failed).

Each request is written by hand (HTTP/1.1) and each response is read with an incremental
chunked decoder and a scan for SSE events, so the generator costs little CPU per event and
never shares a GIL with what it measures. All times are `time.monotonic()` (CLOCK_MONOTONIC,
the same clock in every process on the machine), so run.py can merge processes' timings.

Per stream it records: start (just before connect), connected, response head, first `data:`
byte, end, status, events seen, whether `message_end` arrived and the response ended cleanly
(terminating zero-length chunk), and optionally a digest of the message events with the ids
that differ between runs masked out (firehose byte check). With `notify_id` it prints
`ID <id>` for the first event id of each response (the resume mode resumes that stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import resource
import sys
import time

now = time.monotonic

# Fields whose values legitimately differ between two runs of the same stand-in scenario.
_FIRST_ID = re.compile(rb"(?m)^id: ?([^\r\n]*)\r?\n")
_MASKS = (
    (re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), b"<uuid>"),
    (re.compile(rb'"created_at":\d+'), b'"created_at":0'),
    # the usage report's timings (Dify 1.16's message_end has all three)
    (
        re.compile(rb'"(latency|time_to_first_token|time_to_generate)":[0-9.eE+-]+'),
        rb'"\1":0',
    ),
)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Stream(asyncio.Protocol):
    """One request and its response; `done` resolves when the response ends or fails."""

    def __init__(
        self, request: bytes, done: asyncio.Future, digest: bool, sse: bool, notify_id: bool = False
    ) -> None:
        self.request, self.done, self.want_digest, self.sse = request, done, digest, sse
        self.id_head = bytearray() if notify_id else None  # the body's start, until an id line
        self.transport: asyncio.Transport | None = None
        self.t_start = now()
        self.t_connected = self.t_head = self.t_first = self.t_end = None
        self.status = 0
        self.error: str | None = None
        self.head = bytearray()
        self.in_head = True
        self.chunked = False
        self.length: int | None = None  # Content-Length body remaining
        self.chunk_left = 0  # bytes of the current chunk still to read (+2 for its CRLF)
        self.size_line = bytearray()
        self.trailers = False  # after the zero-length chunk: trailer lines, then a blank line
        self.ended = False  # clean end: zero-length chunk or Content-Length reached
        self.sse_buf = b""
        self.tail = b""
        self.events = 0  # data events
        self.msg_events = 0
        self.msg_bytes = 0  # bytes of the `data:` lines of `message` events
        self.data_bytes = 0  # bytes of the `data:` lines of every event
        self.message_end = False
        self.body_bytes = 0
        self.err_body = bytearray()
        self.digest = hashlib.sha256() if digest else None
        self.deferred: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.t_connected = now()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self._feed(data)
        except Exception as exc:  # noqa: BLE001 - a protocol error ends this stream only
            self._finish(f"parse:{type(exc).__name__}:{exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.in_head:
                self._finish(f"closed_before_head:{type(exc).__name__ if exc else 'eof'}")
            elif self.length is None and not self.chunked:  # close-delimited body
                self.ended = True
                self._finish(None)
            else:
                self._finish(f"closed_mid_body:{type(exc).__name__ if exc else 'eof'}")

    # parsing
    def _feed(self, data: bytes) -> None:
        if self.in_head:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    raise ValueError("response head too large")
                return
            self.t_head = now()
            head = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            data = bytes(self.head[end + 4 :])
            self.head = bytearray()
            self.in_head = False
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
                elif name == "content-length":
                    self.length = int(value.strip())
            if self.length == 0 or self.status in (204, 304):  # no body, by definition
                self.ended = True
                self._finish(None)
                return
            if not data:
                return
        if self.chunked:
            self._dechunk(data)
        elif self.length is not None:
            take = data[: self.length]
            self.length -= len(take)
            self._body(take)
            if self.length == 0 or self.status in (204, 304):  # no body, by definition
                self.ended = True
                self._finish(None)
        else:
            self._body(data)

    def _dechunk(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self.chunk_left:
                before = self.chunk_left
                take = min(before, n - pos)
                body_take = min(take, max(before - 2, 0))  # a chunk's last 2 bytes are CRLF
                if body_take:
                    self._body(data[pos : pos + body_take])
                pos += take
                self.chunk_left -= take
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self.size_line += data[pos:]
                if len(self.size_line) > 1024:
                    raise ValueError("chunk size line too long")
                return
            self.size_line += data[pos:nl]
            pos = nl + 1
            line = bytes(self.size_line).strip()
            self.size_line = bytearray()
            if self.trailers:
                if line == b"":  # end of trailers: the response is complete
                    self.ended = True
                    self._finish(None)
                    return
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                self.trailers = True
                continue
            self.chunk_left = size + 2

    def _body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.status != 200:
            if len(self.err_body) < 300:
                self.err_body += data[: 300 - len(self.err_body)]
            return
        if not self.sse:
            return
        if self.t_first is None and b"data:" in self.tail + data:
            self.t_first = now()
        if self.id_head is not None:
            self.id_head += data
            if match := _FIRST_ID.search(self.id_head):
                print(f"ID {match[1].decode('latin-1')}", flush=True)
                self.id_head = None
            elif len(self.id_head) > 65536:
                self.id_head = None
        self.tail = data[-4:]
        if self.digest is not None:
            # firehose: keep the bytes and parse them after the end time is taken, so the
            # generator's own parsing cannot slow down the stream it measures
            self.deferred.append(data)
            return
        self._scan(data)

    def _scan(self, data: bytes) -> None:
        buf = self.sse_buf + data if self.sse_buf else data
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = buf[start : end + 2]
            start = end + 2
            # an event may carry `id:`/`event:` lines too (the proxy adds ids): only its
            # `data:` lines are compared, since ids differ between the proxy and nginx
            if event.startswith(b"event: ping"):
                continue  # a keep-alive, or the proxy's opening ping with its empty data line
            if event.startswith(b"data:") and event.count(b"\n") == 2:
                payload = event[:-2]
            elif b"data:" in event:
                payload = b"\n".join(
                    line for line in event.split(b"\n") if line.startswith(b"data:")
                )
            else:
                continue  # a keep-alive (`event: ping`, with or without an id)
            self.events += 1
            self.data_bytes += len(payload)
            head = payload[:64]
            if b'"event":"message"' in head:
                self.msg_events += 1
                self.msg_bytes += len(payload)
            elif b'"event":"message_end"' in head:
                self.message_end = True
            if self.digest is not None:
                for pattern, repl in _MASKS:
                    payload = pattern.sub(repl, payload)
                self.digest.update(payload + b"\n")
        self.sse_buf = buf[start:]

    def _finish(self, error: str | None) -> None:
        self.t_end = now()
        if self.deferred:
            self._scan(b"".join(self.deferred))
            self.deferred = []
        if error is None and self.status != 200:
            error = f"status_{self.status}:{bytes(self.err_body[:200]).decode('utf-8', 'replace')}"
        if error is None and self.sse and not self.message_end:
            error = "no_message_end"
        self.error = error
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def record(self) -> list:
        ok = self.error is None and self.ended
        return [
            self.t_start,
            self.t_connected,
            self.t_head,
            self.t_first,
            self.t_end,
            self.status,
            ok,
            self.error,
            self.events,
            self.msg_events,
            self.msg_bytes,
            self.data_bytes,
            self.digest.hexdigest() if self.digest is not None else None,
        ]


FIELDS = [
    "t_start",
    "t_connected",
    "t_head",
    "t_first",
    "t_end",
    "status",
    "ok",
    "error",
    "events",
    "msg_events",
    "msg_bytes",
    "data_bytes",
    "digest",
]


async def one(
    spec: dict, request: bytes, connect_sem: asyncio.Semaphore | None, opened: list
) -> list:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    stream = Stream(
        request, done, spec.get("digest", False), spec.get("sse", True), spec.get("notify_id", 0)
    )
    try:
        if connect_sem is not None:
            async with connect_sem:
                stream.t_start = now()
                await asyncio.wait_for(
                    loop.create_connection(lambda: stream, spec["host"], spec["port"]),
                    spec["connect_timeout"],
                )
        else:
            await asyncio.wait_for(
                loop.create_connection(lambda: stream, spec["host"], spec["port"]),
                spec["connect_timeout"],
            )
    except (TimeoutError, OSError) as exc:
        stream.t_end = now()
        stream.error = f"connect:{type(exc).__name__}:{exc}"
        opened.append(1)
        return stream.record()
    remaining = spec["stream_timeout"] - (now() - stream.t_start)
    try:
        if spec.get("notify_open"):
            # count this stream as "open" once it has its first data event or has ended
            while not done.done() and stream.t_first is None:
                await asyncio.wait((done,), timeout=0.05)
                if now() - stream.t_start > spec["stream_timeout"]:
                    break
            opened.append(1)
            remaining = spec["stream_timeout"] - (now() - stream.t_start)
        await asyncio.wait_for(asyncio.shield(done), max(remaining, 0.001))
    except TimeoutError:
        stream._finish("timeout")
    return stream.record()


async def run(spec: dict) -> dict:
    # one request per stream (each with its own user), or one request for all of them
    if "requests" in spec:
        requests = [r.encode("latin-1") for r in spec["requests"]]
    else:
        requests = [spec["request"].encode("latin-1")] * spec["n"]
    n = len(requests)
    concurrency = spec.get("concurrency", 0) or n
    connect_limit = spec.get("connect_limit", 0)
    connect_sem = asyncio.Semaphore(connect_limit) if connect_limit else None
    opened: list = []
    results: list = [None] * n
    queue = iter(range(n))
    deadline = now() + spec["deadline"]

    async def worker() -> None:
        for i in queue:
            if now() > deadline:
                results[i] = [
                    now(),
                    None,
                    None,
                    None,
                    now(),
                    0,
                    False,
                    "deadline",
                    0,
                    0,
                    0,
                    0,
                    None,
                ]
                continue
            results[i] = await one(spec, requests[i], connect_sem, opened)
            if spec.get("pause"):
                await asyncio.sleep(spec["pause"])

    async def announce() -> None:
        while len(opened) < n:
            await asyncio.sleep(0.02)
        print("OPEN", flush=True)

    t0 = now()
    cpu0 = time.process_time()
    notifier = asyncio.create_task(announce()) if spec.get("notify_open") else None
    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, n))]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), spec["deadline"] + 5)
    except TimeoutError:
        for w in workers:
            w.cancel()
    if notifier is not None:
        notifier.cancel()
    for i, r in enumerate(results):
        if r is None:
            results[i] = [t0, None, None, None, now(), 0, False, "deadline", 0, 0, 0, 0, None]
    return {
        "fields": FIELDS,
        "streams": results,
        "cpu_s": time.process_time() - cpu0,
        "cpu_total_s": _own_cpu(),  # start-up included
        "wall_s": now() - t0,
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    _raise_fd_limit()
    spec = json.loads(sys.stdin.readline())
    print("READY", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "GO":
        return
    result = asyncio.run(run(spec))
    sys.stdout.write("RESULT " + json.dumps(result, separators=(",", ":")) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
