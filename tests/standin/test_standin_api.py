"""The stand-in's non-chat API: per-user conversations, uploads read as they arrive, and the
call log the proxy's integration tests read."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from dify_proxy.standin import FAKE_AUDIO, start_in_thread

KEY = "app-standin-api-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = (
    b"preamble\r\n--XyZ\r\n"
    b'Content-Disposition: form-data; name="user"\r\n\r\nu-1\r\n'
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="file"; filename="a b.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
    b"line one\r\n--XyNOT a boundary\r\n--Xy"  # delimiter look-alikes in the file
    b"\r\n--XyZ--\r\nepilogue"
)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    url, stop = start_in_thread(KEY)
    yield url
    stop()


@pytest.fixture(autouse=True)
def _reset(base: str) -> None:
    requests.post(base.removesuffix("/v1") + "/_standin/reset", timeout=5)


def calls(base: str) -> list[dict]:
    return requests.get(base.removesuffix("/v1") + "/_standin/calls", timeout=5).json()


def chat(base: str, user: str, conversation_id: str | None = None) -> dict:
    body = {"query": "hello", "inputs": {}, "user": user, "response_mode": "blocking"}
    if conversation_id:
        body["conversation_id"] = conversation_id
    return requests.post(f"{base}/chat-messages", headers=AUTH, json=body, timeout=5).json()


def upload_in_slices(base: str, body: bytes, size: int) -> int:
    """POST `body` as a multipart upload, `size` bytes per TCP segment; returns the status."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(
            b"POST /v1/files/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(0, len(body), size):
            sock.sendall(body[i : i + size])
            time.sleep(0.001)
        return int(sock.makefile("rb").readline().split()[1])


@pytest.mark.parametrize("size", [1, 7, 64, len(BODY)])
def test_an_upload_is_parsed_the_same_however_its_body_is_sliced(base: str, size: int) -> None:
    assert upload_in_slices(base, BODY, size) == 201
    upload = calls(base)[-1]
    assert upload["form"] == {"user": "u-1"}
    expected_size = len(b"line one\r\n--XyNOT a boundary\r\n--Xy")
    assert upload["files"] == [
        {
            "field": "file",
            "filename": "a b.txt",
            "content_type": "text/plain",
            "size": expected_size,
        }
    ]


def test_an_unfinished_multipart_body_is_a_400(base: str) -> None:
    assert upload_in_slices(base, BODY[:60], 60) == 400


def test_an_upload_larger_than_any_json_body_is_counted_and_its_user_recorded(base: str) -> None:
    size = 20 * 1024 * 1024
    response = requests.post(
        f"{base}/files/upload",
        headers=AUTH,
        data={"user": "u-1"},
        files={"file": ("big.bin", b"\0" * size, "application/octet-stream")},
        timeout=30,
    )
    assert response.status_code == 201
    assert response.json()["size"] == size
    upload = calls(base)[-1]
    assert (upload["form"], upload["files"][0]["size"]) == ({"user": "u-1"}, size)


def test_conversations_are_listed_only_for_their_user(base: str) -> None:
    mine = chat(base, "u-1")["conversation_id"]
    chat(base, "u-2")

    def listed(user: str) -> list[str]:
        answer = requests.get(f"{base}/conversations", headers=AUTH, params={"user": user})
        return [c["id"] for c in answer.json()["data"]]

    assert mine in listed("u-1")
    assert mine not in listed("u-2")


@pytest.mark.parametrize(
    "request_for",
    [
        lambda c: ("GET", "/messages", {"params": {"user": "u-2", "conversation_id": c}}),
        lambda c: ("POST", f"/conversations/{c}/name", {"json": {"user": "u-2", "name": "x"}}),
        lambda c: ("DELETE", f"/conversations/{c}", {"json": {"user": "u-2"}}),
    ],
    ids=["messages", "rename", "delete"],
)
def test_another_users_conversation_is_a_404(base: str, request_for) -> None:
    method, path, kwargs = request_for(chat(base, "u-1")["conversation_id"])
    response = requests.request(method, base + path, headers=AUTH, timeout=5, **kwargs)
    assert response.status_code == 404
    assert response.json()["message"] == "Conversation Not Exists."


def test_continuing_another_users_conversation_is_a_404(base: str) -> None:
    conversation_id = chat(base, "u-1")["conversation_id"]
    assert chat(base, "u-2", conversation_id)["message"] == "Conversation Not Exists."


def test_delete_answers_204_without_a_body(base: str) -> None:
    conversation_id = chat(base, "u-1")["conversation_id"]
    response = requests.delete(
        f"{base}/conversations/{conversation_id}", headers=AUTH, json={"user": "u-1"}, timeout=5
    )
    assert (response.status_code, response.content) == (204, b"")


def test_last_id_pages_through_conversations(base: str) -> None:
    ids = [chat(base, "u-1")["conversation_id"] for _ in range(3)]
    params = {"user": "u-1", "limit": 2, "sort_by": "created_at"}
    first = requests.get(f"{base}/conversations", headers=AUTH, params=params).json()
    params["last_id"] = first["data"][-1]["id"]
    second = requests.get(f"{base}/conversations", headers=AUTH, params=params).json()
    assert [c["id"] for c in first["data"] + second["data"]] == ids
    assert (first["has_more"], second["has_more"]) == (True, False)


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "101"}, {"sort_by": "name"}])
def test_a_bad_limit_or_sort_by_is_a_400(base: str, params: dict) -> None:
    response = requests.get(f"{base}/conversations", headers=AUTH, params={"user": "u", **params})
    assert response.status_code == 400


def test_text_to_audio_answers_chunked_audio(base: str) -> None:
    response = requests.post(
        f"{base}/text-to-audio", headers=AUTH, json={"user": "u", "text": "hi"}, timeout=5
    )
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.content == b"".join(FAKE_AUDIO)


# --- conversation variables -------------------------------------------------------------------


def variables(base: str, conversation_id: str, user: str = "u-1", **params) -> requests.Response:
    return requests.get(
        f"{base}/conversations/{conversation_id}/variables",
        headers=AUTH,
        params={"user": user, **params},
        timeout=5,
    )


def set_variable(base: str, conversation_id: str, variable_id: str, body: dict):
    path = f"{base}/conversations/{conversation_id}/variables/{variable_id}"
    return requests.put(path, headers=AUTH, json=body, timeout=5)


def test_a_conversation_has_its_variables_with_values_as_dify_marshals_them(base: str) -> None:
    answer = variables(base, chat(base, "u-1")["conversation_id"]).json()
    assert (answer["limit"], answer["has_more"]) == (20, False)
    assert [(v["name"], v["value_type"], v["value"]) for v in answer["data"]] == [
        ("city", "string", ""),
        ("visits", "number", "0"),
        ("preferences", "object", "{}"),
    ]


def test_variables_page_by_last_id_and_limit_and_filter_by_name(base: str) -> None:
    conversation_id = chat(base, "u-1")["conversation_id"]
    first = variables(base, conversation_id, limit=1).json()
    rest = variables(base, conversation_id, last_id=first["data"][0]["id"]).json()
    named = variables(base, conversation_id, variable_name="visits").json()
    assert (first["has_more"], [v["name"] for v in first["data"]]) == (True, ["city"])
    assert [v["name"] for v in rest["data"]] == ["visits", "preferences"]
    assert [v["name"] for v in named["data"]] == ["visits"]


def test_another_users_conversation_variables_are_a_404(base: str) -> None:
    conversation_id = chat(base, "u-1")["conversation_id"]
    variable_id = variables(base, conversation_id).json()["data"][0]["id"]
    listed = variables(base, conversation_id, user="u-2")
    updated = set_variable(base, conversation_id, variable_id, {"value": "x", "user": "u-2"})
    assert (listed.status_code, updated.status_code) == (404, 404)
    assert updated.json()["message"] == "Conversation Not Exists."


def test_a_variable_is_updated_and_a_value_of_another_type_is_a_400(base: str) -> None:
    conversation_id = chat(base, "u-1")["conversation_id"]
    city = variables(base, conversation_id).json()["data"][0]
    updated = set_variable(base, conversation_id, city["id"], {"value": "Oslo", "user": "u-1"})
    wrong = set_variable(base, conversation_id, city["id"], {"value": 3, "user": "u-1"})
    assert (updated.status_code, updated.json()["value"]) == (200, "Oslo")
    assert variables(base, conversation_id).json()["data"][0]["value"] == "Oslo"
    assert (wrong.status_code, wrong.json()) == (
        400,
        {
            "code": "bad_request",
            "message": "Type mismatch: variable 'city' expects string, but got number type",
            "status": 400,
        },
    )


def test_an_unknown_variable_is_a_404(base: str) -> None:
    conversation_id = chat(base, "u-1")["conversation_id"]
    unknown = "0b6f5d2c-4e3a-4f1b-9c8d-7a6e5f4d3c2b"
    response = set_variable(base, conversation_id, unknown, {"value": "x", "user": "u-1"})
    assert (response.status_code, response.json()["message"]) == (
        404,
        "Conversation Variable Not Exists.",
    )


# --- file preview -----------------------------------------------------------------------------


def upload(base: str, content: bytes, filename: str, kind: str, user: str = "u-1") -> str:
    response = requests.post(
        f"{base}/files/upload",
        headers=AUTH,
        data={"user": user},
        files={"file": (filename, content, kind)},
        timeout=5,
    )
    assert response.status_code == 201
    return response.json()["id"]


def chat_with_file(base: str, user: str, file_id: str) -> None:
    file = {"type": "document", "transfer_method": "local_file", "upload_file_id": file_id}
    body = {"query": "read", "inputs": {}, "user": user, "response_mode": "blocking"}
    requests.post(f"{base}/chat-messages", headers=AUTH, json={**body, "files": [file]}, timeout=5)


def preview(base: str, file_id: str, **params) -> requests.Response:
    return requests.get(f"{base}/files/{file_id}/preview", headers=AUTH, params=params, timeout=5)


def test_a_file_no_message_carries_is_not_previewed(base: str) -> None:
    file_id = upload(base, b"hello", "notes.txt", "text/plain")
    response = preview(base, file_id, user="u-1")
    assert (response.status_code, response.json()["code"]) == (404, "file_not_found")


def test_a_file_in_a_message_is_previewed_for_anyone_as_in_dify(base: str) -> None:
    content = bytes(range(256)) * 1024
    file_id = upload(base, content, "song.mp3", "audio/mpeg")
    chat_with_file(base, "u-1", file_id)
    response = preview(base, file_id, user="someone-else")
    assert response.status_code == 200
    assert response.content == content
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.headers["Content-Length"] == str(len(content))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert "Content-Disposition" not in response.headers


def test_as_attachment_makes_the_preview_a_download(base: str) -> None:
    file_id = upload(base, b"hello", "my notes.txt", "text/plain")
    chat_with_file(base, "u-1", file_id)
    response = preview(base, file_id, as_attachment="true")
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"] == "attachment; filename*=UTF-8''my%20notes.txt"


def test_html_is_always_a_download(base: str) -> None:
    file_id = upload(base, b"<script>1</script>", "page.html", "text/html")
    chat_with_file(base, "u-1", file_id)
    response = preview(base, file_id)
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_site_answers_with_the_keys_real_dify_sends(base: str) -> None:
    """Dify 1.16.1's keys, from ../shared/dify-captures/capture-site.txt."""
    site = requests.get(f"{base}/site", headers=AUTH, timeout=5).json()
    assert set(site) == {
        "title",
        "chat_color_theme",
        "chat_color_theme_inverted",
        "icon_type",
        "icon",
        "icon_background",
        "description",
        "copyright",
        "privacy_policy",
        "input_placeholder",
        "custom_disclaimer",
        "default_language",
        "show_workflow_steps",
        "use_icon_as_answer_icon",
        "icon_url",
    }
