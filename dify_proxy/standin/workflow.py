"""A workflow app's routes, and the routes every workflow run answers (a chatflow's too), as
Dify 1.16.1 answers them in the project's captures:

- `POST /v1/workflows/run` (streaming: `ping`, `workflow_started`, `text_chunk`, node events,
  `workflow_finished`; blocking: `{task_id, workflow_run_id, data}`); its `text` input is
  required, and the answer echoes it unless the scenario (`inputs._standin`) says otherwise;
- `POST /v1/workflows/tasks/{task_id}/stop`: `user` required, never compared: anyone stops;
- `GET /v1/workflows/run/{workflow_run_id}`: run detail, for anyone holding the id;
- `GET /v1/workflow/{workflow_run_id}/events?user=`: the run's own user only (another user or
  a task id: 404; no user: 400): pings while it waits for a form, then the resumed run; one
  `workflow_finished` for a run that has ended. `continue_on_pause=true` keeps following
  across the next pause.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import hdrs, web

from dify_proxy.standin import apps, chat
from dify_proxy.standin.apps import CHATFLOW, WORKFLOW
from dify_proxy.standin.events import PING, Run, detail
from dify_proxy.standin.records import CALL, RECORDS, json_body
from dify_proxy.standin.wire import DifyError, bad, json_response, required_user, spaced, user_of

ENDED = ("succeeded", "stopped", "failed")
EVENTS_HEADERS = {
    hdrs.CACHE_CONTROL: "no-cache",
    hdrs.CONNECTION: "keep-alive",
    hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
}
routes = web.RouteTableDef()


@routes.post("/v1/workflows/run")
async def run_workflow(request: web.Request) -> web.StreamResponse:
    apps.require(request, WORKFLOW)
    req = json_body(request)
    inputs = req.get("inputs")
    if not isinstance(inputs, dict):
        raise bad("inputs is required and must be an object")
    user = user_of(req.get("user"))
    if not isinstance(inputs.get("text"), str) or not inputs["text"]:
        raise bad("text is required in input form")
    s = chat.scenario_of(request, inputs)
    run = chat.new_run(request, user, s, inputs=inputs)
    return await chat.play(request, run, s, inputs["text"])


@routes.post("/v1/workflows/tasks/{task_id}/stop")
async def stop_workflow(request: web.Request) -> web.Response:
    apps.require(request, WORKFLOW)
    req = request[CALL]["json"]
    required_user(req.get("user") if isinstance(req, dict) else None)
    task_id = request[CALL]["task_id"] = request.match_info["task_id"]
    run = request.app[RECORDS].runs.get(task_id)
    if run is not None:
        run.stop()
    return json_response({"result": "success"})


def flow_run(request: web.Request) -> Run | None:
    run = request.app[RECORDS].flows.get(request.match_info["workflow_run_id"])
    return run if run is not None and run.mode == request[apps.MODE] else None


@routes.get("/v1/workflows/run/{workflow_run_id}")
async def run_detail(request: web.Request) -> web.Response:
    apps.require(request, WORKFLOW, CHATFLOW)
    run = flow_run(request)
    if run is None:
        raise DifyError(404, "not_found", "Workflow run not found.")
    return json_response(detail(run))


@routes.get("/v1/workflow/{workflow_run_id}/events")
async def follow(request: web.Request) -> web.StreamResponse:
    apps.require(request, WORKFLOW, CHATFLOW)
    user = required_user(request.query.get("user"))
    run = flow_run(request)
    if run is None or run.user != user:
        raise DifyError(404, "not_found", "Workflow run not found")
    call = request[CALL]
    call["task_id"] = run.task_id
    response = web.StreamResponse(headers=EVENTS_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    call["status"] = 200
    try:
        how = await follow_run(response, run, request.query.get("continue_on_pause") == "true")
    except (ConnectionError, RuntimeError):
        call["stream_end"], call["ended_at"] = "client_closed", time.time()
        return response
    except BaseException:
        call["stream_end"], call["ended_at"] = "client_closed", time.time()
        raise
    await response.write_eof()
    call["stream_end"], call["ended_at"] = how, time.time()
    return response


async def follow_run(response: web.StreamResponse, run: Run, continue_on_pause: bool) -> str:
    """Write the run's events, one chunk each, until it ends or (unless asked to continue)
    pauses again; how it ended, for the call log."""
    if run.status in ENDED and run.final is not None:
        await response.write(finished(run))
        return "completed"
    resuming = run.status == "running" and run.segments and not run.segment_done
    at = len(run.segments) - 1 if resuming else len(run.segments)
    interval = run.scenario.wait_ping_interval if run.scenario is not None else 10.0
    await response.write(PING)
    while True:
        while at >= len(run.segments):
            if run.status in ENDED and run.final is not None:
                await response.write(finished(run))
                return "completed"
            if not await run.changes(interval or None):
                await response.write(PING)
        segment, sent = run.segments[at], 0
        while True:
            for data in segment[sent:]:
                await response.write(data)
            sent = len(segment)
            if at < len(run.segments) - 1 or run.segment_done:
                if sent == len(segment):
                    break
                continue
            await run.changes(None)
        at += 1
        if run.status != "paused":
            return "completed"
        if not continue_on_pause:
            return "paused"


def finished(run: Run) -> bytes:
    """An ended run's one event: Python-spaced JSON, its task id the run id (as Dify sends)."""
    event: dict[str, Any] = {"event": "workflow_finished", "task_id": run.workflow_run_id}
    event.update(workflow_run_id=run.workflow_run_id, data=run.final)
    return b"data: " + spaced(event) + b"\n\n"
