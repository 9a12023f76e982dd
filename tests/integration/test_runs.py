"""Runs that pause for a person, workflow and completion apps, under real gunicorn against the
stand-in (which answers as Dify 1.16.1 does, user checks and their absence included), and a
real redis-server where two instances share who owns what.

The stand-in's app is picked by the key the proxy is given: the plain key is a chatflow, with
`-workflow` a workflow app, with `-completion` a completion app (dify_proxy/standin/apps.py).
"""

from __future__ import annotations

import socket

import pytest
import requests

from tests.integration.conftest import DIFY_KEY
from tests.support import tokens
from tests.support.sse_client import read_stream

SSE = {"Accept": "text/event-stream"}
ALICE = "5b1f0c2e-1111-4a6f-9d3e-0a1b2c3d4e5f"
BOB = "6c2e1d3f-2222-4b7a-8e4f-1b2c3d4e5f60"
# The answer after the form: long and slow enough to be cut in the middle.
RESUMED = {"events": 12, "interval": 0.15, "text": "word "}


def auth(sub: str = ALICE, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.hs256(sub=sub)}", **headers}


def ask_paused(proxy, sub: str = ALICE, forms: int = 1, **knobs) -> list[dict]:
    """A chatflow question that stops at a Human Input node; the stream's events."""
    body = {"message": "please approve", "inputs": {"_standin": {"human_input": forms, **knobs}}}
    response = requests.post(
        f"{proxy.url}/api/chat", json=body, headers=auth(sub), stream=True, timeout=30
    )
    assert response.status_code == 200
    return read_stream(response).data()


def form_of(events: list[dict]) -> tuple[str, str, str]:
    """The form token, run id and task id a paused answer carried."""
    (asked,) = [e for e in events if e["event"] == "human_input_required"]
    return asked["data"]["form_token"], asked["workflow_run_id"], asked["task_id"]


def answer_form(proxy, token: str, sub: str = ALICE, headers: dict | None = None, **body):
    body = {"action": "approve", "inputs": {"comment": "looks good"}, **body}
    return requests.post(
        f"{proxy.url}/api/form/human_input/{token}",
        json=body,
        headers=auth(sub, **(headers or {})),
        stream=True,
        timeout=30,
    )


def text_of(*parts) -> str:
    return "".join(
        d.get("answer", "") for part in parts for d in part.data() if d["event"] == "message"
    )


def cut(response) -> None:
    response.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    response.close()


def calls_to(standin, fragment: str) -> list[dict]:
    return [c for c in standin.calls() if fragment in c["path"]]


# --- a paused chatflow answer ----------------------------------------------------------------


def test_a_paused_chatflow_answer_ends_with_workflow_paused_no_error_and_no_stop(proxy, standin):
    events = ask_paused(proxy)
    assert [e["event"] for e in events][-2:] == ["human_input_required", "workflow_paused"]
    assert not any(e["event"] == "error" for e in events)
    # The proxy's reader would ask for a stop right after the stream; a request that comes after
    # it (the form) shows the reader is through.
    token, _, _ = form_of(events)
    requests.get(f"{proxy.url}/api/form/human_input/{token}", headers=auth(), timeout=10)
    assert standin.stops() == []
    assert '"end": "paused"' in proxy.log()


def test_the_form_is_fetched_and_answered_through_the_proxy_and_the_answer_comes_whole(
    proxy, standin
):
    token, run_id, _ = form_of(ask_paused(proxy, **RESUMED))
    form = requests.get(f"{proxy.url}/api/form/human_input/{token}", headers=auth(), timeout=10)
    assert form.status_code == 200
    assert [a["id"] for a in form.json()["user_actions"]] == ["approve", "reject"]

    rest = read_stream(answer_form(proxy, token, headers=SSE))

    assert text_of(rest) == RESUMED["text"] * RESUMED["events"]
    assert [d["event"] for d in rest.data()][-2:] == ["message_end", "workflow_finished"]
    assert rest.ended
    (submitted,) = [c for c in calls_to(standin, "/form/human_input/") if c["method"] == "POST"]
    assert submitted["json"]["user"] == ALICE
    (followed,) = calls_to(standin, "/events")
    assert f"user={ALICE}" in followed["query"]


def test_a_resumed_answer_cut_midway_comes_whole_after_a_reconnect(start_proxy, standin):
    proxy = start_proxy(RESUME_GRACE="10")
    token, _, _ = form_of(ask_paused(proxy, **RESUMED))
    response = answer_form(proxy, token, headers=SSE)
    first = read_stream(response, until=lambda r: len(r.data()) >= 4)
    cut(response)

    reconnect = answer_form(proxy, token, headers={**SSE, "Last-Event-ID": first.ids()[-1]})
    rest = read_stream(reconnect)

    assert text_of(first, rest) == RESUMED["text"] * RESUMED["events"]
    assert rest.data()[-1]["event"] == "workflow_finished"
    assert len([c for c in calls_to(standin, "/form/") if c["method"] == "POST"]) == 1
    assert standin.stops() == []


def test_a_json_client_gets_difys_empty_object_and_then_follows_the_run(proxy, standin):
    token, run_id, _ = form_of(ask_paused(proxy))
    answered = answer_form(proxy, token)
    assert (answered.status_code, answered.json()) == (200, {})
    followed = requests.get(
        f"{proxy.url}/api/workflow/{run_id}/events", headers=auth(), stream=True, timeout=30
    )
    assert followed.status_code == 200
    assert read_stream(followed).data()[-1]["event"] == "workflow_finished"


def test_a_form_answered_twice_gets_difys_412(proxy, standin):
    token, _, _ = form_of(ask_paused(proxy))
    assert answer_form(proxy, token).status_code == 200
    again = answer_form(proxy, token)
    assert again.status_code == 412
    assert again.json()["code"] == "human_input_form_submitted"


def test_a_bad_action_gets_difys_400(proxy, standin):
    token, _, _ = form_of(ask_paused(proxy))
    refused = answer_form(proxy, token, action="maybe")
    assert refused.status_code == 400
    assert refused.json()["code"] == "invalid_form_data"


def test_a_run_with_two_forms_pauses_again_and_its_next_form_is_the_users(proxy, standin):
    token, run_id, _ = form_of(ask_paused(proxy, forms=2))
    again = read_stream(answer_form(proxy, token, headers=SSE))
    assert again.data()[-1]["event"] == "workflow_paused"
    assert not any(d["event"] == "error" for d in again.data())
    next_token = form_of(again.data())[0]
    assert next_token != token
    bob = requests.get(
        f"{proxy.url}/api/form/human_input/{next_token}", headers=auth(BOB), timeout=10
    )
    assert bob.status_code == 404
    last = read_stream(answer_form(proxy, next_token, headers=SSE))
    assert last.data()[-1]["event"] == "workflow_finished"


# --- only the owner ----------------------------------------------------------------------------


def test_another_users_ids_get_404_and_never_reach_dify(proxy, standin):
    token, run_id, task_id = form_of(ask_paused(proxy))
    before = len(standin.calls())
    tries = [
        ("POST", f"/api/chat/{task_id}/stop", None),
        ("GET", f"/api/form/human_input/{token}", None),
        ("POST", f"/api/form/human_input/{token}", {"action": "approve", "inputs": {}}),
        ("GET", f"/api/workflow/{run_id}/events", None),
        ("GET", f"/api/workflows/run/{run_id}", None),
    ]
    for method, path, body in tries:
        response = requests.request(
            method, proxy.url + path, json=body, headers=auth(BOB), timeout=10
        )
        assert response.status_code == 404, path
        assert response.json()["code"] == "not_found", path
    assert standin.calls()[before:] == []
    # and the run is still Alice's to finish
    assert answer_form(proxy, token).status_code == 200


def test_the_owner_sees_the_paused_run_and_stops_it(proxy, standin):
    token, run_id, task_id = form_of(ask_paused(proxy))
    detail = requests.get(f"{proxy.url}/api/workflows/run/{run_id}", headers=auth(), timeout=10)
    assert detail.json()["status"] == "paused"
    stopped = requests.post(f"{proxy.url}/api/chat/{task_id}/stop", headers=auth(), timeout=10)
    assert stopped.json() == {"result": "success"}


# --- workflow and completion apps ------------------------------------------------------------


@pytest.fixture
def workflow_proxy(start_proxy):
    return start_proxy(DIFY_API_KEY=f"{DIFY_KEY}-workflow")


def run_workflow(proxy, sub: str = ALICE, **knobs):
    body = {"inputs": {"text": "hello workflow", "_standin": knobs}}
    return requests.post(
        f"{proxy.url}/api/workflows/run", json=body, headers=auth(sub), stream=True, timeout=30
    )


def test_a_workflow_app_streams_and_shows_its_run_detail(workflow_proxy, standin):
    received = read_stream(run_workflow(workflow_proxy))
    kinds = [d["event"] for d in received.data()]
    assert kinds[0] == "workflow_started" and kinds[-1] == "workflow_finished"
    assert "text_chunk" in kinds and "message" not in kinds
    run_id = received.data()[0]["workflow_run_id"]
    detail = requests.get(
        f"{workflow_proxy.url}/api/workflows/run/{run_id}", headers=auth(), timeout=10
    )
    assert detail.json()["status"] == "succeeded"
    assert (standin.chats(), standin.stops()) == ([], [])


def test_a_workflow_run_is_stopped_by_its_owner_only(workflow_proxy, standin):
    response = run_workflow(workflow_proxy, events=40, interval=0.1)
    first = read_stream(response, until=lambda r: len(r.data()) >= 1)
    task_id = first.data()[0]["task_id"]
    bob = requests.post(
        f"{workflow_proxy.url}/api/workflows/tasks/{task_id}/stop", headers=auth(BOB), timeout=10
    )
    assert bob.status_code == 404
    assert calls_to(standin, "/stop") == []
    alice = requests.post(
        f"{workflow_proxy.url}/api/workflows/tasks/{task_id}/stop", headers=auth(), timeout=10
    )
    assert alice.json() == {"result": "success"}
    rest = read_stream(response)
    assert rest.data()[-1]["event"] == "workflow_finished"
    assert rest.data()[-1]["data"]["status"] == "stopped"


def test_a_chat_question_to_a_workflow_app_is_told_which_route_to_use(workflow_proxy, standin):
    response = requests.post(
        f"{workflow_proxy.url}/api/chat", json={"message": "hi"}, headers=auth(), timeout=10
    )
    assert response.status_code == 400
    assert response.json()["code"] == "app_mode_mismatch"
    assert "/api/workflows/run" in response.json()["message"]


def test_a_completion_app_streams(start_proxy, standin):
    proxy = start_proxy(DIFY_API_KEY=f"{DIFY_KEY}-completion")
    response = requests.post(
        f"{proxy.url}/api/completion-messages",
        json={"inputs": {"_standin": {"text": "Once upon a time"}}, "query": "Tell me"},
        headers=auth(),
        stream=True,
        timeout=30,
    )
    received = read_stream(response)
    assert text_of(received) == "Once upon a time"
    assert received.data()[-1]["event"] == "message_end"


# --- two instances, one Redis ------------------------------------------------------------------


def test_a_binding_made_on_one_instance_is_honoured_on_another(start_proxy, standin, redis_server):
    a = start_proxy(REDIS_URL=redis_server.url)
    b = start_proxy(REDIS_URL=redis_server.url)
    token, run_id, _ = form_of(ask_paused(a))
    mine = requests.get(f"{b.url}/api/form/human_input/{token}", headers=auth(), timeout=10)
    assert mine.status_code == 200
    theirs = requests.get(f"{b.url}/api/form/human_input/{token}", headers=auth(BOB), timeout=10)
    assert theirs.status_code == 404
    detail = requests.get(f"{b.url}/api/workflows/run/{run_id}", headers=auth(), timeout=10)
    assert detail.json()["status"] == "paused"
