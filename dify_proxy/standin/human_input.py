"""A chatflow that pauses for a person (Dify 1.13 and later), as Dify 1.16.1 answers it in the
project's captures: the stream stops at the Human Input node (`human_input_required`, then
`workflow_paused`, and the body ends with no `message_end`); `GET /v1/form/human_input/{token}`
shows the form and `POST` answers it; the answer resumes the run, which `GET
/v1/workflow/{id}/events` (workflow.py) follows.

A request asks for it with `inputs._standin.human_input` = n (n Human Input nodes, `review`,
`review_2`, ...): each answered form resumes the run up to the next pause, and after the last
the Answer node says `Approved: <comment>` (or `Rejected: ...`), unless the scenario's `text` or
`events` give the answer. Dify checks no end user on the form calls, and neither does this: a
form token is all it takes, with the app's key (another app's key gets Dify's 404).
"""

from __future__ import annotations

import asyncio
import secrets
import string
import time
from typing import Any

from aiohttp import web

from dify_proxy.standin import apps
from dify_proxy.standin.chunks import ChunkedBody
from dify_proxy.standin.events import ACTIONS, FORM_INPUTS, FORM_LIFETIME, PING, Node, Run
from dify_proxy.standin.records import CALL, RECORDS, Records, json_body
from dify_proxy.standin.scenario import Scenario
from dify_proxy.standin.wire import DifyError, bad, json_response, required_user, spaced_response

TOKEN_ALPHABET = string.ascii_letters + string.digits
routes = web.RouteTableDef()


class Form:
    """One Human Input node's form, and its answer once given."""

    def __init__(self, run: Run, index: int) -> None:
        self.run, self.index = run, index
        suffix = "" if index == 0 else f"_{index + 1}"
        title = "Review" if index == 0 else f"Review {index + 1}"
        self.node = Node(f"review{suffix}", "human-input", title)
        self.token = "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(22))
        self.content = f"Review the question: {run.query}\n\n{{{{#$output.comment#}}}}"
        self.expiration_time = int(time.time()) + FORM_LIFETIME
        self.answer: dict[str, Any] | None = None  # action, inputs, user

    def reason(self) -> dict[str, Any]:
        """The form as `workflow_paused` lists it."""
        return {
            "TYPE": "human_input_required",
            "form_id": self.node.id,
            "form_content": self.content,
            "inputs": FORM_INPUTS,
            "actions": ACTIONS,
            "node_id": self.node.node_id,
            "node_title": self.node.title,
            "resolved_default_values": {},
            "form_token": self.token,
            "approval_channels": ["console"],
            "expiration_time": self.expiration_time,
        }

    def required(self) -> dict[str, Any]:
        """The form as `human_input_required` shows it."""
        return {
            "form_id": self.node.id,
            "node_id": self.node.node_id,
            "node_title": self.node.title,
            "form_content": self.content,
            "inputs": FORM_INPUTS,
            "actions": ACTIONS,
            "display_in_ui": True,
            "form_token": self.token,
            "approval_channels": ["console"],
            "resolved_default_values": {},
            "expiration_time": self.expiration_time,
        }

    def shown(self) -> dict[str, Any]:
        """The form as `GET /form/human_input/{token}` shows it."""
        return {
            "form_content": self.content,
            "inputs": FORM_INPUTS,
            "resolved_default_values": {},
            "user_actions": ACTIONS,
            "expiration_time": self.expiration_time,
        }


def paused_at(run: Run, form: Form) -> list[bytes]:
    """The events that stop a run at a form; the run is paused once they are written."""
    data = {
        "workflow_run_id": run.workflow_run_id,
        "paused_nodes": [form.node.node_id],
        "outputs": {},
        "reasons": [form.reason()],
        "status": "paused",
        "created_at": run.created_at,
        "elapsed_time": round(time.time() - run.started, 6),
        "total_tokens": 0,
        "total_steps": run.steps + 1,
    }
    events = [
        run.node_started(form.node),
        run.flow_event("human_input_required", form.required()),
        run.flow_event("workflow_paused", data),
    ]
    run.status = "paused"
    run.notify()
    return events


def start_forms(records: Records, run: Run, count: int) -> None:
    run.forms = [Form(run, i) for i in range(count)]
    for form in run.forms:
        records.keep(records.forms, form.token, form)


async def pause(request: web.Request, run: Run, s: Scenario) -> web.StreamResponse:
    """The first part of a pausing chatflow: up to the first form (streaming or blocking)."""
    records = request.app[RECORDS]
    start_forms(records, run, s.human_input)
    start = Node("start", "start", "Start")
    message = records.messages.get(run.message_id)
    if message is not None:
        message["status"] = "paused"
    if not run.streaming:
        run.node_started(start)  # counted in the run's steps, as Dify counts it
        paused_at(run, run.forms[0])
        run.record["status"] = 200
        run.finish("paused")
        return spaced_response(blocking_paused(run), "application/json; charset=utf-8")
    body = await ChunkedBody.start(request, run, s)
    run.record["status"] = 200
    await run.pause(s.first_delay)
    await body.write(PING)
    for data in [
        run.workflow_started(),
        run.node_started(start),
        run.node_finished(start, {}, {}),
        *paused_at(run, run.forms[0]),
    ]:
        await body.write(data)
    response = await body.end()
    run.finish("paused")
    return response


def blocking_paused(run: Run) -> dict[str, Any]:
    """Blocking mode on a paused chatflow: Dify answers 200 with the pause."""
    metadata = {"annotation_reply": None, "retriever_resources": [], "usage": None, "reasoning": {}}
    ids = {"id": run.message_id, "message_id": run.message_id}
    message = {
        "conversation_id": run.conversation_id,
        "mode": run.mode,
        "answer": "",
        "metadata": metadata,
        "created_at": run.created_at,
    }
    data = {"id": run.message_id, "mode": run.mode, "conversation_id": run.conversation_id}
    data.update(message_id=run.message_id, workflow_run_id=run.workflow_run_id, answer="")
    data.update(metadata=metadata, created_at=run.created_at)
    data.update(
        paused_nodes=[run.forms[run.at].node.node_id],
        reasons=[run.forms[run.at].reason()],
        status="paused",
        elapsed_time=round(time.time() - run.started, 6),
        total_tokens=0,
        total_steps=run.steps,
    )
    head = {"event": "workflow_paused", "task_id": run.task_id, **ids}
    return {**head, **message, "workflow_run_id": run.workflow_run_id, "data": data}


def the_form(request: web.Request) -> Form:
    token = request.match_info["form_token"]
    form = request.app[RECORDS].forms.get(token)
    if form is None or form.run.mode != request[apps.MODE]:
        message = (
            f"Form not found. You have requested this URI [{request.path}] but did you mean "
            "/v1/form/human_input/<string:form_token> ?"
        )
        raise DifyError(404, "not_found", message, escape_slashes=True)
    if form.answer is not None:
        message = f"This form has already been submitted by another user, form_id={form.node.id}"
        raise DifyError(412, "human_input_form_submitted", message)
    return form


@routes.get("/v1/form/human_input/{form_token}")
async def show_form(request: web.Request) -> web.Response:
    return spaced_response(the_form(request).shown())


@routes.post("/v1/form/human_input/{form_token}")
async def answer_form(request: web.Request) -> web.Response:
    """Dify takes `user` but compares it with no one: any holder of the token answers."""
    req = json_body(request)
    user = required_user(req.get("user"))
    form = the_form(request)
    request[CALL]["task_id"] = form.run.task_id
    action, inputs = req.get("action"), req.get("inputs")
    if inputs is None:
        inputs = {}
    if not isinstance(inputs, dict):
        raise bad("inputs must be an object")
    if action not in [a["id"] for a in ACTIONS]:
        raise DifyError(400, "invalid_form_data", f"Invalid action: {action}")
    missing = [i["output_variable_name"] for i in FORM_INPUTS]
    missing = [name for name in missing if name not in inputs]
    if missing:
        raise DifyError(400, "invalid_form_data", f"Missing required inputs: {', '.join(missing)}")
    form.answer = {"action": action, "inputs": inputs, "user": user}
    records = request.app[RECORDS]
    task = asyncio.get_running_loop().create_task(resume(records, form.run, form))
    records.background.add(task)
    task.add_done_callback(records.background.discard)
    if form.run.scenario.form_reply_delay:
        await asyncio.sleep(form.run.scenario.form_reply_delay)
    return json_response({})


async def resume(records: Records, run: Run, form: Form) -> None:
    """The run after a form is answered, as one more segment of events its followers read:
    up to the next form, or to the end (aborted if a stop came while it was paused)."""
    s: Scenario = run.scenario
    segment: list[bytes] = []
    run.segments.append(segment)
    run.segment_done, run.status = False, "running"
    run.waiter = None

    def emit(data: bytes) -> None:
        segment.append(data)
        run.notify()

    assert form.answer is not None
    action = next(a for a in ACTIONS if a["id"] == form.answer["action"])
    comment = str(form.answer["inputs"].get("comment", ""))
    last = form.index == len(run.forms) - 1
    emit(run.workflow_started("resumption"))
    emit(run.node_started(form.node))
    parts: list[str] = []
    sent = 0
    stopped_while_paused = run.stopped  # Dify still streams the answer's start, then aborts
    if last:
        if s.text is not None or s.events is not None:
            answers, _ = s.answers(run.query)
            deltas = [(answer, None) for answer in answers]
        else:
            prefix = {"approve": "Approved: ", "reject": "Rejected: "}[action["id"]]
            deltas = [(prefix, [f"answer_{action['id']}", "answer"])]
            deltas.append((comment, ["review", "comment"]))
        for answer, selector in deltas:
            if sent and s.interval:
                await run.pause(s.interval)
            if run.stopped and not stopped_while_paused:
                break
            emit(run.delta(answer, selector))
            parts.append(answer)
            sent += 1
    outputs = {
        "comment": comment,
        "__action_id": action["id"],
        "__action_value": action["title"],
        "__rendered_content": form.content.replace("{{#$output.comment#}}", comment),
    }
    value = {"comment": {"value_type": "string", "value": comment}}
    emit(run.node_finished(form.node, value, outputs))
    if run.stopped:
        emit(run.flow_event("workflow_finished", run.settle("stopped")))
    elif not last:
        run.at = form.index + 1
        for data in paused_at(run, run.forms[run.at]):
            emit(data)
    else:
        answer = "".join(parts)
        reply = Node(f"answer_{action['id']}", "answer", f"Answer {action['id']}")
        final = {"answer": answer, "files": []}
        emit(run.node_started(reply))
        emit(run.node_finished(reply, {}, final))
        emit(run.message_end(sent))
        tokens = run.usage(sent)["total_tokens"]
        emit(run.flow_event("workflow_finished", run.settle("succeeded", final, tokens=tokens)))
        message = records.messages.get(run.message_id)
        if message is not None:
            message.update(answer=answer, status="normal")
    run.segment_done = True
    run.notify()
