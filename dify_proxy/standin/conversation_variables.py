"""A chatflow conversation's variables: `GET /v1/conversations/{id}/variables?user=` and
`PUT /v1/conversations/{id}/variables/{variable_id}` with `{value, user}`, scoped to the
conversation's user as Dify scopes them (another user's conversation is a 404).

Not captured from real Dify (the captured apps have no conversation variables), so built from
Dify's documented shapes: every chatflow conversation has two, `topic` (string) and `turns`
(number); a chat app's conversations have none.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from dify_proxy.standin import apps
from dify_proxy.standin.apps import CHAT, CHATFLOW
from dify_proxy.standin.records import RECORDS, Records, json_body
from dify_proxy.standin.wire import DifyError, bad, json_response, user_of

DEFAULTS = (("topic", "string", "", "What the conversation is about"), ("turns", "number", 0, ""))
TYPES = {"string": (str,), "number": (int, float)}
routes = web.RouteTableDef()


def variables_of(request: web.Request, conversation_id: str, user: str) -> list[dict[str, Any]]:
    records: Records = request.app[RECORDS]
    conversation = records.conversation(conversation_id, user)
    if conversation_id not in records.variables:
        now = conversation["created_at"]
        records.variables[conversation_id] = [
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{conversation_id}/{name}")),
                "name": name,
                "value_type": kind,
                "value": value,
                "description": description,
                "created_at": now,
                "updated_at": now,
            }
            for name, kind, value, description in (
                DEFAULTS if request[apps.MODE] == CHATFLOW else ()
            )
        ]
    return records.variables[conversation_id]


@routes.get("/v1/conversations/{conversation_id}/variables")
async def list_variables(request: web.Request) -> web.Response:
    apps.require(request, CHATFLOW, CHAT)
    user = user_of(request.query.get("user"))
    raw = request.query.get("limit") or "20"
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad("limit must be an integer from 1 to 100")
    limit = int(raw)
    found = variables_of(request, request.match_info["conversation_id"], user)
    if last_id := request.query.get("last_id"):
        ids = [v["id"] for v in found]
        found = found[ids.index(last_id) + 1 :] if last_id in ids else []
    return json_response({"limit": limit, "has_more": len(found) > limit, "data": found[:limit]})


@routes.put("/v1/conversations/{conversation_id}/variables/{variable_id}")
async def update_variable(request: web.Request) -> web.Response:
    apps.require(request, CHATFLOW, CHAT)
    req = json_body(request)
    user = user_of(req.get("user"))
    found = variables_of(request, request.match_info["conversation_id"], user)
    variable = next((v for v in found if v["id"] == request.match_info["variable_id"]), None)
    if variable is None:
        raise DifyError(404, "not_found", "Conversation Variable Not Exists.")
    if "value" not in req:
        raise bad("value is required")
    value = req["value"]
    if isinstance(value, bool) or not isinstance(value, TYPES[variable["value_type"]]):
        message = (
            f"Type mismatch: variable '{variable['name']}' expects {variable['value_type']}, "
            f"but got {type(value).__name__} type"
        )
        raise DifyError(400, "bad_request", message)
    variable.update(value=value, updated_at=int(time.time()))
    return json_response(variable)
