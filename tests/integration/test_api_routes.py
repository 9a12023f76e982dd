"""The /api routes besides /api/chat, through real gunicorn against the Dify stand-in: each
call made as the session's user, uploads streamed through, audio relayed, stop ending a stream."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from dify_proxy.standin import FAKE_AUDIO
from tests.integration.conftest import DIFY_KEY, HEARTBEAT, READ_TIMEOUT, scenario
from tests.support import processes, tokens
from tests.support.sse_client import read_stream

ALICE = tokens.USER_ID
BOB = "5a1d3c2e-8f7b-4c6d-9e0a-1b2c3d4e5f60"
UPLOAD_LIMIT = 24 * 1024 * 1024
BIG_UPLOAD = 20 * 1024 * 1024
NOT_FOUND = {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}


@dataclass
class Api:
    """The proxy as one signed-in user's browser sees it."""

    url: str
    sub: str = ALICE

    def request(
        self, method: str, path: str, headers: dict | None = None, **kwargs
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {tokens.hs256(sub=self.sub)}", **(headers or {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def ask(self, message: str = "hello", conversation_id: str | None = None) -> dict:
        """A blocking chat; Dify's answer carries the conversation and message ids."""
        body = {"message": message, "response_mode": "blocking"}
        if conversation_id:
            body["conversation_id"] = conversation_id
        response = self.request("POST", "/api/chat", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def upload(self, content, filename: str = "notes.txt", path: str = "/api/files/upload"):
        return self.request("POST", path, files={"file": (filename, content, "text/plain")})


@pytest.fixture
def alice(proxy) -> Api:
    return Api(proxy.url, ALICE)


@pytest.fixture
def bob(proxy) -> Api:
    return Api(proxy.url, BOB)


@dataclass
class OneWorker:
    """A proxy with one worker (so its memory and its cache are the ones measured) and room
    for a 20 MB upload."""

    url: str
    master_pid: int

    def worker_pid(self) -> int:
        children = set()
        for path in glob.glob(f"/proc/{self.master_pid}/task/*/children"):
            with open(path) as f:
                children.update(int(pid) for pid in f.read().split())
        assert len(children) == 1, children
        return children.pop()


@pytest.fixture(scope="module")
def one_worker(standin, tmp_path_factory) -> Iterator[OneWorker]:
    env = {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": standin.url,
        "SUPABASE_JWT_SECRET": tokens.SECRET,
        "HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "DIFY_READ_TIMEOUT": str(READ_TIMEOUT),
        "WEB_CONCURRENCY": "1",
        "MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "APP_INFO_TTL": "60",
        "RATE_LIMIT": "10000/minute",
    }
    log_path = tmp_path_factory.mktemp("one-worker") / "gunicorn.log"
    process, url = processes.start_proxy(env, log_path)
    yield OneWorker(url, process.pid)
    processes.stop(process)


def peak_rss_kb(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def calls_to(standin, path: str) -> list[dict]:
    return [c for c in standin.calls() if c["path"] == path]


# --- stop ---------------------------------------------------------------------------------------


def test_stop_ends_a_running_stream_with_message_end(proxy, standin, alice):
    response = proxy.chat(scenario(events=1, end="hang"))
    first = read_stream(response, until=lambda r: bool(r.data_events()), seconds=10)
    task_id = first.data()[0]["task_id"]

    stop = alice.request("POST", f"/api/chat/{task_id}/stop")

    rest = read_stream(response)
    assert (stop.status_code, stop.json()) == (200, {"result": "success"})
    assert rest.ended
    assert rest.data()[-1]["event"] == "message_end"
    assert calls_to(standin, f"/v1/chat-messages/{task_id}/stop")[0]["json"] == {"user": ALICE}


def test_another_users_stop_is_a_404_that_never_reaches_dify(proxy, standin, bob):
    """Dify stops a paused run for whoever asks: the proxy lets only the task's owner ask."""
    response = proxy.chat(scenario(events=1, end="hang"))
    first = read_stream(response, until=lambda r: bool(r.data_events()), seconds=10)
    task_id = first.data()[0]["task_id"]

    stop = bob.request("POST", f"/api/chat/{task_id}/stop")

    rest = read_stream(response, until=lambda r: r.pings() > 0, seconds=10)
    assert not calls_to(standin, f"/v1/chat-messages/{task_id}/stop")
    response.close()  # (which has the proxy stop the task, as Alice)
    assert (stop.status_code, stop.json()["code"]) == (404, "not_found")
    assert not rest.ended
    assert not rest.data()


# --- conversations and messages -----------------------------------------------------------------


def test_a_chats_conversation_is_listed(alice, standin):
    answer = alice.ask("plan a trip")
    listed = alice.request("GET", "/api/conversations", params={"limit": 5})
    assert listed.status_code == 200
    assert [c["id"] for c in listed.json()["data"]] == [answer["conversation_id"]]
    assert calls_to(standin, "/v1/conversations")[0]["query"] == f"limit=5&user={ALICE}"


def test_a_conversation_is_renamed(alice):
    conversation_id = alice.ask()["conversation_id"]
    renamed = alice.request(
        "POST", f"/api/conversations/{conversation_id}/name", json={"name": "Trip plans"}
    )
    listed = alice.request("GET", "/api/conversations").json()["data"]
    assert (renamed.status_code, renamed.json()["name"]) == (200, "Trip plans")
    assert listed[0]["name"] == "Trip plans"


def test_a_deleted_conversation_is_204_and_gone(alice):
    conversation_id = alice.ask()["conversation_id"]
    deleted = alice.request("DELETE", f"/api/conversations/{conversation_id}")
    listed = alice.request("GET", "/api/conversations").json()["data"]
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert conversation_id not in [c["id"] for c in listed]


def test_a_conversations_messages_are_listed_in_order(alice):
    first = alice.ask("first question")
    alice.ask("second question", first["conversation_id"])
    messages = alice.request(
        "GET", "/api/messages", params={"conversation_id": first["conversation_id"]}
    )
    assert messages.status_code == 200
    assert [m["query"] for m in messages.json()["data"]] == ["first question", "second question"]


def test_feedback_is_recorded_on_the_message(alice, standin):
    answer = alice.ask()
    feedback = alice.request(
        "POST",
        f"/api/messages/{answer['message_id']}/feedbacks",
        json={"rating": "like", "content": "Spot on", "user": BOB},
    )
    messages = alice.request(
        "GET", "/api/messages", params={"conversation_id": answer["conversation_id"]}
    ).json()["data"]
    assert (feedback.status_code, feedback.json()) == (200, {"result": "success"})
    assert messages[0]["feedback"] == {"rating": "like"}
    sent = calls_to(standin, f"/v1/messages/{answer['message_id']}/feedbacks")[0]["json"]
    assert sent == {"rating": "like", "content": "Spot on", "user": ALICE}


def test_suggested_questions_follow_a_message(alice):
    message_id = alice.ask()["message_id"]
    suggested = alice.request("GET", f"/api/messages/{message_id}/suggested")
    assert suggested.status_code == 200
    assert suggested.json()["result"] == "success"
    assert len(suggested.json()["data"]) == 3


# --- one user cannot reach another's ------------------------------------------------------------


def test_another_users_conversations_are_not_listed(alice, bob):
    alice.ask()
    assert bob.request("GET", "/api/conversations").json()["data"] == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/messages?conversation_id={id}", None),
        ("POST", "/api/conversations/{id}/name", {"name": "mine now"}),
        ("DELETE", "/api/conversations/{id}", None),
    ],
    ids=["messages", "rename", "delete"],
)
def test_another_users_conversation_is_difys_404(alice, bob, method, path, body):
    conversation_id = alice.ask()["conversation_id"]
    response = bob.request(method, path.format(id=conversation_id), json=body)
    assert (response.status_code, response.json()) == (404, NOT_FOUND)
    assert alice.request("GET", "/api/conversations").json()["data"][0]["id"] == conversation_id


def test_another_users_conversation_cannot_be_continued(alice, bob):
    conversation_id = alice.ask()["conversation_id"]
    response = bob.request(
        "POST",
        "/api/chat",
        json={"message": "hi", "conversation_id": conversation_id, "response_mode": "blocking"},
    )
    assert (response.status_code, response.json()) == (404, NOT_FOUND)


# --- app settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["parameters", "meta", "info"])
def test_app_settings_are_difys(alice, name):
    response = alice.request("GET", f"/api/{name}")
    assert response.status_code == 200
    assert isinstance(response.json(), dict)


def test_parameters_are_cached_within_the_ttl(one_worker, standin):
    api = Api(one_worker.url)
    answers = [api.request("GET", "/api/parameters").json() for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]
    assert len(calls_to(standin, "/v1/parameters")) == 1


# --- files and audio ----------------------------------------------------------------------------


def test_an_upload_is_201_with_the_file_object_and_dify_sees_the_sessions_user(alice, standin):
    response = alice.upload(b"hello world", filename="notes.txt")
    upload = calls_to(standin, "/v1/files/upload")[0]
    assert response.status_code == 201
    assert {k: response.json()[k] for k in ("name", "size", "extension", "mime_type")} == {
        "name": "notes.txt",
        "size": 11,
        "extension": "txt",
        "mime_type": "text/plain",
    }
    assert upload["form"] == {"user": ALICE}


def test_a_20_mb_upload_streams_through_while_the_workers_memory_stays_flat(one_worker, standin):
    api = Api(one_worker.url)
    for size in (1, 5):  # a first upload's one-off allocations are not what is measured
        assert api.upload(b"w" * size * 1024 * 1024).status_code == 201
    worker = one_worker.worker_pid()
    before = peak_rss_kb(worker)

    response = api.upload(os.urandom(BIG_UPLOAD), filename="big.bin")

    grown_kb = peak_rss_kb(worker) - before
    assert response.status_code == 201
    assert response.json()["size"] == BIG_UPLOAD
    assert calls_to(standin, "/v1/files/upload")[-1]["files"][0]["size"] == BIG_UPLOAD
    # Holding the file would raise the peak by 20 MB at least; streamed, it barely moves.
    assert grown_kb * 1024 < BIG_UPLOAD / 5, f"the worker's peak memory grew by {grown_kb} kB"


def test_an_upload_over_max_upload_bytes_is_413_and_never_reaches_dify(one_worker, standin):
    response = Api(one_worker.url).upload(b"x" * UPLOAD_LIMIT)
    assert (response.status_code, response.json()["code"]) == (413, "request_too_large")
    assert calls_to(standin, "/v1/files/upload") == []


def test_a_chunked_upload_is_cut_off_at_max_upload_bytes_with_413(one_worker, standin):
    def body() -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        for _ in range(UPLOAD_LIMIT // 65536 + 1):
            yield b"x" * 65536
        yield b"\r\n--B--\r\n"

    response = Api(one_worker.url).request(
        "POST",
        "/api/files/upload",
        data=body(),  # no length: sent chunked, so only reading it can find it too large
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert (response.status_code, response.json()["code"]) == (413, "request_too_large")
    assert calls_to(standin, "/v1/files/upload") == []


def test_difys_415_for_a_refused_file_type_passes_through(alice):
    response = alice.upload(b"MZ", filename="setup.exe")
    assert (response.status_code, response.json()["code"]) == (415, "unsupported_file_type")


def test_audio_to_text_answers_difys_transcript(alice, standin):
    response = alice.request(
        "POST", "/api/audio-to-text", files={"file": ("memo.mp3", b"ID3audio", "audio/mpeg")}
    )
    assert response.status_code == 200
    assert response.json() == {"text": "Stand-in transcript of memo.mp3 (8 bytes)."}
    assert calls_to(standin, "/v1/audio-to-text")[0]["form"] == {"user": ALICE}


def test_text_to_audio_streams_difys_audio_back(alice, standin):
    response = alice.request("POST", "/api/text-to-audio", json={"text": "Hello"}, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert response.raw.read() == b"".join(FAKE_AUDIO)
    assert calls_to(standin, "/v1/text-to-audio")[0]["json"] == {"text": "Hello", "user": ALICE}
