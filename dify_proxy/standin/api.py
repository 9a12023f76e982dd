"""The rest of a chat app's Dify API: conversations, messages, feedback, suggestions, file and
audio uploads, file preview, text-to-audio, and parameters/meta/info/site, answered from
`Records` as Dify answers them. Uploads are read as they arrive (`read_upload`): fields kept,
and a file's bytes kept for its preview only up to KEEP_FILE (a bigger one is only counted, so
a 1 GB upload costs what a 1 KB one does, and its preview is a 404)."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from typing import Any

from aiohttp import BodyPartReader, hdrs, web

from dify_proxy.standin import apps
from dify_proxy.standin.records import CALL, RECORDS, json_body, public
from dify_proxy.standin.wire import DifyError, bad, json_response, not_found, user_of

MAX_FILE = 64 * 1024 * 1024  # Dify's own limits are configurable; these are generous
MAX_AUDIO = 30 * 1024 * 1024
MAX_FIELD = 64 * 1024  # a non-file multipart field
KEEP_FILE = 16 * 1024 * 1024  # bytes of an upload kept for `GET /files/{id}/preview`
BLOCKED_EXTENSIONS = ("bat", "exe", "sh")
SORT_ORDERS = ("created_at", "-created_at", "updated_at", "-updated_at")
FAKE_AUDIO = (b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xf3\x44\xc4" * 512, b"\xff\xf3" * 256)
UPLOAD_PATHS = ("/v1/files/upload", "/v1/audio-to-text")
UPLOAD_ERROR = web.RequestKey("upload_error", DifyError)
UPLOADED = web.RequestKey("uploaded", list)  # each file part's bytes (None past KEEP_FILE)
routes = web.RouteTableDef()


async def read_upload(request: web.Request, call: dict[str, Any]) -> None:
    """Read an upload's body to its end as it arrives, into the call log: its fields (`user`
    among them) and each file's name, type and size. What is wrong with it is answered later,
    after the key check, as Dify does."""
    call["form"], call["files"] = {}, []
    request[UPLOADED] = []
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):  # a nested multipart: not Dify's
                await part.release()
                continue
            size, value = 0, bytearray()
            while chunk := await part.read_chunk(65536):
                size += len(chunk)
                if part.filename is None and size > MAX_FIELD:
                    raise DifyError(413, "request_entity_too_large", "field too large")
                if size <= (MAX_FIELD if part.filename is None else KEEP_FILE):
                    value += chunk
            if part.name is not None and part.filename is None:
                call["form"][part.name] = value.decode("utf-8", "replace")
            elif part.name is not None:
                kind = part.headers.get(hdrs.CONTENT_TYPE, "")
                file = {"field": part.name, "filename": part.filename, "content_type": kind}
                call["files"].append({**file, "size": size})
                request[UPLOADED].append(bytes(value) if size <= KEEP_FILE else None)
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
    apps.require(request, apps.CHATFLOW, apps.CHAT)
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
    apps.require(request, apps.CHATFLOW, apps.CHAT)
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
    apps.require(request, apps.CHATFLOW, apps.CHAT)
    records, conversation_id = request.app[RECORDS], request.match_info["conversation_id"]
    records.conversation(conversation_id, user_of(json_body(request).get("user")))
    records.forget_conversation(conversation_id)
    return web.Response(status=204)


@routes.get("/v1/messages")
async def list_messages(request: web.Request) -> web.Response:
    apps.require(request, apps.CHATFLOW, apps.CHAT)
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
    apps.require(request, apps.CHATFLOW, apps.CHAT)
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
    data = request[UPLOADED][request[CALL]["files"].index(file)]
    request.app[RECORDS].files[answer["id"]] = {**answer, "_data": data}
    return json_response(answer, 201)


@routes.get("/v1/files/{file_id}/preview")
async def preview_file(request: web.Request) -> web.Response:
    """The uploaded bytes under their content type. Like Dify, no end-user check: the file id
    and the app's key are all it takes (the proxy must scope it to its uploader)."""
    file = request.app[RECORDS].files.get(request.match_info["file_id"])
    if file is None or file["_data"] is None:
        raise DifyError(404, "file_not_found", "The requested file was not found.")
    response = web.Response(body=file["_data"])
    response.headers[hdrs.CONTENT_TYPE] = file["mime_type"] or "application/octet-stream"
    response.headers[hdrs.CACHE_CONTROL] = "public, max-age=3600"
    if request.query.get("as_attachment", "").lower() == "true":
        quoted = urllib.parse.quote(file["name"])
        response.headers[hdrs.CONTENT_DISPOSITION] = f"attachment; filename*=UTF-8''{quoted}"
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


@routes.get("/v1/{name:parameters|meta|info|site}")
async def app_info(request: web.Request) -> web.Response:
    """The settings a front end reads at start, for the app the key opened (apps.py)."""
    name, mode = request.match_info["name"], request[apps.MODE]
    if name == "meta":
        return json_response({"tool_icons": {}})
    describe = {"parameters": apps.parameters, "info": apps.info, "site": apps.site}[name]
    return json_response(describe(mode))
