"""The rest of Dify's chat API under `/api`: stop, conversations and their variables, messages,
feedback, files, audio and the app's settings, each called as the session's user.

Dify's `user` always comes from the session and goes where Dify reads it (query, JSON body or
multipart field); a `user` the client sends is never read. Everything the proxy can check (ids
are UUIDs, limits, enums, lengths) is checked before Dify is called, and every id that ends up in
a Dify path has been through `validate_uuid`, so no request can steer a call elsewhere in the
API. Dify's answers pass through unchanged; its errors map as for `/api/chat` (see dify.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from time import monotonic
from typing import IO, Any

import requests
from flask import Blueprint, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from werkzeug.datastructures import FileStorage

from . import bodies
from .auth import require_session
from .chat import MAX_MESSAGE_CHARS, STREAM_HEADERS
from .dify import Dify, unreadable_answer
from .errors import ApiError
from .limits import SLOT_RETRY_SECONDS, over_limit, per_user, user_limit
from .owners import Owners, bind_history, require_owner
from .quotas import Quotas
from .validation import (
    bad_request,
    optional_text,
    query_flag,
    query_limit,
    query_sort_by,
    query_uuid,
    query_variable_name,
    read_json_object,
    refuse_head,
    validate_uuid,
)

bp = Blueprint("api", __name__, url_prefix="/api")
bp.before_request(refuse_head)

RATINGS = ("like", "dislike", None)
APP_INFO = ("parameters", "meta", "info", "site")  # app-wide, no user: cached
MAX_NAME_CHARS = 255  # Dify stores a conversation name in a varchar(255)
MAX_FEEDBACK_CHARS = 2_000
MAX_VOICE_CHARS = 100
MAX_FILENAME_CHARS = 255
READ_SIZE = 64 * 1024
# What a preview passes on of Dify's head, besides its type: how long it is, whether it is a
# download (always, for HTML), and what Dify says of caching and ranges.
PREVIEW_HEADERS = (
    "Content-Length",
    "Content-Disposition",
    "Content-Encoding",
    "X-Content-Type-Options",
    "Accept-Ranges",
    "Cache-Control",
)
MIME_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*", re.ASCII)


def dify() -> Dify:
    return current_app.extensions["dify_proxy.dify"]


def owners() -> Owners:
    return current_app.extensions["dify_proxy.owners"]


def json_answer(upstream: requests.Response) -> Response:
    """Dify's status and JSON body, unchanged; a 2xx that is not JSON is Dify failing."""
    with upstream:
        if upstream.status_code == 204:
            return Response(status=204)
        try:
            json.loads(upstream.content)
        except ValueError:
            raise unreadable_answer() from None
        return Response(
            upstream.content, status=upstream.status_code, content_type="application/json"
        )


def user_params(**params: Any) -> dict[str, Any]:
    """Query parameters for Dify: the given ones that are set, and the session's user."""
    return {**{k: v for k, v in params.items() if v is not None}, "user": g.user_id}


# --- chat -----------------------------------------------------------------------------------


@bp.post("/chat/<task_id>/stop")
@require_session
def stop_chat(task_id: str) -> Response:
    """Only the user whose stream carried the task id may stop it: Dify stops a paused run
    for whoever asks (see owners.py)."""
    task_id = validate_uuid(task_id, "task_id")
    require_owner("task", task_id)
    return json_answer(
        dify().call("POST", f"/chat-messages/{task_id}/stop", json={"user": g.user_id})
    )


# --- conversations --------------------------------------------------------------------------


@bp.get("/conversations")
@require_session
def list_conversations() -> Response:
    params = user_params(
        last_id=query_uuid("last_id"), limit=query_limit(), sort_by=query_sort_by()
    )
    return json_answer(dify().call("GET", "/conversations", params=params))


@bp.post("/conversations/<conversation_id>/name")
@require_session
def rename_conversation(conversation_id: str) -> Response:
    conversation_id = validate_uuid(conversation_id, "conversation_id")
    body = read_json_object()
    auto_generate = body.get("auto_generate", False)
    if not isinstance(auto_generate, bool):
        raise bad_request("auto_generate must be true or false.")
    name = optional_text(body, "name", MAX_NAME_CHARS)
    if name is None and not auto_generate:
        raise bad_request("name is required unless auto_generate is true.")
    payload: dict[str, Any] = {"auto_generate": auto_generate, "user": g.user_id}
    if name is not None:
        payload["name"] = name
    return json_answer(dify().call("POST", f"/conversations/{conversation_id}/name", json=payload))


@bp.delete("/conversations/<conversation_id>")
@require_session
def delete_conversation(conversation_id: str) -> Response:
    """Always 204: newer Dify answers 204, older Dify 200 `{"result": "success"}`."""
    conversation_id = validate_uuid(conversation_id, "conversation_id")
    dify().call("DELETE", f"/conversations/{conversation_id}", json={"user": g.user_id}).close()
    return Response(status=204)


@bp.get("/conversations/<conversation_id>/variables")
@require_session
def list_conversation_variables(conversation_id: str) -> Response:
    """Dify looks the conversation up under `user`, so another user's id is Dify's 404."""
    conversation_id = validate_uuid(conversation_id, "conversation_id")
    params = user_params(
        last_id=query_uuid("last_id"), limit=query_limit(), variable_name=query_variable_name()
    )
    return json_answer(
        dify().call("GET", f"/conversations/{conversation_id}/variables", params=params)
    )


@bp.put("/conversations/<conversation_id>/variables/<variable_id>")
@require_session
def update_conversation_variable(conversation_id: str, variable_id: str) -> Response:
    """`value` is any JSON, null included: whether it fits the variable's type is Dify's to say
    (a 400 naming the type), since only Dify knows the type."""
    conversation_id = validate_uuid(conversation_id, "conversation_id")
    variable_id = validate_uuid(variable_id, "variable_id")
    body = read_json_object()
    if "value" not in body:
        raise bad_request("value is required (any JSON value of the variable's type).")
    return json_answer(
        dify().call(
            "PUT",
            f"/conversations/{conversation_id}/variables/{variable_id}",
            json={"value": body["value"], "user": g.user_id},
        )
    )


# --- messages -------------------------------------------------------------------------------


@bp.get("/messages")
@require_session
def list_messages() -> Response:
    params = user_params(
        conversation_id=query_uuid("conversation_id", required=True),
        first_id=query_uuid("first_id"),
        limit=query_limit(),
    )
    response = json_answer(dify().call("GET", "/messages", params=params))
    bind_history(response)
    return response


@bp.post("/messages/<message_id>/feedbacks")
@require_session
def message_feedback(message_id: str) -> Response:
    message_id = validate_uuid(message_id, "message_id")
    body = read_json_object()
    if "rating" not in body or body["rating"] not in RATINGS:
        raise bad_request("rating is required: 'like', 'dislike' or null (to withdraw).")
    payload: dict[str, Any] = {"rating": body["rating"], "user": g.user_id}
    content = body.get("content")
    if content is not None:
        if not isinstance(content, str):
            raise bad_request("content must be a string.")
        if len(content) > MAX_FEEDBACK_CHARS:
            raise bad_request(f"content must be at most {MAX_FEEDBACK_CHARS:,} characters.")
        payload["content"] = content
    return json_answer(dify().call("POST", f"/messages/{message_id}/feedbacks", json=payload))


@bp.get("/messages/<message_id>/suggested")
@require_session
def suggested_questions(message_id: str) -> Response:
    message_id = validate_uuid(message_id, "message_id")
    return json_answer(
        dify().call("GET", f"/messages/{message_id}/suggested", params=user_params())
    )


# --- files and audio ------------------------------------------------------------------------


class MultipartBody:
    """A multipart/form-data body for Dify whose file part is read from disk as it is sent.

    It has a length, so requests sends a Content-Length instead of chunking (which not every
    server in front of Dify accepts), and iterating it reads the file `READ_SIZE` bytes at a
    time, so a large upload never sits in memory whole.
    """

    def __init__(self, fields: dict[str, str], upload: FileStorage, filename: str) -> None:
        self.boundary = f"dify-proxy-{secrets.token_hex(16)}"
        delimiter = f"--{self.boundary}\r\n".encode()
        head = b"".join(
            delimiter
            + f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
            for name, value in fields.items()
        )
        self.head = (
            head
            + delimiter
            + (
                f'Content-Disposition: form-data; name="file"; filename="{quote_param(filename)}"'
                f"\r\nContent-Type: {part_type(upload)}\r\n\r\n"
            ).encode()
        )
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.file: IO[bytes] = upload.stream
        self.file.seek(0, os.SEEK_END)
        self.file_size = self.file.tell()
        self.file.seek(0)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self.head) + self.file_size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        self.file.seek(0)
        yield self.head
        while chunk := self.file.read(READ_SIZE):
            yield chunk
        yield self.tail


def quote_param(value: str) -> str:
    """A filename as browsers write it into Content-Disposition (WHATWG's encoding)."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def part_type(upload: FileStorage) -> str:
    """The file's media type without parameters, or octet-stream for anything malformed."""
    mimetype = upload.mimetype
    return mimetype if MIME_TYPE.fullmatch(mimetype) else "application/octet-stream"


def uploaded_file() -> tuple[FileStorage, str]:
    """The one multipart `file`, spooled to disk by werkzeug as it arrives (parts over 500 KB
    never sit in memory), with the body cut off at MAX_UPLOAD_BYTES (413) while it is read."""
    request.max_content_length = user_limit("max_upload_bytes")
    if request.mimetype != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send the file as Content-Type: multipart/form-data, in a field named file.",
        )
    files = request.files.getlist("file")
    if not files:
        raise bad_request("file is required: send it in a multipart field named file.")
    if len(files) > 1 or len(request.files) > 1:
        raise bad_request("Send exactly one file, in the multipart field named file.")
    upload = files[0]
    filename = upload.filename
    if not filename or not filename.strip():
        raise bad_request("The file needs a filename.")
    if len(filename) > MAX_FILENAME_CHARS:
        raise bad_request(f"The filename must be at most {MAX_FILENAME_CHARS} characters.")
    return upload, filename


def forward_upload(path: str) -> Response:
    """At most MAX_UPLOADS_PER_USER bodies per user come in at once (one user with thousands of
    slow uploads held every connection slot); the lease is renewed while the body arrives."""
    quotas: Quotas = current_app.extensions["dify_proxy.quotas"]
    user = g.user_id
    lease = quotas.acquire_upload(user)
    if lease is None:
        raise over_limit(
            "uploads",
            "too_many_uploads",
            "Upload limit reached",
            f"{quotas.max_uploads} at a time",
            "a slot frees when one of your uploads ends",
            SLOT_RETRY_SECONDS,
        )
    renewed_at = monotonic()

    def renew() -> None:
        nonlocal renewed_at
        if monotonic() - renewed_at >= quotas.lease_seconds / 3:
            renewed_at = monotonic()
            quotas.renew_upload(user, lease)

    request.environ[bodies.PROGRESS_KEY] = renew
    try:
        upload, filename = uploaded_file()
        body = MultipartBody({"user": user}, upload, filename)
        upstream = dify().call("POST", path, data=body, headers={"Content-Type": body.content_type})
        return json_answer(upstream)
    finally:
        request.environ.pop(bodies.PROGRESS_KEY, None)
        quotas.release_upload(user, lease)


@bp.post("/files/upload")
@require_session
@per_user()
def upload_file() -> Response:
    """The file's id is bound to the uploader: Dify's preview serves any file of the app to
    whoever names it, so the proxy's own binding is what keeps a file its uploader's."""
    response = forward_upload("/files/upload")
    if response.status_code in (200, 201):
        answer = json.loads(response.get_data())
        file_id = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(file_id, str):
            owners().bind("file", file_id, g.user_id)
    return response


@bp.get("/files/<file_id>/preview")
@require_session
def preview_file(file_id: str) -> Response:
    """The file's bytes as Dify streams them, for its uploader only: any other id, unknown or
    someone else's, gets the same 404 and Dify is not called."""
    file_id = validate_uuid(file_id, "file_id")
    as_attachment = query_flag("as_attachment")
    if owners().owned("file", file_id, g.user_id) is None:
        raise ApiError(404, "file_not_found", "File not found.")
    params = user_params(
        as_attachment=None if as_attachment is None else str(as_attachment).lower()
    )
    upstream = dify().call(
        "GET",
        f"/files/{file_id}/preview",
        params=params,
        headers={"Accept-Encoding": "identity"},  # the bytes go out as they are read
        stream=True,
    )
    headers = {name: upstream.headers[name] for name in PREVIEW_HEADERS if name in upstream.headers}
    if "Cache-Control" in headers:
        # Dify says `public`; behind a session the file is this user's alone, so no shared
        # cache may keep it.
        headers["Cache-Control"] = re.sub(r"\bpublic\b", "private", headers["Cache-Control"])
    return Response(
        relay_bytes(upstream),
        status=upstream.status_code,
        content_type=upstream.headers.get("Content-Type", "application/octet-stream"),
        headers=headers,
    )


@bp.post("/audio-to-text")
@require_session
@per_user()
def audio_to_text() -> Response:
    return forward_upload("/audio-to-text")


@bp.post("/text-to-audio")
@require_session
def text_to_audio() -> Response:
    body = read_json_object()
    payload: dict[str, Any] = {"user": g.user_id}
    if body.get("message_id") not in (None, ""):
        payload["message_id"] = validate_uuid(body["message_id"], "message_id")
    text = optional_text(body, "text", MAX_MESSAGE_CHARS)
    if text is not None:
        payload["text"] = text
    if "message_id" not in payload and text is None:
        raise bad_request("message_id or text is required.")
    voice = optional_text(body, "voice", MAX_VOICE_CHARS)
    if voice is not None:
        payload["voice"] = voice
    # Uncompressed, please: the audio is relayed as the very bytes read off the wire.
    upstream = dify().call(
        "POST",
        "/text-to-audio",
        json=payload,
        headers={"Accept-Encoding": "identity"},
        stream=True,
    )
    return Response(
        relay_bytes(upstream),
        status=upstream.status_code,
        content_type=upstream.headers.get("Content-Type", "audio/mpeg"),
        headers=STREAM_HEADERS,
    )


def relay_bytes(upstream: requests.Response) -> Iterator[bytes]:
    """Dify's bytes as they arrive; a client that leaves closes Dify's response (finally)."""
    try:
        while chunk := upstream.raw.read1(READ_SIZE):
            yield chunk
    finally:
        upstream.close()


# --- the app's settings ---------------------------------------------------------------------


class AppInfoCache:
    """Dify's app-wide answers (`/parameters`, `/meta`, `/info`, `/site`), kept per process for
    `ttl` seconds: every page load asks for them, and they change only when the app is edited."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, bytes]] = {}

    def get(self, path: str) -> bytes | None:
        entry = self._entries.get(path)
        if entry is None or monotonic() >= entry[0]:
            return None
        return entry[1]

    def put(self, path: str, body: bytes) -> None:
        if self.ttl > 0:
            self._entries[path] = (monotonic() + self.ttl, body)


def _init_cache(state: BlueprintSetupState) -> None:
    ttl = state.app.config["SETTINGS"].app_info_ttl
    state.app.extensions["dify_proxy.app_info"] = AppInfoCache(ttl)


bp.record_once(_init_cache)


@bp.get(f"/<any({', '.join(APP_INFO)}):name>")
@require_session
def app_info(name: str) -> Response:
    cache: AppInfoCache = current_app.extensions["dify_proxy.app_info"]
    path = f"/{name}"
    body = cache.get(path)
    if body is None:
        response = json_answer(dify().call("GET", path))
        if response.status_code == 200:
            cache.put(path, response.get_data())
        return response
    return Response(body, status=200, content_type="application/json")
