"""`/openapi.json`: the proxy's API as an OpenAPI 3.1 document, for generating front-end clients.

Written by hand next to the routes it describes (tests/unit/test_openapi.py fails when the two
differ), and the fuzzing suite (tests/fuzz) drives the running service from it. Every limit and
choice it publishes is the constant the route checks, imported: a number typed twice drifts
(tests/unit/test_openapi_limits.py drives each route at the bounds the document gives).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from . import runs
from .api import APP_INFO, MAX_FEEDBACK_CHARS, MAX_NAME_CHARS, MAX_VOICE_CHARS, RATINGS
from .chat import MAX_MESSAGE_CHARS
from .validation import FLAGS, MAX_LIMIT, MIN_LIMIT, RESPONSE_MODES, SORT_ORDERS, VARIABLE_NAME

bp = Blueprint("openapi", __name__)

UUID = {"type": "string", "format": "uuid"}
EMPTY = {"const": ""}  # in a query, empty counts as absent
OPTIONAL_UUID = {"anyOf": [UUID, EMPTY]}
JSON_OBJECT = {"type": "object"}
ERROR_STATUSES = {
    "400": "Invalid input; nothing was sent to Dify.",
    "401": "Missing or invalid session.",
    "403": "A cookie session from a page that is not an allowed origin.",
    "404": "Not found (Dify's own 404s pass through).",
    "412": "Dify's 412: the form was already answered.",
    "408": "The request body arrived too slowly.",
    "413": "The request body is too large.",
    "415": "Wrong Content-Type.",
    "429": "A per-user limit (rate, streams, resumes, uploads, daily tokens) or Dify's own.",
    "502": "Dify failed or is unreachable.",
    "503": "Session keys cannot be fetched right now.",
    "504": "Dify did not answer in time.",
}


# gunicorn answers these itself, in HTML, before the app sees the request (gunicorn.conf.py).
GUNICORN_STATUSES = {
    "414": "The request line is over 8,190 bytes (gunicorn's own HTML answer).",
    "431": "A header is over 16 KiB, or there are over 50 (gunicorn's own HTML answer).",
}


def _errors(*statuses: str) -> dict[str, Any]:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    html = {"content": {"text/html": {}}}
    return {
        **{status: {"description": ERROR_STATUSES[status], **ref} for status in statuses},
        **{status: {"description": text, **html} for status, text in GUNICORN_STATUSES.items()},
    }


CLIENT_ERRORS = ("400", "401", "403", "404", "429")  # 404: Dify's own, passed through
UPSTREAM_ERRORS = ("502", "503", "504")
JSON_BODY_ERRORS = ("408", "413", "415")


def _json_answer(description: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {"application/json": {"schema": {}}}}}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    public: bool = False,
    errors: tuple[str, ...] = CLIENT_ERRORS + UPSTREAM_ERRORS,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **_errors(*errors)}}
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    if public:
        operation["security"] = []
    return operation


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": UUID}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _file_body() -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": ["file"],
        # Any bytes: a multipart part has no type of its own to get wrong.
        "properties": {"file": {"contentMediaType": "application/octet-stream"}},
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


NOT_BLANK = r"\S"  # blank text is refused


def _text(max_chars: int, nullable: bool = False) -> dict[str, Any]:
    """Non-blank text; `nullable` where null counts as absent."""
    schema: dict[str, Any] = {"type": "string", "pattern": NOT_BLANK, "maxLength": max_chars}
    return {"anyOf": [schema, {"type": "null"}]} if nullable else schema


MESSAGE = _text(MAX_MESSAGE_CHARS)
# Free text, as Dify takes it: empty or blank is a comment like any other.
FEEDBACK_CONTENT = {
    "anyOf": [{"type": "string", "maxLength": MAX_FEEDBACK_CHARS}, {"type": "null"}]
}
LIMIT = {"type": "integer", "minimum": MIN_LIMIT, "maximum": MAX_LIMIT}
STREAM = {
    "200": {
        "description": "Dify's answer: its SSE events (streaming), or its JSON (blocking).",
        "content": {"text/event-stream": {}, "application/json": {}},
    },
    "204": {
        "description": (
            "A reconnect (Last-Event-ID) with nothing more to resume: the whole answer was "
            "seen, or the id is unknown, expired or someone else's. Dify is never asked again."
        )
    },
}
CHAT_REQUEST = {
    "type": "object",
    "required": ["message"],
    "properties": {
        "message": MESSAGE,
        "inputs": JSON_OBJECT,
        "files": {"type": "array", "items": JSON_OBJECT},
        "conversation_id": {"anyOf": [UUID, {"enum": ["", None]}]},
        "response_mode": {"enum": list(RESPONSE_MODES)},
    },
}
APP_INFO_PATHS = {
    f"/api/{name}": {
        "get": _operation(f"Dify's /{name} for this app (cached briefly).", _json_answer(name))
    }
    for name in APP_INFO
}

# --- runs: human input, workflow and completion apps (runs.py) ------------------------------
NOT_YOURS = (
    " An id this user's answers never carried (someone else's, or unknown) gets a 404, and "
    "Dify is never asked."
)
MODE_MISMATCH = " A 400 `app_mode_mismatch` names the app's mode when it is not {}."
RUN_BODY = {
    "type": "object",
    "properties": {
        "inputs": JSON_OBJECT,
        "files": {"type": "array", "items": JSON_OBJECT},
        "response_mode": {"enum": ["streaming", "blocking"]},
    },
}
RUN_STREAM = {
    "200": {
        "description": "Dify's answer: its SSE events (streaming), or its JSON (blocking).",
        "content": {"text/event-stream": {}, "application/json": {}},
    },
    "204": STREAM["204"],
}
FORM_TOKEN = {
    "name": "form_token",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{runs.FORM_TOKEN.pattern}$"},
}
RUN_PATHS: dict[str, Any] = {
    "/api/form/human_input/{form_token}": {
        "get": _operation(
            "A human-input form (Dify's answer as is: 404 once expired, 412 "
            "`human_input_form_submitted` once answered)." + NOT_YOURS,
            _json_answer("The form: form_content, inputs, user_actions, expiration_time."),
            parameters=[FORM_TOKEN],
            errors=(*CLIENT_ERRORS, "412", *UPSTREAM_ERRORS),
        ),
        "post": _operation(
            "Answer a form as the session's user. Dify's `{}` (JSON clients), or, with "
            "`Accept: text/event-stream`, the rest of the run as SSE events with ids, recorded "
            "and resumable with Last-Event-ID like /api/chat. Dify's 400 "
            "`invalid_form_data` and 412 `human_input_form_submitted` pass through." + NOT_YOURS,
            RUN_STREAM,
            parameters=[FORM_TOKEN],
            body=_json_body(
                {
                    "type": "object",
                    "required": ["action"],
                    "properties": {
                        "inputs": JSON_OBJECT,
                        "action": {
                            "type": "string",
                            "pattern": NOT_BLANK,
                            "maxLength": runs.MAX_ACTION_CHARS,
                        },
                    },
                }
            ),
            errors=(*CLIENT_ERRORS, "412", *JSON_BODY_ERRORS, *UPSTREAM_ERRORS),
        ),
    },
    "/api/workflow/{workflow_run_id}/events": {
        "get": _operation(
            "Follow a run of this user's (after a reload, or while it waits for a form): "
            "Dify's events from where the run is, pings while it is paused; the stream ends "
            "with `workflow_finished`, or `workflow_paused` at the next form. Resumable with "
            "Last-Event-ID." + NOT_YOURS + MODE_MISMATCH.format("workflow or advanced-chat"),
            RUN_STREAM,
            parameters=[
                _path_id("workflow_run_id"),
                _query("continue_on_pause", {"enum": ["true", "false"]}),
                _query("include_state_snapshot", {"enum": ["true", "false"]}),
            ],
        )
    },
    "/api/workflows/run": {
        "post": _operation(
            "Run a workflow app (Dify's own body; `user` is the session's). Streams like "
            "/api/chat, or Dify's JSON when blocking." + MODE_MISMATCH.format("workflow"),
            RUN_STREAM,
            body=_json_body(RUN_BODY),
            errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
        )
    },
    "/api/workflows/tasks/{task_id}/stop": {
        "post": _operation(
            "Stop a workflow run." + NOT_YOURS + MODE_MISMATCH.format("workflow"),
            _json_answer("Stopped."),
            parameters=[_path_id("task_id")],
        )
    },
    "/api/workflows/run/{workflow_run_id}": {
        "get": _operation(
            "A run's status and outputs (Dify's run detail)."
            + NOT_YOURS
            + MODE_MISMATCH.format("workflow or advanced-chat"),
            _json_answer("The run."),
            parameters=[_path_id("workflow_run_id")],
        )
    },
    "/api/completion-messages": {
        "post": _operation(
            "Send to a completion app (Dify's own body; `user` is the session's). Streams like "
            "/api/chat, or Dify's JSON when blocking." + MODE_MISMATCH.format("completion"),
            RUN_STREAM,
            body=_json_body(
                {
                    **RUN_BODY,
                    "properties": {
                        **RUN_BODY["properties"],
                        "query": {"type": "string", "maxLength": MAX_MESSAGE_CHARS},
                    },
                }
            ),
            errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
        )
    },
    "/api/completion-messages/{task_id}/stop": {
        "post": _operation(
            "Stop a completion." + NOT_YOURS + MODE_MISMATCH.format("completion"),
            _json_answer("Stopped."),
            parameters=[_path_id("task_id")],
        )
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "dify-proxy",
        "version": "1",
        "description": (
            "Dify's chat API behind a Supabase session. Dify's `user` is always the session's "
            "`sub`. A session is `Authorization: Bearer <access token>`, or @supabase/ssr's "
            "session cookie from an allowed origin. Errors are JSON in Dify's shape."
        ),
    },
    "security": [{"supabaseSession": []}],
    "paths": {
        "/api/chat": {
            "post": _operation(
                "Ask a question; the answer streams back as Dify's SSE events (with ids when "
                "`Accept: text/event-stream`). A request with a `Last-Event-ID` header (an id "
                "`<stream>-<n>` the client saw) resumes that answer instead, whatever its body: "
                "the events after that id, then the rest live, with no new Dify call; or 204.",
                STREAM,
                body=_json_body(CHAT_REQUEST),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            ),
            "get": _operation(
                "The same for EventSource, which can only GET. The request line is limited to "
                "8,190 bytes (gunicorn, and Heroku's router): longer questions go by POST. "
                "`Last-Event-ID`, or a `lastEventId` query parameter, resumes as for POST.",
                STREAM,
                parameters=[
                    _query("message", MESSAGE, required=True),
                    _query("conversation_id", OPTIONAL_UUID),
                    _query("inputs", {"type": "string", "contentMediaType": "application/json"}),
                ],
            ),
        },
        "/api/chat/{task_id}/stop": {
            "post": _operation(
                "Stop an answer.", _json_answer("Stopped."), parameters=[_path_id("task_id")]
            )
        },
        "/api/usage": {
            "get": _operation(
                "The session's own usage from the ledger: today, this month (UTC), recent answers.",
                _json_answer("Answers, tokens and price (a decimal string) per period."),
                errors=("401", "403", "503"),
            )
        },
        "/api/conversations": {
            "get": _operation(
                "The user's conversations.",
                _json_answer("A page of conversations."),
                parameters=[
                    _query("last_id", OPTIONAL_UUID),
                    _query("limit", LIMIT),
                    _query("sort_by", {"enum": list(SORT_ORDERS)}),
                ],
            )
        },
        "/api/conversations/{conversation_id}": {
            "delete": _operation(
                "Delete a conversation.",
                {"204": {"description": "Deleted."}},
                parameters=[_path_id("conversation_id")],
            )
        },
        "/api/conversations/{conversation_id}/name": {
            "post": _operation(
                "Rename a conversation, or have Dify name it.",
                _json_answer("The renamed conversation."),
                parameters=[_path_id("conversation_id")],
                body=_json_body(
                    {
                        "type": "object",
                        "properties": {
                            "name": _text(MAX_NAME_CHARS, nullable=True),
                            "auto_generate": {"type": "boolean"},
                        },
                        "anyOf": [
                            {
                                "required": ["name"],
                                "properties": {"name": _text(MAX_NAME_CHARS)},
                            },
                            {
                                "required": ["auto_generate"],
                                "properties": {"auto_generate": {"const": True}},
                            },
                        ],
                    }
                ),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            )
        },
        "/api/conversations/{conversation_id}/variables": {
            "get": _operation(
                "A conversation's variables (chatflow apps).",
                _json_answer("A page of variables."),
                parameters=[
                    _path_id("conversation_id"),
                    _query("last_id", OPTIONAL_UUID),
                    _query("limit", LIMIT),
                    _query(
                        "variable_name",
                        {"anyOf": [{"type": "string", "pattern": f"^{VARIABLE_NAME}$"}, EMPTY]},
                    ),
                ],
            )
        },
        "/api/conversations/{conversation_id}/variables/{variable_id}": {
            "put": _operation(
                "Set a conversation variable's value (Dify checks its type).",
                _json_answer("The updated variable."),
                parameters=[_path_id("conversation_id"), _path_id("variable_id")],
                body=_json_body(
                    {"type": "object", "required": ["value"], "properties": {"value": {}}}
                ),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            )
        },
        "/api/messages": {
            "get": _operation(
                "A conversation's messages.",
                _json_answer("A page of messages."),
                parameters=[
                    _query("conversation_id", UUID, required=True),
                    _query("first_id", OPTIONAL_UUID),
                    _query("limit", LIMIT),
                ],
            )
        },
        "/api/messages/{message_id}/feedbacks": {
            "post": _operation(
                "Rate an answer.",
                _json_answer("Recorded."),
                parameters=[_path_id("message_id")],
                body=_json_body(
                    {
                        "type": "object",
                        "required": ["rating"],
                        "properties": {
                            "rating": {"enum": list(RATINGS)},
                            "content": FEEDBACK_CONTENT,
                        },
                    }
                ),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            )
        },
        "/api/messages/{message_id}/suggested": {
            "get": _operation(
                "Suggested follow-up questions.",
                _json_answer("Suggestions."),
                parameters=[_path_id("message_id")],
            )
        },
        "/api/files/upload": {
            "post": _operation(
                "Upload a file for a later question (its id is then this user's to preview).",
                _json_answer("The stored file.", "201"),
                body=_file_body(),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            )
        },
        "/api/files/{file_id}/preview": {
            "get": _operation(
                "A file this user uploaded, streamed as Dify serves it (its type, length and "
                "Content-Disposition). Any other file id is a 404 that never reaches Dify.",
                {"200": {"description": "The file's bytes.", "content": {"*/*": {}}}},
                parameters=[
                    _path_id("file_id"),
                    _query("as_attachment", {"anyOf": [{"enum": list(FLAGS)}, EMPTY]}),
                ],
            )
        },
        "/api/audio-to-text": {
            "post": _operation(
                "Speech to text.",
                _json_answer("The text."),
                body=_file_body(),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            )
        },
        "/api/text-to-audio": {
            "post": _operation(
                "Text (or a message's answer) to speech, streamed.",
                {"200": {"description": "Audio.", "content": {"audio/mpeg": {}}}},
                body=_json_body(
                    {
                        "type": "object",
                        "properties": {
                            "message_id": {"anyOf": [UUID, {"enum": ["", None]}]},
                            "text": _text(MAX_MESSAGE_CHARS, nullable=True),
                            "voice": _text(MAX_VOICE_CHARS, nullable=True),
                        },
                        "anyOf": [
                            {"required": ["message_id"], "properties": {"message_id": UUID}},
                            {"required": ["text"], "properties": {"text": MESSAGE}},
                        ],
                    }
                ),
                errors=CLIENT_ERRORS + JSON_BODY_ERRORS + UPSTREAM_ERRORS,
            )
        },
        **APP_INFO_PATHS,
        **RUN_PATHS,
        "/healthz": {
            "get": _operation("Liveness.", _json_answer("Serving."), public=True, errors=())
        },
        "/readyz": {
            "get": _operation(
                "Readiness: configuration and Redis.",
                _json_answer("Ready."),
                public=True,
                errors=(),
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (METRICS_TOKEN as a bearer token when set).",
                {"200": {"description": "Metrics.", "content": {"text/plain": {}}}},
                public=True,
                errors=("401",),
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This document.", _json_answer("OpenAPI 3.1."), public=True, errors=()
            )
        },
    },
    "components": {
        "securitySchemes": {
            "supabaseSession": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "A Supabase user access token.",
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["code", "message", "status"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "status": {"type": "integer"},
                },
            }
        },
    },
}


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(DOCUMENT)
