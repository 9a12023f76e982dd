"""The answer streams: `POST /v1/chat-messages` (chatflow and chat apps), `POST
/v1/completion-messages` and, through `play`, a workflow app's run, in streaming or blocking
mode, played out as the request's scenario asks (see scenario.py); and the stops of chat and
completion tasks.

A stream's events are written one HTTP chunk per write (real Dify writes one chunk per event,
ping included), so the proxy sees the chunk boundaries the scenario chose. A chatflow sends
what Dify 1.16.1 sends: `ping`, `workflow_started`, the `message` deltas, the node events,
`message_end`, then `workflow_finished`. A client that leaves while a stream is silent is
noticed at once: the server cancels the handler when the connection closes
(`handler_cancellation`), and the call log records `client_closed`. The event shapes follow
Dify's wire format as recorded in the project's shared notes and captures.

Not captured from real Dify, so built from its documented shapes: the completion app, and the
end of a chatflow stopped while streaming (`workflow_finished` with status `stopped`, then
`message_end`, as Dify's stop handler writes them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from aiohttp import hdrs, web

from dify_proxy.standin import apps, human_input
from dify_proxy.standin.apps import CHAT, CHATFLOW, COMPLETION, WORKFLOW
from dify_proxy.standin.events import PING, Run, ends
from dify_proxy.standin.records import CALL, RECORDS, json_body
from dify_proxy.standin.scenario import Scenario
from dify_proxy.standin.wire import (
    DifyError,
    bad,
    json_response,
    not_found,
    spaced_response,
    user_of,
)

SSE_HEADERS = {hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8"}
ENDINGS = {"message_end": "completed", "error": "error_event"}  # how a call log names an end
BLOCKING_TYPE = "application/json; charset=utf-8"
routes = web.RouteTableDef()


ERROR = {"status": 400, "code": "completion_request_error", "message": "stand-in error"}


def scenario_of(request: web.Request, inputs: dict[str, Any]) -> Scenario:
    scenario = Scenario.parse(inputs.get("_standin"))
    if scenario.replay_recording is not None:
        recorded = request.app[RECORDS].recordings.get(scenario.replay_recording)
        if recorded is None:
            raise bad(f"no recording named {scenario.replay_recording!r}")
        scenario = dataclasses.replace(scenario, replay=recorded)
    return scenario


def new_run(request: web.Request, user: str, s: Scenario, **ids: Any) -> Run:
    streaming = json_body(request).get("response_mode") == "streaming"
    mode = request[apps.MODE]
    run = Run(
        mode,
        user,
        request[CALL],
        streaming and s.status is None,
        app_id=apps.app_id(request),
        workflow_id=apps.workflow_id(request),
        **ids,
    )
    run.scenario = s
    run.record["task_id"] = run.task_id
    return run


@routes.post("/v1/chat-messages")
async def chat(request: web.Request) -> web.StreamResponse:
    apps.require(request, CHATFLOW, CHAT)
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
    s = scenario_of(request, inputs)
    run = new_run(request, user, s, conversation_id=conversation_id, query=query, inputs=inputs)
    if s.status is None:
        pausing = run.mode == CHATFLOW and s.human_input > 0
        records.remember_chat(run, inputs, query, "" if pausing else s.preview(query))
    return await play(request, run, s, query)


@routes.post("/v1/completion-messages")
async def completion(request: web.Request) -> web.StreamResponse:
    """A completion app's answer: a chat without a conversation."""
    apps.require(request, COMPLETION)
    req = json_body(request)
    inputs, query = req.get("inputs"), req.get("query", "")
    if not isinstance(inputs, dict):
        raise bad("inputs is required and must be an object")
    if not isinstance(query, str):
        raise bad("query must be a string")
    user = user_of(req.get("user"))
    s = scenario_of(request, inputs)
    run = new_run(request, user, s, query=query, inputs=inputs)
    return await play(request, run, s, query)


async def play(request: web.Request, run: Run, s: Scenario, query: str) -> web.StreamResponse:
    """Answer as the scenario asks, whatever the app: an error reply, a stream or a JSON."""
    records = request.app[RECORDS]
    records.runs[run.task_id] = run
    if run.workflow_run_id is not None and s.status is None:
        records.remember_flow(run)
    try:
        await run.pause(s.header_delay)
        if s.status is not None:
            return status_reply(s)
        if run.mode == CHATFLOW and s.human_input > 0 and s.replay is None:
            return await human_input.pause(request, run, s, ChunkedBody)
        if run.streaming:
            return await stream(request, run, s, query)
        return await blocking(request, run, s, query)
    except ConnectionError:  # the client left mid-write; aiohttp drops the connection
        run.finish("client_closed")
        return web.Response()
    except asyncio.CancelledError:  # the client left while the stream was silent
        run.finish("client_closed")
        raise
    finally:
        records.runs.pop(run.task_id, None)
        if run.workflow_run_id and run.status == "running":  # the request ends, so the run
            run.settle("stopped" if run.stopped else "succeeded")


def status_reply(s: Scenario) -> web.Response:
    headers = {} if s.retry_after is None else {hdrs.RETRY_AFTER: str(s.retry_after)}
    if s.body is None:
        error = DifyError(s.status or 500, s.code, s.message).response()
        error.headers.update(headers)
        return error
    response = web.Response(status=s.status or 500, body=s.body.encode(), headers=headers)
    response.headers[hdrs.CONTENT_TYPE] = s.content_type
    return response


def default_answer(run: Run) -> str | None:
    """A workflow app echoes its `text` input unless the scenario gives the answer."""
    return str(run.inputs.get("text", "")) if run.mode == WORKFLOW else None


async def blocking(request: web.Request, run: Run, s: Scenario, query: str) -> web.Response:
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
        run.settle("failed", error=ERROR["message"])
        raise DifyError(**ERROR)
    answers, count = s.answers(query, default_answer(run))
    answer = "".join(answers)
    how = "stopped" if run.stopped else "message_end"
    ends(run, how, answer, count)  # the run's nodes, so run detail shows them
    if run.mode == WORKFLOW and run.final is not None:
        hidden = ("created_by", "exceptions_count", "files")
        data = {k: v for k, v in run.final.items() if k not in hidden}
        reply: dict[str, Any] = {"task_id": run.task_id, "workflow_run_id": run.workflow_run_id}
        reply["data"] = data
    else:
        reply = {"event": "message", "task_id": run.task_id, "id": run.message_id}
        reply["message_id"] = run.message_id
        if run.mode != COMPLETION:
            reply["conversation_id"] = run.conversation_id
        metadata = {"annotation_reply": None, "retriever_resources": []}
        metadata.update(usage=run.usage(count), reasoning={})
        reply.update(mode=run.mode, answer=answer, metadata=metadata, created_at=run.created_at)
    response = spaced_response(reply, BLOCKING_TYPE)
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
        run: Run,
        s: Scenario,
    ) -> None:
        self.transport, self.protocol = request.transport, request.protocol
        self.response, self.writer = response, writer
        self.run, self.split, self.split_delay = run, s.split, s.split_delay

    @classmethod
    async def start(cls, request: web.Request, run: Run, s: Scenario) -> ChunkedBody:
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


async def stream(request: web.Request, run: Run, s: Scenario, query: str) -> web.StreamResponse:
    body = await ChunkedBody.start(request, run, s)
    run.record["status"] = 200
    if s.replay is not None:
        return await replay(body, run, s)
    await run.pause(s.first_delay)
    if run.workflow_run_id is not None:  # Dify's opening ping, then the run starts
        await body.write(PING)
        await body.write(run.workflow_started())
    for _ in range(s.pings):
        await run.pause(s.ping_interval)
        if run.stopped:
            break
        await body.write(PING)
    answers, _ = s.answers(query, default_answer(run))
    same = run.delta(s.delta()) if s.events is not None else b""  # prebuilt
    held: list[bytes] = []
    sent, parts = 0, []
    for answer in answers:
        if sent and s.interval and not s.coalesce:
            await run.pause(s.interval)
        if run.stopped:
            break
        data = same or run.delta(answer)
        if not same:
            parts.append(answer)
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
        text = "".join(parts) if not same else s.delta() * sent
        held += ends(run, end, text, sent)
    elif end == "error":
        held.append(run.error(**ERROR))
        run.settle("failed", error=ERROR["message"])
    elif end == "drop_mid_event":
        extra = run.delta("half of an event that never ends")
        held.append(extra[: len(extra) // 2])
    for data in [b"".join(held)] if s.coalesce and held else held:
        await body.write(data)
    if end.startswith("drop"):
        return body.drop()
    response = await body.end()
    run.finish(ENDINGS.get(end, end))
    return response


async def replay(body: ChunkedBody, run: Run, s: Scenario) -> web.StreamResponse:
    """Send a recorded stream exactly as recorded, in the pieces the scenario asks for."""
    for i, data in enumerate(s.replay_writes()):
        await run.pause(s.replay_stall if i == s.replay_stall_at else s.replay_delay)
        await body.write_chunk(data)
    response = await body.end()
    run.finish("completed")
    return response


@routes.post("/v1/chat-messages/{task_id}/stop")
async def stop(request: web.Request) -> web.Response:
    """Like Dify: a stranger's stop of a running answer is a silent no-op, but a paused
    chatflow (and the run its form resumes) is stopped for whoever asks."""
    apps.require(request, CHATFLOW, CHAT)
    return stop_task(request, any_user_for_flows=True)


@routes.post("/v1/completion-messages/{task_id}/stop")
async def stop_completion(request: web.Request) -> web.Response:
    apps.require(request, COMPLETION)
    return stop_task(request, any_user_for_flows=False)


def stop_task(request: web.Request, *, any_user_for_flows: bool) -> web.Response:
    req = request[CALL]["json"]
    user = user_of(req.get("user") if isinstance(req, dict) else None)
    task_id = request[CALL]["task_id"] = request.match_info["task_id"]
    records = request.app[RECORDS]
    run = records.runs.get(task_id)
    if run is not None:
        if run.user == user:
            run.stop()
    elif any_user_for_flows and (flow := records.flow_tasks.get(task_id)) is not None:
        if flow.status in ("paused", "running"):
            flow.stop()
    return json_response({"result": "success"})
