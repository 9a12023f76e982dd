"""The /api routes besides /api/chat, in-process against requests-mock: where Dify gets `user`,
what is refused before Dify is called, and what passes through from Dify."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from requests_mock import ANY
from werkzeug.formparser import MultiPartParser
from werkzeug.http import parse_options_header

from dify_proxy import api, create_app
from dify_proxy.dify import Dify
from tests.conftest import DIFY_URL
from tests.support import tokens

USER = tokens.USER_ID
TASK = "c3d4e5f6-0718-4a2b-9c3d-4e5f60718293"
CONVERSATION = "3f8e5c1a-9b2d-4e6f-8a7b-1c2d3e4f5a6b"
MESSAGE = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
VARIABLE = "0b6f5d2c-4e3a-4f1b-9c8d-7a6e5f4d3c2b"
UPLOAD_LIMIT = 3 * 1024 * 1024
UPLOADED = {
    "id": "72fa9618-8f89-4a37-9b33-7e1178a24a67",
    "name": "notes.txt",
    "size": 5,
    "extension": "txt",
    "mime_type": "text/plain",
    "created_by": "6ad1ab0a-73ff-4ac1-b9e4-cdb312f71f13",
    "created_at": 1722781568,
}


@pytest.fixture
def settings(settings):
    """The shared unit settings, with an upload limit small enough to exceed cheaply."""
    return dataclasses.replace(settings, max_upload_bytes=UPLOAD_LIMIT)


@pytest.fixture
def app(app):
    """TASK is the test user's, as if one of their answers had carried it."""
    app.extensions["dify_proxy.owners"].bind("task", TASK, USER)
    return app


@dataclasses.dataclass(frozen=True)
class Route:
    """One proxy route, the Dify call it maps to, and where Dify reads `user` for it."""

    name: str
    method: str
    path: str
    dify_method: str
    dify_path: str
    user_in: str  # "query", "json" or "form"
    body: dict[str, Any] | None = None
    query: dict[str, str] | None = None
    upload: bool = False


ROUTES = [
    Route("stop", "POST", f"/api/chat/{TASK}/stop", "POST", f"/chat-messages/{TASK}/stop", "json"),
    Route("conversations", "GET", "/api/conversations", "GET", "/conversations", "query"),
    Route(
        "rename",
        "POST",
        f"/api/conversations/{CONVERSATION}/name",
        "POST",
        f"/conversations/{CONVERSATION}/name",
        "json",
        body={"name": "Trip plans"},
    ),
    Route(
        "delete",
        "DELETE",
        f"/api/conversations/{CONVERSATION}",
        "DELETE",
        f"/conversations/{CONVERSATION}",
        "json",
    ),
    Route(
        "variables",
        "GET",
        f"/api/conversations/{CONVERSATION}/variables",
        "GET",
        f"/conversations/{CONVERSATION}/variables",
        "query",
    ),
    Route(
        "set variable",
        "PUT",
        f"/api/conversations/{CONVERSATION}/variables/{VARIABLE}",
        "PUT",
        f"/conversations/{CONVERSATION}/variables/{VARIABLE}",
        "json",
        body={"value": "Paris"},
    ),
    Route(
        "messages",
        "GET",
        "/api/messages",
        "GET",
        "/messages",
        "query",
        query={"conversation_id": CONVERSATION},
    ),
    Route(
        "feedback",
        "POST",
        f"/api/messages/{MESSAGE}/feedbacks",
        "POST",
        f"/messages/{MESSAGE}/feedbacks",
        "json",
        body={"rating": "like"},
    ),
    Route(
        "suggested",
        "GET",
        f"/api/messages/{MESSAGE}/suggested",
        "GET",
        f"/messages/{MESSAGE}/suggested",
        "query",
    ),
    Route("upload", "POST", "/api/files/upload", "POST", "/files/upload", "form", upload=True),
    Route(
        "audio-to-text", "POST", "/api/audio-to-text", "POST", "/audio-to-text", "form", upload=True
    ),
    Route(
        "text-to-audio",
        "POST",
        "/api/text-to-audio",
        "POST",
        "/text-to-audio",
        "json",
        body={"text": "Read this aloud."},
    ),
]
JSON_ROUTES = [r for r in ROUTES if r.name not in ("delete", "text-to-audio")]
APP_INFO = ["parameters", "meta", "info", "site"]
ANY_DIFY_URL = re.compile(re.escape(DIFY_URL) + ".*")


def by_name(routes: list[Route]) -> Any:
    return pytest.mark.parametrize("route", routes, ids=[r.name for r in routes])


def upload_data(content: bytes = b"hello", filename: str = "notes.txt", **fields: Any) -> dict:
    return {"file": (io.BytesIO(content), filename, "text/plain"), **fields}


def call(client, auth, route: Route, *, user: str | None = None, headers: dict | None = None):
    """Make `route`'s request, optionally with a client-supplied `user` in every place."""
    query = dict(route.query or {})
    headers = auth if headers is None else headers
    if user is not None:
        query["user"] = user
    if route.upload:
        data = upload_data(**({"user": user} if user is not None else {}))
        return client.post(route.path, query_string=query, data=data, headers=headers)
    kwargs: dict[str, Any] = {"query_string": query, "headers": headers}
    if route.body is not None or route.method in ("POST", "PUT"):
        body = dict(route.body or {})
        if user is not None:
            body["user"] = user
        kwargs["json"] = body
    return client.open(route.path, method=route.method, **kwargs)


class DifyCall:
    """What Dify received; a multipart body is read while the request is live (it streams from
    the proxy's spooled file, which is closed once the proxy's request ends)."""

    def __init__(self) -> None:
        self.method = self.path = ""
        self.query: dict[str, list[str]] = {}
        self.headers: dict[str, str] = {}
        self.json: Any = None
        self.form: dict[str, list[str]] = {}
        self.files: dict[str, tuple[str | None, str | None, bytes]] = {}
        self.count = 0

    def record(self, request) -> None:
        self.count += 1
        self.method, url = request.method, urlsplit(request.url)
        self.path, self.query = url.path, parse_qs(url.query, keep_blank_values=True)
        self.headers = dict(request.headers)
        content_type, options = parse_options_header(request.headers.get("Content-Type", ""))
        if content_type == "multipart/form-data":
            raw = b"".join(request.body)
            assert len(raw) == int(request.headers["Content-Length"])
            form, files = MultiPartParser().parse(
                io.BytesIO(raw), options["boundary"].encode(), len(raw)
            )
            self.form = form.to_dict(flat=False)
            self.files = {k: (f.filename, f.mimetype, f.read()) for k, f in files.items(multi=True)}
        elif request.body:
            self.json = json.loads(request.body)


@pytest.fixture
def dify(requests_mock):
    """Every Dify URL answers; returns the record of the last call."""
    seen = DifyCall()

    def answer(request, context):
        seen.record(request)
        if request.path.endswith("/files/upload"):
            context.status_code = 201
            return json.dumps(UPLOADED)
        if request.path.endswith("/text-to-audio"):
            context.headers["Content-Type"] = "audio/mpeg"
            return "ID3-fake-audio"
        if request.method == "DELETE":
            context.status_code = 204
            return ""
        return json.dumps({"result": "success", "path": request.path})

    requests_mock.register_uri(ANY, ANY_DIFY_URL, text=answer)
    return seen


def user_seen(seen: DifyCall, where: str) -> list[str]:
    if where == "query":
        return seen.query.get("user", [])
    if where == "json":
        return [seen.json["user"]] if "user" in seen.json else []
    return seen.form.get("user", [])


# --- the mapping ------------------------------------------------------------------------------


@by_name(ROUTES)
def test_each_route_calls_its_dify_endpoint(client, auth, dify, route):
    response = call(client, auth, route)
    assert response.status_code < 300
    assert (dify.method, dify.path) == (route.dify_method, "/v1" + route.dify_path)


@by_name(ROUTES)
def test_dify_gets_the_sessions_user_where_it_reads_it(client, auth, dify, route):
    call(client, auth, route)
    assert user_seen(dify, route.user_in) == [USER]


@by_name(ROUTES)
def test_a_client_supplied_user_is_ignored_everywhere(client, auth, dify, route):
    call(client, auth, route, user="somebody-else")
    assert user_seen(dify, route.user_in) == [USER]
    assert "somebody-else" not in json.dumps([dify.query, dify.json, dify.form])


@by_name(ROUTES)
def test_every_route_needs_a_session_and_calls_nothing_without_one(
    client, auth, requests_mock, route
):
    response = call(client, auth, route, headers={})
    assert response.status_code == 401
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("name", APP_INFO)
def test_app_info_is_fetched_without_a_user(client, auth, dify, name):
    response = client.get(f"/api/{name}", headers=auth)
    assert response.status_code == 200
    assert (dify.method, dify.path, dify.query) == ("GET", f"/v1/{name}", {})


def test_conversations_forwards_last_id_limit_and_sort_by_only(client, auth, dify):
    query = {"last_id": CONVERSATION, "limit": "5", "sort_by": "-created_at", "extra": "x"}
    client.get("/api/conversations", query_string=query, headers=auth)
    assert dify.query == {
        "last_id": [CONVERSATION],
        "limit": ["5"],
        "sort_by": ["-created_at"],
        "user": [USER],
    }


def test_messages_forwards_conversation_first_id_and_limit(client, auth, dify):
    query = {"conversation_id": CONVERSATION, "first_id": MESSAGE, "limit": "100"}
    client.get("/api/messages", query_string=query, headers=auth)
    assert dify.query == {
        "conversation_id": [CONVERSATION],
        "first_id": [MESSAGE],
        "limit": ["100"],
        "user": [USER],
    }


def test_empty_optional_query_values_count_as_absent(client, auth, dify):
    client.get("/api/conversations?last_id=&limit=&sort_by=", headers=auth)
    assert dify.query == {"user": [USER]}


def test_conversation_variables_forward_last_id_limit_and_variable_name_only(client, auth, dify):
    query = {"last_id": VARIABLE, "limit": "100", "variable_name": "trip.city-2_b", "x": "y"}
    client.get(f"/api/conversations/{CONVERSATION}/variables", query_string=query, headers=auth)
    assert dify.query == {
        "last_id": [VARIABLE],
        "limit": ["100"],
        "variable_name": ["trip.city-2_b"],
        "user": [USER],
    }


@pytest.mark.parametrize(
    "value",
    ["Paris", "", 42, 1.5, True, None, ["a", "b"], {"city": "Paris", "days": [1, 2]}],
    ids=["string", "empty string", "integer", "float", "boolean", "null", "array", "object"],
)
def test_setting_a_variable_forwards_any_json_value_for_dify_to_type_check(
    client, auth, dify, value
):
    path = f"/api/conversations/{CONVERSATION}/variables/{VARIABLE}"
    response = client.put(path, json={"value": value, "extra": 1}, headers=auth)
    assert response.status_code == 200
    assert dify.json == {"value": value, "user": USER}


def test_difys_400_for_a_value_of_the_wrong_type_passes_through(client, auth, requests_mock):
    error = {
        "code": "bad_request",
        "message": "Type mismatch: variable 'city' expects string, but got number type",
        "status": 400,
    }
    requests_mock.put(
        f"{DIFY_URL}/conversations/{CONVERSATION}/variables/{VARIABLE}", status_code=400, json=error
    )
    path = f"/api/conversations/{CONVERSATION}/variables/{VARIABLE}"
    response = client.put(path, json={"value": 3}, headers=auth)
    assert (response.status_code, response.json) == (400, error)


def test_rename_forwards_the_name(client, auth, dify):
    client.post(f"/api/conversations/{CONVERSATION}/name", json={"name": "Trip"}, headers=auth)
    assert dify.json == {"name": "Trip", "auto_generate": False, "user": USER}


def test_rename_with_auto_generate_needs_no_name(client, auth, dify):
    path = f"/api/conversations/{CONVERSATION}/name"
    response = client.post(path, json={"auto_generate": True}, headers=auth)
    assert response.status_code == 200
    assert dify.json == {"auto_generate": True, "user": USER}


@pytest.mark.parametrize("rating", ["like", "dislike", None])
def test_feedback_forwards_the_rating_including_null_to_withdraw(client, auth, dify, rating):
    path = f"/api/messages/{MESSAGE}/feedbacks"
    response = client.post(path, json={"rating": rating}, headers=auth)
    assert response.status_code == 200
    assert dify.json == {"rating": rating, "user": USER}


@pytest.mark.parametrize("content", ["", "   ", "\n"], ids=["empty", "spaces", "newline"])
def test_feedback_content_is_free_text_so_empty_or_blank_is_forwarded(client, auth, dify, content):
    """Dify takes `content` as optional free text (`str | None`), and so does the document."""
    path = f"/api/messages/{MESSAGE}/feedbacks"
    response = client.post(path, json={"rating": "like", "content": content}, headers=auth)
    assert response.status_code == 200
    assert dify.json == {"rating": "like", "content": content, "user": USER}


def test_feedback_forwards_content_of_up_to_2000_characters(client, auth, dify):
    path = f"/api/messages/{MESSAGE}/feedbacks"
    body = {"rating": "dislike", "content": "x" * 2000}
    assert client.post(path, json=body, headers=auth).status_code == 200
    assert dify.json == {"rating": "dislike", "content": "x" * 2000, "user": USER}


@pytest.mark.parametrize(
    "body",
    [
        {"message_id": MESSAGE},
        {"text": "Read this.", "voice": "alloy"},
        {"message_id": MESSAGE, "text": "Read this."},
    ],
    ids=["message_id", "text and voice", "both"],
)
def test_text_to_audio_forwards_message_id_text_and_voice(client, auth, dify, body):
    client.post("/api/text-to-audio", json=body, headers=auth)
    assert dify.json == {**body, "user": USER}


@by_name([r for r in ROUTES if r.upload])
def test_an_upload_reaches_dify_with_its_bytes_name_and_type(client, auth, dify, route):
    content = bytes(range(256)) * 4096  # 1 MiB: over the app's JSON limit, under the upload one
    data = {"file": (io.BytesIO(content), "voice memo.mp3", "audio/mpeg")}
    response = client.post(route.path, data=data, headers=auth)
    assert response.status_code < 300
    assert dify.files == {"file": ("voice memo.mp3", "audio/mpeg", content)}


def test_an_upload_is_sent_with_a_content_length_not_chunked(client, auth, dify):
    client.post("/api/files/upload", data=upload_data(), headers=auth)
    assert "Transfer-Encoding" not in dify.headers
    assert int(dify.headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    "encoded",
    [
        "filename*=UTF-8''a%22%3B%20name%3D%22user.txt",  # RFC 2231: decodes to a"; name="user.txt
        'filename="a\\"; name=\\"user.txt"',  # a quoted-string with escaped quotes
        "filename*=UTF-8''a%0D%0A%0D%0Ainjected.txt",  # CR LF CR LF: would end the part head
    ],
    ids=["rfc2231 quote", "escaped quote", "crlf"],
)
def test_a_quote_or_newline_in_a_filename_cannot_forge_a_multipart_part(
    client, auth, dify, encoded
):
    body = (
        f'--B\r\nContent-Disposition: form-data; name="file"; {encoded}\r\n'
        "Content-Type: text/plain\r\n\r\nhello\r\n--B--\r\n"
    ).encode()
    response = client.post(
        "/api/files/upload",
        data=body,
        content_type="multipart/form-data; boundary=B",
        headers=auth,
    )
    assert response.status_code == 201
    assert dify.form == {"user": [USER]}
    assert list(dify.files) == ["file"]
    assert dify.files["file"][2] == b"hello"


# --- what Dify answers ------------------------------------------------------------------------


@by_name(JSON_ROUTES)
def test_difys_json_answer_passes_through_unchanged(client, auth, requests_mock, route):
    answer = {"data": [{"id": "x", "name": "ünïcode"}], "has_more": False, "limit": 20}
    requests_mock.register_uri(
        route.dify_method, DIFY_URL + route.dify_path, status_code=200, json=answer
    )
    response = call(client, auth, route)
    assert (response.status_code, response.json) == (200, answer)
    assert response.content_type == "application/json"


def test_upload_answers_201_with_difys_file_object(client, auth, dify):
    response = client.post("/api/files/upload", data=upload_data(), headers=auth)
    assert (response.status_code, response.json) == (201, UPLOADED)


@pytest.mark.parametrize(
    "dify_answer",
    [{"status_code": 204}, {"status_code": 200, "json": {"result": "success"}}],
    ids=["newer dify: 204", "older dify: 200 result"],
)
def test_delete_answers_204_whichever_way_dify_answers(client, auth, requests_mock, dify_answer):
    requests_mock.delete(f"{DIFY_URL}/conversations/{CONVERSATION}", **dify_answer)
    response = client.delete(f"/api/conversations/{CONVERSATION}", headers=auth)
    assert (response.status_code, response.get_data()) == (204, b"")


def test_text_to_audio_streams_difys_audio_with_its_content_type(client, auth, requests_mock):
    audio = b"RIFF" + bytes(range(256)) * 64
    requests_mock.post(
        f"{DIFY_URL}/text-to-audio", content=audio, headers={"Content-Type": "audio/wav"}
    )
    response = client.post("/api/text-to-audio", json={"text": "hi"}, headers=auth)
    assert response.status_code == 200
    assert response.content_type == "audio/wav"
    assert response.is_streamed
    assert response.get_data() == audio
    assert requests_mock.last_request.headers["Accept-Encoding"] == "identity"


def test_relaying_audio_closes_difys_response_when_the_client_leaves():
    class Upstream:
        closed = False

        class raw:  # noqa: N801 - stands in for urllib3's response
            @staticmethod
            def read1(size):
                return b"chunk"

        def close(self):
            self.closed = True

    upstream = Upstream()
    body = api.relay_bytes(upstream)
    assert next(body) == b"chunk"
    body.close()  # what the WSGI server does when a write to the client fails
    assert upstream.closed


@by_name(ROUTES)
def test_difys_client_errors_pass_through_with_its_code_and_message(
    client, auth, requests_mock, route
):
    error = {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
    requests_mock.register_uri(
        route.dify_method, DIFY_URL + route.dify_path, status_code=404, json=error
    )
    response = call(client, auth, route)
    assert (response.status_code, response.json) == (404, error)


@by_name(ROUTES)
def test_dify_refusing_the_key_is_a_502_never_a_401(client, auth, requests_mock, route):
    error = {"code": "unauthorized", "message": "Access token is invalid", "status": 401}
    requests_mock.register_uri(
        route.dify_method, DIFY_URL + route.dify_path, status_code=401, json=error
    )
    response = call(client, auth, route)
    assert (response.status_code, response.json["code"]) == (502, "upstream_misconfigured")
    assert "WWW-Authenticate" not in response.headers


def test_difys_429_keeps_retry_after(client, auth, requests_mock):
    error = {"code": "too_many_requests", "message": "Slow down.", "status": 429}
    requests_mock.get(
        f"{DIFY_URL}/conversations", status_code=429, json=error, headers={"Retry-After": "9"}
    )
    response = client.get("/api/conversations", headers=auth)
    assert (response.status_code, response.headers["Retry-After"]) == (429, "9")


def test_a_non_json_error_page_from_dify_is_a_502(client, auth, requests_mock):
    requests_mock.get(f"{DIFY_URL}/messages", status_code=503, text="<html>busy</html>")
    response = client.get(f"/api/messages?conversation_id={CONVERSATION}", headers=auth)
    assert (response.status_code, response.json["code"]) == (502, "upstream_error")


def test_a_2xx_from_dify_that_is_not_json_is_a_502(client, auth, requests_mock):
    requests_mock.get(f"{DIFY_URL}/parameters", text="<html>ok</html>")
    response = client.get("/api/parameters", headers=auth)
    assert (response.status_code, response.json["code"]) == (502, "upstream_error")


@pytest.mark.parametrize(
    ("status", "code"), [(413, "file_too_large"), (415, "unsupported_file_type")]
)
def test_difys_413_and_415_on_an_upload_pass_through(client, auth, requests_mock, status, code):
    error = {"code": code, "message": "Dify says no.", "status": status}
    requests_mock.post(f"{DIFY_URL}/files/upload", status_code=status, json=error)
    response = client.post("/api/files/upload", data=upload_data(), headers=auth)
    assert (response.status_code, response.json) == (status, error)


# --- refused before Dify ----------------------------------------------------------------------

BAD_REQUESTS = [
    ("POST", "/api/chat/not-a-task/stop", None, "task_id"),
    ("POST", f"/api/chat/{TASK[:-1]}/stop", None, "task_id"),
    ("GET", "/api/conversations?last_id=nope", None, "last_id"),
    ("GET", "/api/conversations?limit=0", None, "limit"),
    ("GET", "/api/conversations?limit=101", None, "limit"),
    ("GET", "/api/conversations?limit=-1", None, "limit"),
    ("GET", "/api/conversations?limit=2.5", None, "limit"),
    ("GET", "/api/conversations?limit=ten", None, "limit"),
    ("GET", "/api/conversations?sort_by=name", None, "sort_by"),
    ("GET", "/api/conversations?sort_by=updated", None, "sort_by"),
    ("POST", "/api/conversations/nope/name", {"name": "x"}, "conversation_id"),
    ("POST", f"/api/conversations/{CONVERSATION}/name", {}, "name"),
    ("POST", f"/api/conversations/{CONVERSATION}/name", {"name": "  "}, "name"),
    ("POST", f"/api/conversations/{CONVERSATION}/name", {"name": 7}, "name"),
    ("POST", f"/api/conversations/{CONVERSATION}/name", {"name": "x" * 256}, "255"),
    ("POST", f"/api/conversations/{CONVERSATION}/name", {"auto_generate": "yes"}, "auto_generate"),
    ("DELETE", "/api/conversations/nope", None, "conversation_id"),
    ("GET", "/api/conversations/nope/variables", None, "conversation_id"),
    ("GET", f"/api/conversations/{CONVERSATION}/variables?last_id=x", None, "last_id"),
    ("GET", f"/api/conversations/{CONVERSATION}/variables?limit=0", None, "limit"),
    ("GET", f"/api/conversations/{CONVERSATION}/variables?limit=101", None, "limit"),
    (
        "GET",
        f"/api/conversations/{CONVERSATION}/variables?variable_name=a%27%20or%201",
        None,
        "variable_name",
    ),
    (
        "GET",
        f"/api/conversations/{CONVERSATION}/variables?variable_name={'v' * 256}",
        None,
        "variable_name",
    ),
    ("PUT", f"/api/conversations/nope/variables/{VARIABLE}", {"value": 1}, "conversation_id"),
    ("PUT", f"/api/conversations/{CONVERSATION}/variables/nope", {"value": 1}, "variable_id"),
    ("PUT", f"/api/conversations/{CONVERSATION}/variables/{VARIABLE}", {}, "value"),
    (
        "PUT",
        f"/api/conversations/{CONVERSATION}/variables/{VARIABLE}",
        {"val": 1},
        "value is required",
    ),
    ("GET", "/api/messages", None, "conversation_id"),
    ("GET", "/api/messages?conversation_id=nope", None, "conversation_id"),
    ("GET", f"/api/messages?conversation_id={CONVERSATION}&first_id=x", None, "first_id"),
    ("GET", f"/api/messages?conversation_id={CONVERSATION}&limit=500", None, "limit"),
    ("POST", "/api/messages/nope/feedbacks", {"rating": "like"}, "message_id"),
    ("POST", f"/api/messages/{MESSAGE}/feedbacks", {}, "rating"),
    ("POST", f"/api/messages/{MESSAGE}/feedbacks", {"rating": "meh"}, "rating"),
    ("POST", f"/api/messages/{MESSAGE}/feedbacks", {"rating": "LIKE"}, "rating"),
    ("POST", f"/api/messages/{MESSAGE}/feedbacks", {"rating": None, "content": 5}, "content"),
    (
        "POST",
        f"/api/messages/{MESSAGE}/feedbacks",
        {"rating": "like", "content": "x" * 2001},
        "2,000",
    ),
    ("GET", "/api/messages/nope/suggested", None, "message_id"),
    ("POST", "/api/text-to-audio", {}, "message_id or text"),
    ("POST", "/api/text-to-audio", {"voice": "alloy"}, "message_id or text"),
    ("POST", "/api/text-to-audio", {"message_id": "nope"}, "message_id"),
    ("POST", "/api/text-to-audio", {"text": "   "}, "text"),
    ("POST", "/api/text-to-audio", {"text": ["hi"]}, "text"),
    ("POST", "/api/text-to-audio", {"text": "x" * 32_001}, "32,000"),
    ("POST", "/api/text-to-audio", {"text": "hi", "voice": "v" * 101}, "voice"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "names"),
    BAD_REQUESTS,
    ids=[f"{m} {p[:60]} {json.dumps(b)[:30]}" for m, p, b, _ in BAD_REQUESTS],
)
def test_a_bad_value_is_a_400_naming_it_and_never_reaches_dify(
    client, auth, requests_mock, method, path, body, names
):
    kwargs = {"json": body} if body is not None else {}
    response = client.open(path, method=method, headers=auth, **kwargs)
    assert response.status_code == 400
    assert response.json["code"] == "invalid_param"
    assert response.json["status"] == 400
    assert names in response.json["message"]
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("limit", ["1", "100"])
def test_limit_accepts_1_and_100(client, auth, dify, limit):
    response = client.get(f"/api/conversations?limit={limit}", headers=auth)
    assert response.status_code == 200
    assert dify.query["limit"] == [limit]


@pytest.mark.parametrize("sort_by", ["created_at", "-created_at", "updated_at", "-updated_at"])
def test_sort_by_accepts_difys_four_orders(client, auth, dify, sort_by):
    response = client.get(f"/api/conversations?sort_by={sort_by}", headers=auth)
    assert response.status_code == 200
    assert dify.query["sort_by"] == [sort_by]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/api/conversations/{CONVERSATION}/name"),
        ("PUT", f"/api/conversations/{CONVERSATION}/variables/{VARIABLE}"),
        ("POST", f"/api/messages/{MESSAGE}/feedbacks"),
        ("POST", "/api/text-to-audio"),
    ],
)
def test_a_json_route_refuses_a_body_that_is_not_json_with_415(
    client, auth, requests_mock, method, path
):
    response = client.open(path, method=method, data="rating=like", headers=auth)
    assert response.status_code == 415
    assert requests_mock.call_count == 0


BAD_UPLOADS = [  # (form, what the message names); a file is (content, filename)
    ({"other": (b"x", "a.txt")}, "file is required"),
    ({"file": "just text"}, "file is required"),
    ({"file": [(b"a", "a.txt"), (b"b", "b.txt")]}, "exactly one"),
    ({"file": (b"a", "a.txt"), "extra": (b"b", "b.txt")}, "exactly one"),
    ({"file": (b"a", "")}, "filename"),
    ({"file": (b"a", "x" * 256 + ".txt")}, "255"),
]


def form_data(form: dict[str, Any]) -> dict[str, Any]:
    """Fresh file objects for the test client, which closes the ones it sends."""

    def fresh(value: Any) -> Any:
        if isinstance(value, list):
            return [fresh(v) for v in value]
        if isinstance(value, tuple):
            return (io.BytesIO(value[0]), value[1])
        return value

    return {name: fresh(value) for name, value in form.items()}


@pytest.mark.parametrize("path", ["/api/files/upload", "/api/audio-to-text"])
@pytest.mark.parametrize(
    ("data", "names"),
    BAD_UPLOADS,
    ids=["no file", "file as text", "two files", "a second file field", "no name", "long name"],
)
def test_a_bad_upload_is_a_400_and_never_reaches_dify(
    client, auth, requests_mock, path, data, names
):
    response = client.post(
        path, data=form_data(data), content_type="multipart/form-data", headers=auth
    )
    assert response.status_code == 400
    assert names in response.json["message"]
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("path", ["/api/files/upload", "/api/audio-to-text"])
def test_an_upload_that_is_not_multipart_is_a_415(client, auth, requests_mock, path):
    response = client.post(path, json={"file": "aGVsbG8="}, headers=auth)
    assert (response.status_code, response.json["code"]) == (415, "unsupported_media_type")
    assert requests_mock.call_count == 0


TRAVERSALS = [
    ("DELETE", "/api/conversations/..%2F..%2Fchat-messages"),
    ("DELETE", "/api/conversations/%2e%2e"),
    ("DELETE", "/api/conversations/%2E%2E%2Fparameters"),
    ("DELETE", "/api/conversations/a%2Fb"),
    ("DELETE", "/api/conversations/%252e%252e%252f"),
    ("POST", "/api/conversations/..%2Fx/name"),
    ("POST", "/api/conversations/%2e%2e/name"),
    ("POST", "/api/chat/..%2F..%2Fconversations/stop"),
    ("POST", "/api/chat/%2e%2e/stop"),
    ("GET", "/api/messages/..%2F..%2Fparameters/suggested"),
    ("GET", "/api/messages/%2e%2e/suggested"),
    ("POST", "/api/messages/x%5C..%5C/feedbacks"),
    ("GET", "/api/conversations/..%2F..%2Fparameters/variables"),
    ("PUT", f"/api/conversations/{CONVERSATION}/variables/..%2F..%2F..%2Fparameters"),
    ("GET", "/api/conversations?last_id=..%2F..%2Fx"),
    ("GET", "/api/messages?conversation_id=%2e%2e%2F"),
]


@pytest.mark.parametrize(("method", "path"), TRAVERSALS, ids=[p for _, p in TRAVERSALS])
def test_a_path_traversal_attempt_is_refused_and_never_reaches_dify(
    client, auth, requests_mock, method, path
):
    response = client.open(path, method=method, headers=auth, json={"rating": "like"})
    assert response.status_code in (400, 404, 405)
    assert requests_mock.call_count == 0


@pytest.mark.parametrize(
    "path", ["/conversations/../chat-messages", "/conversations/a%2Fb", "/messages?x=1", "/"]
)
def test_the_dify_client_refuses_an_unsafe_path(settings, requests_mock, path):
    with pytest.raises(ValueError):
        Dify(settings).call("GET", path)
    assert requests_mock.call_count == 0


# --- file preview: only the uploader's files --------------------------------------------------

FILE = UPLOADED["id"]
PREVIEW = f"/api/files/{FILE}/preview"
BOB = "5a1d3c2e-8f7b-4c6d-9e0a-1b2c3d4e5f60"
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 256


def owners(app):
    return app.extensions["dify_proxy.owners"]


@pytest.fixture
def difys_file(requests_mock):
    """Dify's preview of FILE, with the head Dify sends for a PDF."""
    return requests_mock.get(
        f"{DIFY_URL}/files/{FILE}/preview",
        content=PDF,
        headers={
            "Content-Type": "application/pdf",
            "Content-Length": str(len(PDF)),
            "Cache-Control": "public, max-age=3600",
        },
    )


def test_an_upload_binds_the_files_id_to_the_uploader(app, client, auth, dify):
    client.post("/api/files/upload", data=upload_data(), headers=auth)
    assert owners(app).owner_of("file", FILE) == USER


def test_an_upload_dify_refuses_binds_nothing(app, client, auth, requests_mock):
    error = {"code": "unsupported_file_type", "message": "File type not allowed.", "status": 415}
    requests_mock.post(f"{DIFY_URL}/files/upload", status_code=415, json=error)
    client.post("/api/files/upload", data=upload_data(), headers=auth)
    assert owners(app).owner_of("file", FILE) is None


def test_an_uploaded_file_is_previewed_as_dify_streams_it(client, auth, dify, difys_file):
    client.post("/api/files/upload", data=upload_data(), headers=auth)
    response = client.get(PREVIEW, headers=auth)
    assert response.status_code == 200
    assert response.is_streamed
    assert response.get_data() == PDF
    assert response.headers["Content-Type"] == "application/pdf"
    assert response.headers["Content-Length"] == str(len(PDF))
    assert parse_qs(urlsplit(difys_file.last_request.url).query) == {"user": [USER]}
    assert difys_file.last_request.headers["Accept-Encoding"] == "identity"


def test_a_previews_download_headers_pass_through(app, client, auth, requests_mock):
    owners(app).bind("file", FILE, USER)
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": "attachment; filename*=UTF-8''page.html",
        "X-Content-Type-Options": "nosniff",
        "Accept-Ranges": "bytes",
        "X-Version": "1.16.1",
    }
    requests_mock.get(f"{DIFY_URL}/files/{FILE}/preview", content=b"<p>", headers=headers)
    response = client.get(PREVIEW, headers=auth)
    assert {k: response.headers.get(k) for k in headers} == {**headers, "X-Version": None}


def test_a_preview_may_be_cached_by_the_browser_but_by_no_shared_cache(
    app, client, auth, difys_file
):
    owners(app).bind("file", FILE, USER)
    assert client.get(PREVIEW, headers=auth).headers["Cache-Control"] == "private, max-age=3600"


@pytest.mark.parametrize("value", ["true", "false"])
def test_as_attachment_is_forwarded(app, client, auth, difys_file, value):
    owners(app).bind("file", FILE, USER)
    client.get(f"{PREVIEW}?as_attachment={value}", headers=auth)
    query = parse_qs(urlsplit(difys_file.last_request.url).query)
    assert query == {"as_attachment": [value], "user": [USER]}


@pytest.mark.parametrize("value", ["yes", "1", "TRUE", "on"])
def test_an_as_attachment_other_than_true_or_false_is_a_400(app, client, auth, difys_file, value):
    owners(app).bind("file", FILE, USER)
    response = client.get(f"{PREVIEW}?as_attachment={value}", headers=auth)
    assert (response.status_code, response.json["code"]) == (400, "invalid_param")
    assert "as_attachment" in response.json["message"]
    assert difys_file.call_count == 0


def test_another_users_file_is_a_404_like_an_unknown_one_and_never_reaches_dify(
    app, client, auth, difys_file
):
    owners(app).bind("file", FILE, BOB)
    someone_elses = client.get(PREVIEW, headers=auth)
    unknown = client.get("/api/files/0b6f5d2c-4e3a-4f1b-9c8d-7a6e5f4d3c2b/preview", headers=auth)
    assert someone_elses.status_code == unknown.status_code == 404
    assert someone_elses.get_data() == unknown.get_data()
    assert difys_file.call_count == 0


def test_a_preview_needs_a_session(app, client, difys_file):
    owners(app).bind("file", FILE, USER)
    assert client.get(PREVIEW).status_code == 401
    assert difys_file.call_count == 0


def test_a_file_id_that_is_not_a_uuid_is_a_400(client, auth, requests_mock):
    response = client.get("/api/files/..%2F..%2Fparameters/preview", headers=auth)
    assert response.status_code in (400, 404)
    response = client.get("/api/files/nope/preview", headers=auth)
    assert (response.status_code, response.json["code"]) == (400, "invalid_param")
    assert requests_mock.call_count == 0


def test_difys_404_for_a_file_no_message_carries_passes_through(app, client, auth, requests_mock):
    owners(app).bind("file", FILE, USER)
    error = {
        "code": "file_not_found",
        "message": "File not found in message context",
        "status": 404,
    }
    requests_mock.get(f"{DIFY_URL}/files/{FILE}/preview", status_code=404, json=error)
    response = client.get(PREVIEW, headers=auth)
    assert (response.status_code, response.json) == (404, error)


# --- a question names only the asker's uploads -------------------------------------------------


def local_file(file_id: str) -> dict[str, str]:
    return {"type": "document", "transfer_method": "local_file", "upload_file_id": file_id}


@pytest.fixture
def dify_chat(requests_mock):
    return requests_mock.post(f"{DIFY_URL}/chat-messages", json={"event": "message", "answer": ""})


def ask(client, auth, **body):
    return client.post(
        "/api/chat", json={"message": "read", "response_mode": "blocking", **body}, headers=auth
    )


@pytest.mark.parametrize(
    "body",
    [
        {"files": [local_file(FILE)]},
        {"inputs": {"report": local_file(FILE)}},
        {"inputs": {"reports": [local_file(FILE)]}},
    ],
    ids=["files", "file input", "file list input"],
)
def test_a_question_may_name_the_askers_own_upload(app, client, auth, dify_chat, body):
    owners(app).bind("file", FILE, USER)
    assert ask(client, auth, **body).status_code == 200
    sent = dify_chat.last_request.json()
    assert {k: sent[k] for k in body} == body


@pytest.mark.parametrize(
    "body",
    [
        {"files": [local_file(FILE)]},
        {"inputs": {"report": local_file(FILE)}},
        {"inputs": {"reports": [local_file(MESSAGE), local_file(FILE)]}},
    ],
    ids=["files", "file input", "file list input"],
)
def test_a_question_naming_another_users_upload_is_a_400_and_never_reaches_dify(
    app, client, auth, dify_chat, body
):
    """Dify would take it (it checks only that the file is the app's) and let the model read
    another user's file."""
    owners(app).bind("file", FILE, BOB)
    owners(app).bind("file", MESSAGE, USER)
    response = ask(client, auth, **body)
    assert (response.status_code, response.json["code"]) == (400, "invalid_param")
    assert "upload_file_id" in response.json["message"]
    assert dify_chat.call_count == 0


def test_another_users_upload_and_an_unknown_one_get_the_same_400(app, client, auth, dify_chat):
    owners(app).bind("file", FILE, BOB)
    someone_elses = ask(client, auth, files=[local_file(FILE)])
    unknown = ask(client, auth, files=[local_file(VARIABLE)])
    assert someone_elses.get_data() == unknown.get_data()


def test_files_given_by_url_need_no_upload(client, auth, dify_chat):
    remote = {"type": "image", "transfer_method": "remote_url", "url": "https://x.test/a.png"}
    assert ask(client, auth, files=[remote]).status_code == 200


# --- uploads over the limit -------------------------------------------------------------------


def test_an_upload_over_max_upload_bytes_is_a_413_and_never_reaches_dify(
    client, auth, requests_mock
):
    data = upload_data(content=b"x" * (UPLOAD_LIMIT + 1))
    response = client.post("/api/files/upload", data=data, headers=auth)
    assert (response.status_code, response.json["code"]) == (413, "request_too_large")
    assert requests_mock.call_count == 0


def test_an_upload_without_content_length_is_cut_off_at_max_upload_bytes(
    client, auth, requests_mock
):
    body = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        + b"x" * (UPLOAD_LIMIT + 1)
        + b"\r\n--B--\r\n"
    )
    response = client.post(
        "/api/files/upload",
        input_stream=io.BytesIO(body),
        content_type="multipart/form-data; boundary=B",
        headers=auth,
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn says of chunked bodies
    )
    assert (response.status_code, response.json["code"]) == (413, "request_too_large")
    assert requests_mock.call_count == 0


def test_an_upload_just_under_max_upload_bytes_is_accepted(client, auth, dify):
    data = upload_data(content=b"x" * (UPLOAD_LIMIT - 1024))
    assert client.post("/api/files/upload", data=data, headers=auth).status_code == 201


def test_other_routes_keep_the_one_megabyte_body_limit(client, auth, requests_mock):
    body = {"rating": "like", "content": "x" * 1_100_000}
    response = client.post(f"/api/messages/{MESSAGE}/feedbacks", json=body, headers=auth)
    assert response.status_code == 413
    assert requests_mock.call_count == 0


# --- the app-info cache -----------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(api, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def parameters(requests_mock):
    return requests_mock.get(f"{DIFY_URL}/parameters", json={"opening_statement": "Hi"})


def test_a_second_app_info_request_within_the_ttl_makes_no_dify_call(
    client, auth, clock, parameters
):
    first = client.get("/api/parameters", headers=auth)
    clock[0] += 59
    second = client.get("/api/parameters", headers=auth)
    assert parameters.call_count == 1
    assert first.json == second.json == {"opening_statement": "Hi"}
    assert second.content_type == "application/json"


def test_app_info_is_fetched_again_once_the_ttl_has_passed(client, auth, clock, parameters):
    client.get("/api/parameters", headers=auth)
    clock[0] += 60
    client.get("/api/parameters", headers=auth)
    assert parameters.call_count == 2


def test_each_app_info_path_is_cached_on_its_own(client, auth, clock, requests_mock):
    for name in APP_INFO:
        requests_mock.get(f"{DIFY_URL}/{name}", json={"name": name})
    answers = [client.get(f"/api/{name}", headers=auth).json for name in APP_INFO * 2]
    assert answers == [{"name": name} for name in APP_INFO * 2]
    assert requests_mock.call_count == len(APP_INFO)


def test_an_app_info_error_is_not_cached(client, auth, clock, requests_mock):
    requests_mock.get(
        f"{DIFY_URL}/info",
        [{"status_code": 500, "text": "oops"}, {"json": {"name": "App"}}],
    )
    assert client.get("/api/info", headers=auth).status_code == 502
    assert client.get("/api/info", headers=auth).json == {"name": "App"}
    assert requests_mock.call_count == 2


def test_a_cached_app_info_answer_still_needs_a_session(client, auth, clock, parameters):
    client.get("/api/parameters", headers=auth)
    assert client.get("/api/parameters").status_code == 401


def test_an_app_info_ttl_of_zero_turns_the_cache_off(settings, clock, requests_mock):
    app = create_app(dataclasses.replace(settings, app_info_ttl=0))
    meta = requests_mock.get(f"{DIFY_URL}/meta", json={"tool_icons": {}})
    headers = {"Authorization": f"Bearer {tokens.hs256()}"}
    for _ in range(2):
        app.test_client().get("/api/meta", headers=headers)
    assert meta.call_count == 2


# --- runs only their owner can touch ----------------------------------------------------------

OTHER_TASK = "d4e5f607-1829-4b3c-8d4e-5f6071829304"


def test_stopping_another_users_task_is_a_404_and_never_reaches_dify(app, client, dify):
    app.extensions["dify_proxy.owners"].bind("task", OTHER_TASK, "someone-else")
    response = client.post(
        f"/api/chat/{OTHER_TASK}/stop", headers={"Authorization": f"Bearer {tokens.hs256()}"}
    )
    assert response.status_code == 404
    assert response.get_json() == {"code": "not_found", "message": "Task not found.", "status": 404}
    assert dify.count == 0


def test_another_users_task_and_an_unknown_one_get_the_same_answer(app, client, dify):
    app.extensions["dify_proxy.owners"].bind("task", OTHER_TASK, "someone-else")
    auth = {"Authorization": f"Bearer {tokens.hs256()}"}
    theirs = client.post(f"/api/chat/{OTHER_TASK}/stop", headers=auth)
    unknown = client.post("/api/chat/e5f60718-293a-4c4d-9e5f-60718293a4b5/stop", headers=auth)
    assert (theirs.status_code, theirs.data) == (unknown.status_code, unknown.data)
    assert dify.count == 0


def test_the_owner_of_a_task_stops_it_at_dify(client, auth, dify):
    response = client.post(f"/api/chat/{TASK}/stop", headers=auth)
    assert response.status_code == 200
    assert (dify.path, dify.json) == (f"/v1/chat-messages/{TASK}/stop", {"user": USER})
