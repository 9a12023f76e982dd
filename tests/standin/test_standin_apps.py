"""The stand-in's app types, picked by the key, and the behaviours no capture shows whole:
several Human Input nodes, following across pauses, pings while paused, stops, completion
apps, conversation variables, file preview, and the call log of the new routes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from dify_proxy.standin import start_in_thread

KEY = "app-standin-apps-key"
KEYS = {
    "advanced-chat": KEY,
    "workflow": KEY + "-workflow",
    "completion": KEY + "-completion",
    "chat": KEY + "-chat",
}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    url, stop = start_in_thread(KEY)
    yield url
    stop()


@pytest.fixture(autouse=True)
def _reset(base: str) -> None:
    requests.post(base.removesuffix("/v1") + "/_standin/reset", timeout=5)


def call(base: str, method: str, path: str, mode: str = "advanced-chat", **kw):
    headers = {"Authorization": f"Bearer {KEYS[mode]}"}
    return requests.request(method, base + path, headers=headers, timeout=10, **kw)


def events(body: bytes) -> list[dict]:
    return [json.loads(b[6:]) for b in body.split(b"\n\n") if b.startswith(b"data: ")]


def kinds(body: bytes) -> list[str]:
    return [e["event"] for e in events(body)]


def calls(base: str) -> list[dict]:
    return requests.get(base.removesuffix("/v1") + "/_standin/calls", timeout=5).json()


def pause(base: str, knobs: dict, user: str = "alice") -> dict:
    body = {"query": "q", "inputs": {"_standin": knobs}, "user": user}
    r = call(base, "POST", "/chat-messages", json={**body, "response_mode": "streaming"})
    return events(r.content)[-1]


def answer(base: str, token: str, action: str = "approve", comment: str = "ok"):
    body = {"inputs": {"comment": comment}, "action": action, "user": "alice"}
    return call(base, "POST", f"/form/human_input/{token}", json=body)


class Follow:
    def __init__(self, base: str, run_id: str, **params: str) -> None:
        self.chunks: list[bytes] = []
        self.response = call(
            base,
            "GET",
            f"/workflow/{run_id}/events",
            params={"user": "alice", **params},
            stream=True,
        )
        self.thread = threading.Thread(target=self.read)
        self.thread.start()

    def read(self) -> None:
        for chunk in self.response.raw.read_chunked():
            self.chunks.append(chunk)  # as they come, for tests that watch the run progress

    def body(self) -> bytes:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return b"".join(self.chunks)


@pytest.mark.parametrize("mode", list(KEYS))
def test_the_key_picks_the_app_that_info_names(base: str, mode: str) -> None:
    assert call(base, "GET", "/info", mode).json()["mode"] == mode
    assert calls(base)[0]["app"] == mode


def test_a_key_of_no_app_is_a_401(base: str) -> None:
    r = requests.get(f"{base}/info", headers={"Authorization": f"Bearer {KEY}-nope"}, timeout=5)
    assert r.status_code == 401


@pytest.mark.parametrize("mode", ["workflow", "completion"])
def test_chat_calls_on_a_non_chat_app_are_400_not_chat_app(base: str, mode: str) -> None:
    body = {"query": "q", "inputs": {}, "user": "u"}
    r = call(base, "POST", "/chat-messages", mode, json=body)
    assert (r.status_code, r.json()["code"]) == (400, "not_chat_app")


def test_workflow_run_on_a_chatflow_is_400_not_workflow_app(base: str) -> None:
    r = call(base, "POST", "/workflows/run", json={"inputs": {"text": "t"}, "user": "u"})
    assert (r.status_code, r.json()["code"]) == (400, "not_workflow_app")


def test_site_answers_for_every_app(base: str) -> None:
    assert call(base, "GET", "/site", "workflow").json()["title"] == "Dify stand-in workflow"


def test_two_human_input_nodes_pause_the_run_twice(base: str) -> None:
    paused = pause(base, {"human_input": 2})
    run_id = paused["workflow_run_id"]
    first = paused["data"]["reasons"][0]
    follow = Follow(base, run_id)
    assert answer(base, first["form_token"]).json() == {}
    body = follow.body()
    assert kinds(body) == [
        "workflow_started",
        "node_started",
        "node_finished",
        "node_started",
        "human_input_required",
        "workflow_paused",
    ]
    second = events(body)[-1]["data"]["reasons"][0]
    assert (second["node_id"], second["form_token"] != first["form_token"]) == ("review_2", True)
    status = call(base, "GET", f"/workflows/run/{run_id}").json()["status"]
    assert status == "paused"
    follow = Follow(base, run_id)
    answer(base, second["form_token"], "reject", "no")
    body = follow.body()
    assert kinds(body)[-2:] == ["message_end", "workflow_finished"]
    assert "".join(e["answer"] for e in events(body) if e["event"] == "message") == "Rejected: no"


def test_continue_on_pause_follows_the_run_across_its_next_pause(base: str) -> None:
    paused = pause(base, {"human_input": 2})
    follow = Follow(base, paused["workflow_run_id"], continue_on_pause="true")
    answer(base, paused["data"]["reasons"][0]["form_token"])
    deadline = time.monotonic() + 5
    while b"workflow_paused" not in b"".join(follow.chunks) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = events(b"".join(follow.chunks))[-1]["data"]["reasons"][0]["form_token"]
    answer(base, second)
    body = follow.body()
    assert kinds(body).count("workflow_started") == 2
    assert kinds(body)[-1] == "workflow_finished"


def test_pings_keep_a_follower_company_while_the_run_waits(base: str) -> None:
    paused = pause(base, {"human_input": 1, "wait_ping_interval": 0.05})
    follow = Follow(base, paused["workflow_run_id"])
    deadline = time.monotonic() + 5
    while len(follow.chunks) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    answer(base, paused["data"]["reasons"][0]["form_token"])
    assert follow.body().startswith(b"event: ping\n\nevent: ping\n\nevent: ping\n\n")


def test_a_resumed_answer_can_be_shaped_by_the_answer_knobs(base: str) -> None:
    paused = pause(base, {"human_input": 1, "text": "one two three", "interval": 0})
    follow = Follow(base, paused["workflow_run_id"])
    answer(base, paused["data"]["reasons"][0]["form_token"])
    deltas = [e["answer"] for e in events(follow.body()) if e["event"] == "message"]
    assert deltas == ["one ", "two ", "three"]


def test_a_stop_while_a_resumed_answer_streams_aborts_it(base: str) -> None:
    paused = pause(base, {"human_input": 1, "events": 100, "interval": 0.5})
    follow = Follow(base, paused["workflow_run_id"])
    answer(base, paused["data"]["reasons"][0]["form_token"])
    deadline = time.monotonic() + 5
    while b'"event":"message"' not in b"".join(follow.chunks) and time.monotonic() < deadline:
        time.sleep(0.02)
    stop = f"/chat-messages/{paused['task_id']}/stop"
    assert call(base, "POST", stop, json={"user": "mallory"}).json() == {"result": "success"}
    finished = events(follow.body())[-1]
    assert (finished["event"], finished["data"]["status"]) == ("workflow_finished", "stopped")


def test_a_strangers_stop_of_a_running_chatflow_changes_nothing(base: str) -> None:
    body = {"query": "q", "inputs": {"_standin": {"events": 3, "interval": 0.2}}, "user": "alice"}
    with call(
        base, "POST", "/chat-messages", json={**body, "response_mode": "streaming"}, stream=True
    ) as r:
        chunks = r.raw.read_chunked()
        next(chunks)
        task_id = json.loads(next(chunks)[6:])["task_id"]
        call(base, "POST", f"/chat-messages/{task_id}/stop", json={"user": "bob"})
        rest = b"".join(chunks)
    assert events(rest)[-1]["data"]["status"] == "succeeded"


def test_paused_forms_events_and_detail_are_in_the_call_log_with_their_task(base: str) -> None:
    paused = pause(base, {"human_input": 1})
    token, run_id = paused["data"]["reasons"][0]["form_token"], paused["workflow_run_id"]
    follow = Follow(base, run_id)
    answer(base, token)
    follow.body()
    log = calls(base)
    assert log[0]["stream_end"] == "paused"
    [events_call] = [c for c in log if c["path"].endswith("/events")]
    assert (events_call["task_id"], events_call["stream_end"]) == (paused["task_id"], "completed")
    [form_call] = [c for c in log if c["path"].startswith("/v1/form/")]
    assert form_call["json"]["user"] == "alice"


def test_a_completion_app_streams_messages_then_message_end(base: str) -> None:
    body = {"inputs": {"text": "x", "_standin": {"text": "a b"}}, "user": "u"}
    r = call(
        base,
        "POST",
        "/completion-messages",
        "completion",
        json={**body, "response_mode": "streaming"},
    )
    got = events(r.content)
    assert [e["event"] for e in got] == ["message", "message", "message_end"]
    assert "conversation_id" not in got[0] and got[0]["answer"] == "a "
    assert got[-1]["metadata"]["usage"]["total_tokens"] > 0


def test_a_blocking_completion_answers_one_json(base: str) -> None:
    body = {"inputs": {"_standin": {"text": "done"}}, "user": "u"}
    r = call(base, "POST", "/completion-messages", "completion", json=body)
    assert (r.json()["mode"], r.json()["answer"]) == ("completion", "done")


def test_a_completion_stop_ends_its_stream_with_message_end(base: str) -> None:
    body = {"inputs": {"_standin": {"events": 50, "interval": 0.5}}, "user": "u"}
    with call(
        base,
        "POST",
        "/completion-messages",
        "completion",
        json={**body, "response_mode": "streaming"},
        stream=True,
    ) as r:
        chunks = r.raw.read_chunked()
        task_id = json.loads(next(chunks)[6:])["task_id"]
        path = f"/completion-messages/{task_id}/stop"
        assert call(base, "POST", path, "completion", json={"user": "u"}).status_code == 200
        rest = b"".join(chunks)
    assert kinds(rest)[-1] == "message_end"


def test_a_workflow_stop_ends_the_run_stopped_for_whoever_asks(base: str) -> None:
    body = {"inputs": {"text": "t", "_standin": {"events": 50, "interval": 0.5}}, "user": "alice"}
    with call(
        base,
        "POST",
        "/workflows/run",
        "workflow",
        json={**body, "response_mode": "streaming"},
        stream=True,
    ) as r:
        chunks = r.raw.read_chunked()
        next(chunks)
        task_id = json.loads(next(chunks)[6:])["task_id"]
        path = f"/workflows/tasks/{task_id}/stop"
        call(base, "POST", path, "workflow", json={"user": "bob"})
        last = events(b"".join(chunks))[-1]
    assert (last["event"], last["data"]["status"]) == ("workflow_finished", "stopped")


def conversation(base: str, user: str = "alice") -> str:
    body = {"query": "q", "inputs": {"_standin": {"text": "a"}}, "user": user}
    return call(base, "POST", "/chat-messages", json=body).json()["conversation_id"]


def test_a_chatflow_conversation_lists_its_variables_for_its_user(base: str) -> None:
    cid = conversation(base)
    got = call(base, "GET", f"/conversations/{cid}/variables", params={"user": "alice"}).json()
    assert [(v["name"], v["value_type"]) for v in got["data"]] == [
        ("topic", "string"),
        ("turns", "number"),
    ]
    other = call(base, "GET", f"/conversations/{cid}/variables", params={"user": "bob"})
    assert (other.status_code, other.json()["code"]) == (404, "not_found")


def test_a_variable_update_is_kept_and_type_checked(base: str) -> None:
    cid = conversation(base)
    path = f"/conversations/{cid}/variables"
    topic = call(base, "GET", path, params={"user": "alice"}).json()["data"][0]
    r = call(base, "PUT", f"{path}/{topic['id']}", json={"value": "cats", "user": "alice"})
    assert r.json()["value"] == "cats"
    assert call(base, "GET", path, params={"user": "alice"}).json()["data"][0]["value"] == "cats"
    wrong = call(base, "PUT", f"{path}/{topic['id']}", json={"value": 3, "user": "alice"})
    assert (wrong.status_code, wrong.json()["code"]) == (400, "bad_request")
    unknown = call(base, "PUT", f"{path}/nope", json={"value": "x", "user": "alice"})
    assert unknown.status_code == 404


def test_a_file_preview_answers_the_uploaded_bytes_under_their_type(base: str) -> None:
    data = bytes(range(256)) * 10
    files = {"file": ("pic.png", data, "image/png")}
    uploaded = call(base, "POST", "/files/upload", files=files, data={"user": "alice"}).json()
    r = call(base, "GET", f"/files/{uploaded['id']}/preview", params={"user": "bob"})
    assert (r.status_code, r.headers["Content-Type"], r.content) == (200, "image/png", data)
    attached = call(base, "GET", f"/files/{uploaded['id']}/preview?as_attachment=true")
    assert attached.headers["Content-Disposition"] == "attachment; filename*=UTF-8''pic.png"


def test_an_unknown_file_preview_is_a_404(base: str) -> None:
    r = call(base, "GET", "/files/00000000-0000-4000-8000-000000000000/preview")
    assert (r.status_code, r.json()["code"]) == (404, "file_not_found")
