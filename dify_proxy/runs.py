"""Runs beyond a chat answer: human-input forms, following a paused run, and Dify's workflow
and completion apps, each under `/api/` at Dify's own path.

Dify checks no end user on the form calls, run detail or workflow stop (see
../shared/dify-protocol.md, "Human input"), so every route that names a task id, run id or form
token first checks that the id was handed to this user (owners.py): anyone else gets the 404
an unknown id gets, and Dify is never asked. Answers stream through the same machinery as
`/api/chat` (chat.run_answer): limits, heartbeats, grace, stop-on-disconnect, recording and
resumes with Last-Event-ID.

A route for another kind of app than the one behind DIFY_API_KEY gets a 400
`app_mode_mismatch` naming the app's mode (modes.py).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import requests
from flask import Blueprint, Response, current_app, g, request

from .api import json_answer
from .auth import require_session
from .chat import (
    MAX_MESSAGE_CHARS,
    is_reconnect,
    last_event_id,
    resume,
    run_answer,
    wants_ids,
)
from .dify import Dify
from .limits import per_user
from .modes import WORKFLOW_MODES, require_mode, stop_app
from .owners import require_owner
from .validation import answer_body, bad_request, read_json_object, refuse_head, validate_uuid

bp = Blueprint("runs", __name__, url_prefix="/api")
bp.before_request(refuse_head)

# Dify's form tokens are 22 letters and digits; anything that could leave the path segment is
# refused before a path is built from it.
FORM_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ACTION_CHARS = 200


def dify() -> Dify:
    return current_app.extensions["dify_proxy.dify"]


# --- request bodies ---------------------------------------------------------------------------


def run_payload(body: dict[str, Any], query: bool = False) -> dict[str, Any]:
    """Dify's own body for a workflow run or a completion (`inputs`, `response_mode`, `files`,
    and with `query` a completion's optional `query`); `user` is always the session's.
    Anything else in the body is not sent."""
    payload = answer_body(body, g.user_id)
    if query and body.get("query") is not None:
        text = body["query"]
        if not isinstance(text, str):
            raise bad_request("query must be a string.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise bad_request(f"query must be at most {MAX_MESSAGE_CHARS} characters.")
        payload["query"] = text
    return payload


def valid_form_token(value: str) -> str:
    if not FORM_TOKEN.fullmatch(value):
        raise bad_request("form_token must be the form_token of a human_input_required event.")
    return value


def form_answer(body: dict[str, Any]) -> dict[str, Any]:
    """A form submission for Dify: the person's `inputs` and `action`, as the session's user.
    Whether the action and inputs fit the form is Dify's to say (400 `invalid_form_data`)."""
    inputs = body.get("inputs", {})
    if not isinstance(inputs, dict):
        raise bad_request("inputs must be a JSON object.")
    action = body.get("action")
    if not isinstance(action, str) or not action.strip():
        raise bad_request("action is required: the id of one of the form's user_actions.")
    if len(action) > MAX_ACTION_CHARS:
        raise bad_request(f"action must be at most {MAX_ACTION_CHARS} characters.")
    return {"inputs": inputs, "action": action, "user": g.user_id}


def bool_param(name: str) -> str | None:
    value = request.args.get(name)
    if value in (None, ""):
        return None
    if value.lower() not in ("true", "false"):
        raise bad_request(f"{name} must be true or false.")
    return value.lower()


# --- human input ------------------------------------------------------------------------------


@bp.get("/form/human_input/<form_token>")
@require_session
def get_form(form_token: str) -> Response:
    token = valid_form_token(form_token)
    require_owner("form", token)
    require_mode(*WORKFLOW_MODES)
    return json_answer(dify().call("GET", f"/form/human_input/{token}"))


@bp.post("/form/human_input/<form_token>")
@require_session
@per_user(exempt_when=is_reconnect)
def submit_form(form_token: str) -> Response:
    """Answer a form. A client that reads SSE (`Accept: text/event-stream`) gets the rest of
    the run back on the same request; any other gets Dify's `{}`."""
    if is_reconnect():
        return resume(last_event_id())
    token = valid_form_token(form_token)
    binding = require_owner("form", token)
    body = read_json_object()
    answer = form_answer(body)
    mode = require_mode(*WORKFLOW_MODES)
    if not wants_ids() or not binding.extra:
        return json_answer(dify().call("POST", f"/form/human_input/{token}", json=answer))
    run_id = binding.extra
    return run_answer(
        functools.partial(_submit_and_follow, token, answer, run_id),
        streaming=True,
        app=stop_app(mode),
    )


def _submit_and_follow(
    token: str, answer: dict[str, Any], run_id: str, stream: bool
) -> requests.Response:
    """Follow the run first, then answer the form: the run resumes the moment the form is
    answered, and a stream opened after that could find it finished (Dify then sends only its
    `workflow_finished`, not the answer). If Dify refuses the form, its error is the answer."""
    events = dify().call(
        "GET", f"/workflow/{run_id}/events", params={"user": g.user_id}, stream=stream
    )
    try:
        dify().call("POST", f"/form/human_input/{token}", json=answer).close()
    except BaseException:
        events.close()
        raise
    return events


@bp.get("/workflow/<workflow_run_id>/events")
@require_session
@per_user(exempt_when=is_reconnect)
def run_events(workflow_run_id: str) -> Response:
    """Follow a run (after a reload, or a form answered elsewhere): Dify's events from where the
    run is, pings while it waits for a person. With Last-Event-ID, resumes this stream."""
    if is_reconnect():
        return resume(last_event_id())
    run_id = validate_uuid(workflow_run_id, "workflow_run_id")
    params = {"user": g.user_id}
    for name in ("continue_on_pause", "include_state_snapshot"):
        value = bool_param(name)
        if value is not None:
            params[name] = value
    require_owner("run", run_id)
    mode = require_mode(*WORKFLOW_MODES)
    return run_answer(
        lambda stream: dify().call(
            "GET", f"/workflow/{run_id}/events", params=params, stream=stream
        ),
        streaming=True,
        app=stop_app(mode),
        budget=False,  # the run is paid for already; refusing to show it saves nothing
        follow_run=True,
    )


# --- workflow apps ----------------------------------------------------------------------------


@bp.post("/workflows/run")
@require_session
@per_user(exempt_when=is_reconnect)
def run_workflow() -> Response:
    if is_reconnect():
        return resume(last_event_id())
    payload = run_payload(read_json_object())
    require_mode("workflow")
    return run_answer(
        lambda stream: dify().call("POST", "/workflows/run", json=payload, stream=stream),
        streaming=payload["response_mode"] == "streaming",
        app="workflow",
    )


@bp.post("/workflows/tasks/<task_id>/stop")
@require_session
def stop_workflow(task_id: str) -> Response:
    task_id = validate_uuid(task_id, "task_id")
    require_owner("task", task_id)
    require_mode("workflow")
    return json_answer(
        dify().call("POST", f"/workflows/tasks/{task_id}/stop", json={"user": g.user_id})
    )


@bp.get("/workflows/run/<workflow_run_id>")
@require_session
def run_detail(workflow_run_id: str) -> Response:
    run_id = validate_uuid(workflow_run_id, "workflow_run_id")
    require_owner("run", run_id)
    require_mode(*WORKFLOW_MODES)
    return json_answer(dify().call("GET", f"/workflows/run/{run_id}"))


# --- completion apps --------------------------------------------------------------------------


@bp.post("/completion-messages")
@require_session
@per_user(exempt_when=is_reconnect)
def completion() -> Response:
    if is_reconnect():
        return resume(last_event_id())
    payload = run_payload(read_json_object(), query=True)
    require_mode("completion")
    return run_answer(
        lambda stream: dify().call("POST", "/completion-messages", json=payload, stream=stream),
        streaming=payload["response_mode"] == "streaming",
        app="completion",
    )


@bp.post("/completion-messages/<task_id>/stop")
@require_session
def stop_completion(task_id: str) -> Response:
    task_id = validate_uuid(task_id, "task_id")
    require_owner("task", task_id)
    require_mode("completion")
    return json_answer(
        dify().call("POST", f"/completion-messages/{task_id}/stop", json={"user": g.user_id})
    )
