"""The chat stream: `POST /v1/chat-messages` in streaming or blocking mode, played out as its
scenario asks (see scenario.py), and `POST /v1/chat-messages/{task_id}/stop`.

A stream's events are written one HTTP chunk per write, so the proxy sees the chunk boundaries
the scenario chose. A client that leaves while a stream is silent is noticed at once: the
server cancels the handler when the connection closes (`handler_cancellation`), and the call
log records `client_closed`. The event shapes follow /work/shared/dify-protocol.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from aiohttp import hdrs, web

from dify_proxy.standin.records import CALL, RECORDS, json_body
from dify_proxy.standin.scenario import Scenario
from dify_proxy.standin.wire import DifyError, bad, dumps, json_response, not_found, user_of

PING = b"event: ping\n\n"
SSE_HEADERS = {hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8"}
ENDINGS = {"message_end": "completed", "error": "error_event"}  # how a call log names an end
routes = web.RouteTableDef()


class ChatRun:
    """One chat run: the handle through which stop reaches a sleeping stream, the events it
    writes, and how it ended in the call log."""

    def __init__(self, conversation_id: str, user: str, record: dict[str, Any], streaming: bool):
        self.task_id, self.message_id = str(uuid.uuid4()), str(uuid.uuid4())
        self.conversation_id, self.user, self.record = conversation_id, user, record
        self.created_at, self.streaming = int(time.time()), streaming
        self.stopped = False
        self.waiter: asyncio.Future[None] | None = None  # the pause a stop cuts short

    def stop(self) -> None:
        self.stopped = True
        if self.waiter is not None:
            _wake(self.waiter)

    async def pause(self, seconds: float | None) -> None:
        """A sleep that stop cuts short; `None` waits for the stop (or the client leaving).

        asyncio.sleep with a handle for stop, rather than asyncio.wait: a benchmark's 5,000
        streams pause 30 times each, and wait() costs several times more CPU."""
        if self.stopped or (seconds is not None and seconds <= 0):
            return
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _wake, self.waiter)
        try:
            await self.waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def finish(self, how: str) -> None:
        if self.record["stream_end"] is None:
            self.record["stream_end"], self.record["ended_at"] = how, time.time()

    def event(self, kind: str, **extra: Any) -> bytes:
        head = {
            "event": kind,
            "conversation_id": self.conversation_id,
            "message_id": self.message_id,
            "created_at": self.created_at,
        }
        if kind == "error":  # Dify's error event carries no task id
            return b"data: " + dumps({**head, **extra}) + b"\n\n"
        ids = {"task_id": self.task_id, "id": self.message_id}
        return b"data: " + dumps({**head, **ids, **extra}) + b"\n\n"

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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


ERROR = {"status": 400, "code": "completion_request_error", "message": "stand-in error"}


@routes.post("/v1/chat-messages")
async def chat(request: web.Request) -> web.StreamResponse:
    req, records = json_body(request), request.app[RECORDS]
    query, inputs = req.get("query"), req.get("inputs")
    if not isinstance(query, str):
        raise bad("query is required and must be a string")
    if not isinstance(inputs, dict):
        raise bad("inputs is required and must be an object")
    user = user_of(req.get("user"))
    conversation_id = req.get("conversation_id") or str(uuid.uuid4())
    if not isinstance(conversation_id, str):
        raise bad("conversation_id must be a string")
    known = records.conversations.get(conversation_id)
    if known is not None and known["_user"] != user:
        raise not_found("Conversation")
    scenario = Scenario.parse(inputs.get("_standin"))
    if scenario.replay_recording is not None:
        recorded = records.recordings.get(scenario.replay_recording)
        if recorded is None:
            raise bad(f"no recording named {scenario.replay_recording!r}")
        scenario = dataclasses.replace(scenario, replay=recorded)
    streaming = req.get("response_mode") == "streaming"
    run = ChatRun(conversation_id, user, request[CALL], streaming and scenario.status is None)
    run.record["task_id"] = run.task_id
    records.runs[run.task_id] = run
    if scenario.status is None:
        records.remember_chat(run, inputs, query, scenario.preview(query))
        records.attach_files(req.get("files"))
    try:
        await run.pause(scenario.header_delay)
        if scenario.status is not None:
            return status_reply(scenario)
        if streaming:
            return await stream(request, run, scenario, query)
        return await blocking(request, run, scenario, query)
    except ConnectionError:  # the client left mid-write; aiohttp drops the connection
        run.finish("client_closed")
        return web.Response()
    except asyncio.CancelledError:  # the client left while the stream was silent
        run.finish("client_closed")
        raise
    finally:
        records.runs.pop(run.task_id, None)


def status_reply(s: Scenario) -> web.Response:
    headers = {} if s.retry_after is None else {hdrs.RETRY_AFTER: str(s.retry_after)}
    if s.body is None:
        error = DifyError(s.status or 500, s.code, s.message).response()
        error.headers.update(headers)
        return error
    response = web.Response(status=s.status or 500, body=s.body.encode(), headers=headers)
    response.headers[hdrs.CONTENT_TYPE] = s.content_type
    return response


async def blocking(request: web.Request, run: ChatRun, s: Scenario, query: str) -> web.Response:
    """Blocking mode honours the end knob too: drop and hang cut or stall the JSON answer."""
    if s.end.startswith("drop"):
        run.finish("dropped")
        if request.transport is not None:
            request.transport.abort()
        return web.Response()  # never sent: the connection is gone
    if s.end == "hang":
        await run.pause(None)
    if s.end == "error" and not run.stopped:
        run.finish("error_event")
        raise DifyError(**ERROR)
    answers, count = s.answers(query)
    answer = {
        "event": "message",
        "task_id": run.task_id,
        "id": run.message_id,
        "message_id": run.message_id,
        "conversation_id": run.conversation_id,
        "mode": "chat",
        "answer": "".join(answers),
        "metadata": {"usage": run.usage(query, count)},
        "created_at": run.created_at,
    }
    response = web.Response(body=dumps(answer), content_type="application/json")
    run.record["status"] = 200
    run.finish("stopped" if run.stopped else "completed")
    return response


class ChunkedBody:
    """A stream's body, one HTTP chunk per scenario write (or `split`-byte chunks `split_delay`
    apart). aiohttp sends the head and the last chunk; the chunks in between go straight onto
    the connection, because aiohttp's own write path costs about 3 us more per write, which
    raised the stand-in's CPU in the firehose benchmark by a third (it has to stay cheap)."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        writer: Any,
        run: ChatRun,
        s: Scenario,
    ) -> None:
        self.transport, self.protocol = request.transport, request.protocol
        self.response, self.writer = response, writer
        self.run, self.split, self.split_delay = run, s.split, s.split_delay

    @classmethod
    async def start(cls, request: web.Request, run: ChatRun, s: Scenario) -> ChunkedBody:
        response = web.StreamResponse(headers=SSE_HEADERS)
        response.enable_chunked_encoding()
        return cls(request, response, await response.prepare(request), run, s)

    async def write(self, data: bytes) -> None:
        if self.split:
            for i in range(0, len(data), self.split):
                if i:
                    await self.run.pause(self.split_delay)
                await self.write_chunk(data[i : i + self.split])
        else:
            await self.write_chunk(data)

    async def write_chunk(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client has gone")
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        if self.protocol.writing_paused:  # the socket's buffer is full: wait for it
            await self.writer.drain()

    async def end(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response

    def drop(self) -> web.StreamResponse:
        """Cut the connection without ending the body."""
        self.run.finish("dropped")
        if self.transport is not None:
            self.transport.abort()
        return self.response


async def stream(request: web.Request, run: ChatRun, s: Scenario, query: str) -> web.StreamResponse:
    body = await ChunkedBody.start(request, run, s)
    run.record["status"] = 200
    if s.replay is not None:
        return await replay(body, run, s)
    await run.pause(s.first_delay)
    for _ in range(s.pings):
        await run.pause(s.ping_interval)
        if run.stopped:
            break
        await body.write(PING)
    answers, _ = s.answers(query)
    same = run.event("message", answer=s.delta()) if s.events is not None else b""  # prebuilt
    held: list[bytes] = []
    sent = 0
    for answer in answers:
        if sent and s.interval and not s.coalesce:
            await run.pause(s.interval)
        if run.stopped:
            break
        data = same or run.event("message", answer=answer)
        if s.coalesce:
            held.append(data)
        else:
            await body.write(data)
        sent += 1
    end = "stopped" if run.stopped else s.end
    if end == "hang":
        if held:
            await body.write(b"".join(held))
            held = []
        await run.pause(None)
        end = "stopped"
    if end in ("message_end", "stopped"):
        held.append(run.event("message_end", metadata={"usage": run.usage(query, sent)}))
    elif end == "error":
        held.append(run.event("error", **ERROR))
    elif end == "drop_mid_event":
        extra = run.event("message", answer="half of an event that never ends")
        held.append(extra[: len(extra) // 2])
    for data in [b"".join(held)] if s.coalesce and held else held:
        await body.write(data)
    if end.startswith("drop"):
        return body.drop()
    response = await body.end()
    run.finish(ENDINGS.get(end, end))
    return response


async def replay(body: ChunkedBody, run: ChatRun, s: Scenario) -> web.StreamResponse:
    """Send a recorded stream exactly as recorded, in the pieces the scenario asks for."""
    for i, data in enumerate(s.replay_writes()):
        await run.pause(s.replay_stall if i == s.replay_stall_at else s.replay_delay)
        await body.write_chunk(data)
    response = await body.end()
    run.finish("completed")
    return response


@routes.post("/v1/chat-messages/{task_id}/stop")
async def stop(request: web.Request) -> web.Response:
    req = request[CALL]["json"]
    user = user_of(req.get("user") if isinstance(req, dict) else None)
    task_id = request[CALL]["task_id"] = request.match_info["task_id"]
    run = request.app[RECORDS].runs.get(task_id)
    if run is not None and run.user == user:  # like Dify: a stranger's stop is a silent no-op
        run.stop()
    return json_response({"result": "success"})
