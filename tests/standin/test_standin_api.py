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
