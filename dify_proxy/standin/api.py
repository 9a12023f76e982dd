"""The rest of a chat app's Dify API: conversations and their variables, messages, feedback,
suggestions, file and audio uploads, file preview, text-to-audio, and parameters/meta/info/site,
answered from `Records` as Dify answers them. Uploads are read as they arrive (`read_upload`):
fields kept, files counted and only their first KEEP_FILE_BYTES kept (for preview), so a 1 GB
upload costs what a 1 MB one does."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, hdrs, web

from dify_proxy.standin.records import CALL, RECORDS, json_body, public
from dify_proxy.standin.wire import DifyError, bad, json_response, not_found, user_of

MAX_FILE = 64 * 1024 * 1024  # Dify's own limits are configurable; these are generous
MAX_AUDIO = 30 * 1024 * 1024
MAX_FIELD = 64 * 1024  # a non-file multipart field
KEEP_FILE_BYTES = 1024 * 1024  # a larger upload's preview is a 404 (its bytes were not kept)
PREVIEW_PIECE = 64 * 1024
STREAMED_MEDIA = ("audio/", "video/")  # Dify announces Accept-Ranges for these
HTML_TYPES = ("text/html", "application/xhtml+xml")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
BLOCKED_EXTENSIONS = ("bat", "exe", "sh")
SORT_ORDERS = ("created_at", "-created_at", "updated_at", "-updated_at")
FAKE_AUDIO = (b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xf3\x44\xc4" * 512, b"\xff\xf3" * 256)
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
    "site": {  # the keys real Dify 1.16.1 sends (../shared/dify-captures/capture-site.txt)
        "title": "Dify stand-in",
        "chat_color_theme": None,
        "chat_color_theme_inverted": False,
        "icon_type": "emoji",
        "icon": "\U0001f916",
        "icon_background": "#FFEAD5",
        "description": None,
        "copyright": None,
        "privacy_policy": None,
        "input_placeholder": None,
        "custom_disclaimer": "",
        "default_language": "en-US",
        "show_workflow_steps": True,
        "use_icon_as_answer_icon": False,
        "icon_url": None,
    },
}
UPLOAD_PATHS = ("/v1/files/upload", "/v1/audio-to-text")
UPLOAD_ERROR = web.RequestKey("upload_error", DifyError)
FILE_CONTENT = web.RequestKey("file_content", list)  # each file's bytes, or None if too large
routes = web.RouteTableDef()


async def read_upload(request: web.Request, call: dict[str, Any]) -> None:
    """Read an upload's body to its end as it arrives, into the call log: its fields (`user`
    among them) and each file's name, type and size. What is wrong with it is answered later,
    after the key check, as Dify does."""
    call["form"], call["files"] = {}, []
    request[FILE_CONTENT] = []
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):  # a nested multipart: not Dify's
                await part.release()
                continue
            size, value = 0, bytearray()
            limit = MAX_FIELD if part.filename is None else KEEP_FILE_BYTES
            while chunk := await part.read_chunk(65536):
                size += len(chunk)
                if size <= limit:
                    value += chunk
                elif part.filename is None:
                    raise DifyError(413, "request_entity_too_large", "field too large")
            if part.name is not None and part.filename is None:
                call["form"][part.name] = value.decode("utf-8", "replace")
            elif part.name is not None:
                kind = part.headers.get(hdrs.CONTENT_TYPE, "")
                file = {"field": part.name, "filename": part.filename, "content_type": kind}
                call["files"].append({**file, "size": size})
                request[FILE_CONTENT].append(bytes(value) if size <= limit else None)
    except DifyError as e:
        request[UPLOAD_ERROR] = e
    except (ValueError, AssertionError, KeyError):  # aiohttp's ways of saying "malformed"
        multipart = request.content_type == "multipart/form-data"
        if multipart and "boundary=" in request.headers.get(hdrs.CONTENT_TYPE, ""):
            request[UPLOAD_ERROR] = bad("the multipart body is incomplete")
        else:
            message = "Send multipart/form-data."
            request[UPLOAD_ERROR] = DifyError(415, "unsupported_media_type", message)


def the_file(request: web.Request, missing: DifyError) -> tuple[str, dict[str, Any]]:
    """The uploading user and the one `file` part, checked as Dify checks them."""
    if UPLOAD_ERROR in request:
        raise request[UPLOAD_ERROR]
    call = request[CALL]
    user = user_of(call["form"].get("user"))
    files = [f for f in call["files"] if f["field"] == "file"]
    if not files:
        raise missing
    if len(call["files"]) > 1:
        raise DifyError(400, "too_many_files", "Only one file is allowed.")
    if not files[0]["filename"]:
        raise DifyError(400, "filename_not_exists_error", "The specified filename does not exist.")
    return user, files[0]


def query_limit(request: web.Request) -> int:
    raw = request.query.get("limit") or "20"
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad("limit must be an integer from 1 to 100")
    return int(raw)


@routes.get("/v1/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    user, limit = user_of(request.query.get("user")), query_limit(request)
    sort_by = request.query.get("sort_by") or "-updated_at"
    if sort_by not in SORT_ORDERS:
        raise bad(f"sort_by must be one of {', '.join(SORT_ORDERS)}")
    key = "_created" if sort_by.endswith("created_at") else "_updated"
    mine = sorted(
        (c for c in request.app[RECORDS].conversations.values() if c["_user"] == user),
        key=lambda c: c[key],
        reverse=sort_by.startswith("-"),
    )
    if last_id := request.query.get("last_id"):
        ids = [c["id"] for c in mine]
        if last_id not in ids:
            raise not_found("Last Conversation")
        mine = mine[ids.index(last_id) + 1 :]
    page = [public(c) for c in mine[:limit]]
    return json_response({"limit": limit, "has_more": len(mine) > limit, "data": page})


@routes.post("/v1/conversations/{conversation_id}/name")
async def rename_conversation(request: web.Request) -> web.Response:
    records, req = request.app[RECORDS], json_body(request)
    conversation = records.conversation(
        request.match_info["conversation_id"], user_of(req.get("user"))
    )
    if req.get("auto_generate") is True:
        conversation["name"] = "Stand-in generated name"
    else:
        name = req.get("name")
        if not isinstance(name, str) or not name.strip():
            raise bad("name is required unless auto_generate is true")
        conversation["name"] = name
    records.touch(conversation)
    return json_response(public(conversation))


@routes.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(request: web.Request) -> web.Response:
    records, conversation_id = request.app[RECORDS], request.match_info["conversation_id"]
    records.conversation(conversation_id, user_of(json_body(request).get("user")))
    records.forget_conversation(conversation_id)
    return web.Response(status=204)


@routes.get("/v1/messages")
async def list_messages(request: web.Request) -> web.Response:
    user, limit = user_of(request.query.get("user")), query_limit(request)
    records, conversation_id = request.app[RECORDS], request.query.get("conversation_id")
    if not conversation_id:
        raise bad("conversation_id is required")
    records.conversation(conversation_id, user)
    history = [m for m in records.messages.values() if m["conversation_id"] == conversation_id]
    if first_id := request.query.get("first_id"):
        ids = [m["id"] for m in history]
        if first_id not in ids:
            raise not_found("First Message")
        history = history[: ids.index(first_id)]
    page = [public(m) for m in history[-limit:]]
    return json_response({"limit": limit, "has_more": len(history) > limit, "data": page})


@routes.post("/v1/messages/{message_id}/feedbacks")
async def feedback(request: web.Request) -> web.Response:
    req = json_body(request)
    message = request.app[RECORDS].message(
        request.match_info["message_id"], user_of(req.get("user"))
    )
    rating = req.get("rating")
    if rating not in ("like", "dislike", None):
        raise bad("rating must be like, dislike or null")
    message["feedback"] = None if rating is None else {"rating": rating}
    return json_response({"result": "success"})


@routes.get("/v1/messages/{message_id}/suggested")
async def suggested(request: web.Request) -> web.Response:
    user = user_of(request.query.get("user"))
    topic = request.app[RECORDS].message(request.match_info["message_id"], user)["query"][:30]
    questions = [f"Tell me more about {topic}?", "Can you give an example?", "What else?"]
    return json_response({"result": "success", "data": questions})


@routes.post("/v1/files/upload")
async def upload_file(request: web.Request) -> web.Response:
    missing = DifyError(400, "no_file_uploaded", "Please upload your file.")
    user, file = the_file(request, missing)
    name = file["filename"]
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    if extension in BLOCKED_EXTENSIONS:
        raise DifyError(415, "unsupported_file_type", "File type not allowed.")
    if file["size"] > MAX_FILE:
        raise DifyError(413, "file_too_large", "File size exceeded.")
    answer = {
        "id": str(uuid.uuid4()),
        "name": name,
        "size": file["size"],
        "extension": extension,
        "mime_type": file["content_type"],
        "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
        "created_at": int(time.time()),
    }
    content = request[FILE_CONTENT][request[CALL]["files"].index(file)]
    request.app[RECORDS].keep_file({**answer, "_content": content})
    return json_response(answer, 201)


@routes.get("/v1/files/{file_id}/preview")
async def preview_file(request: web.Request) -> web.StreamResponse:
    """As Dify: any file a message of this app carries, whoever asks (`user` is optional and
    not compared), streamed with the upload's type and length; `as_attachment=true` makes it a
    download, and HTML is always one."""
    file_id = request.match_info["file_id"]
    if not UUID.fullmatch(file_id):
        raise DifyError(404, "not_found", "The requested URL was not found.")
    as_attachment = request.query.get("as_attachment", "false").lower()
    if as_attachment not in ("true", "false", "1", "0"):
        raise bad("as_attachment must be a boolean")
    records = request.app[RECORDS]
    file = records.files.get(file_id)
    if file is None or file_id not in records.files_in_messages or file["_content"] is None:
        raise DifyError(404, "file_not_found", "File not found in message context")
    content: bytes = file["_content"]
    mime_type = file["mime_type"] or "application/octet-stream"
    headers = {hdrs.CONTENT_TYPE: mime_type, hdrs.CACHE_CONTROL: "public, max-age=3600"}
    if mime_type.startswith(STREAMED_MEDIA):
        headers[hdrs.ACCEPT_RANGES] = "bytes"
    html = mime_type in HTML_TYPES or file["extension"] in ("html", "htm")
    if as_attachment in ("true", "1") or html:
        headers[hdrs.CONTENT_DISPOSITION] = f"attachment; filename*=UTF-8''{quote(file['name'])}"
        headers[hdrs.CONTENT_TYPE] = "application/octet-stream"
    if html:
        headers["X-Content-Type-Options"] = "nosniff"
    response = web.StreamResponse(headers=headers)
    response.content_length = len(content)
    await response.prepare(request)
    request[CALL]["status"] = 200
    for start in range(0, len(content), PREVIEW_PIECE):
        await response.write(content[start : start + PREVIEW_PIECE])
    await response.write_eof()
    return response


@routes.post("/v1/audio-to-text")
async def audio_to_text(request: web.Request) -> web.Response:
    missing = DifyError(400, "no_audio_uploaded", "Please upload your audio.")
    _, file = the_file(request, missing)
    if not file["content_type"].startswith("audio/"):
        raise DifyError(415, "unsupported_audio_type", "Audio type not allowed.")
    if file["size"] > MAX_AUDIO:
        raise DifyError(413, "audio_too_large", "Audio size exceeded.")
    return json_response(
        {"text": f"Stand-in transcript of {file['filename']} ({file['size']} bytes)."}
    )


@routes.post("/v1/text-to-audio")
async def text_to_audio(request: web.Request) -> web.StreamResponse:
    """Audio as Dify's text-to-audio sends it: chunked, a piece at a time."""
    req = json_body(request)
    user = user_of(req.get("user"))
    if req.get("message_id"):
        request.app[RECORDS].message(req["message_id"], user)
    elif not isinstance(req.get("text"), str) or not req["text"].strip():
        raise bad("message_id or text is required")
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "audio/mpeg"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    request[CALL]["status"] = 200
    for data in FAKE_AUDIO:
        await response.write(data)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


def variable_query(request: web.Request) -> tuple[str | None, str | None]:
    last_id, name = request.query.get("last_id") or None, request.query.get("variable_name")
    if last_id is not None and not UUID.fullmatch(last_id):
        raise bad("last_id must be a UUID")
    if name is not None and not re.fullmatch(r"[\w.-]{1,255}", name):
        raise bad(
            "Variable name can only contain letters, numbers, hyphens, underscores and periods"
        )
    return last_id, name


def shown(variable: dict[str, Any]) -> dict[str, Any]:
    """As Dify marshals a variable: its value as Python's `str` of it (`0`, `{}`, `True`)."""
    return {**public(variable), "value": str(variable["value"])}


@routes.get("/v1/conversations/{conversation_id}/variables")
async def list_variables(request: web.Request) -> web.Response:
    user, limit = user_of(request.query.get("user")), query_limit(request)
    records, conversation_id = request.app[RECORDS], request.match_info["conversation_id"]
    records.conversation(conversation_id, user)
    last_id, name = variable_query(request)
    variables = records.variables.get(conversation_id, [])
    if last_id is not None:
        ids = [v["id"] for v in variables]
        if last_id not in ids:
            raise not_found("Conversation Variable")
        variables = variables[ids.index(last_id) + 1 :]
    if name is not None:
        variables = [v for v in variables if v["name"] == name]
    page = [shown(v) for v in variables[:limit]]
    return json_response({"limit": limit, "has_more": len(variables) > limit, "data": page})


VALUE_TYPES = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
}


def type_of(value: Any) -> str:
    return next((t for t, fits in VALUE_TYPES.items() if fits(value)), "unknown")


@routes.put("/v1/conversations/{conversation_id}/variables/{variable_id}")
async def update_variable(request: web.Request) -> web.Response:
    """Dify's order: the body, the conversation (under `user`), the variable, the value's type."""
    req, records = json_body(request), request.app[RECORDS]
    user = user_of(req.get("user"))
    if "value" not in req:
        raise bad("value is required")
    conversation_id = request.match_info["conversation_id"]
    records.conversation(conversation_id, user)
    variable_id = request.match_info["variable_id"]
    found = [v for v in records.variables.get(conversation_id, []) if v["id"] == variable_id]
    if not found:
        raise not_found("Conversation Variable")
    variable, value = found[0], req["value"]
    if not VALUE_TYPES[variable["value_type"]](value):
        message = (
            f"Type mismatch: variable '{variable['name']}' expects {variable['value_type']}, "
            f"but got {type_of(value)} type"
        )
        raise DifyError(400, "bad_request", message)
    variable.update(value=value, updated_at=int(time.time()))
    return json_response(shown(variable))


@routes.get("/v1/{name:parameters|meta|info|site}")
async def app_info(request: web.Request) -> web.Response:
    return json_response(APP_INFO[request.match_info["name"]])
