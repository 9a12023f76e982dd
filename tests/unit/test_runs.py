"""Human input, following a run, workflow and completion apps, in process against requests-mock:
what reaches Dify (and as whom), what only the id's owner may do, and what passes through.

The event bodies follow real Dify 1.16.1 (../shared/dify-captures/, hitl-* and wf-*)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from dify_proxy import sse
from tests.conftest import DIFY_URL
from tests.support import tokens

USER = tokens.USER_ID
TASK = "ef00f9ca-7c32-46b7-9e0a-8a2e6db0e7f2"
RUN = "13924a7f-b93e-4e89-80c2-6525bb22e834"
CONVERSATION = "0598fd66-1f9a-4506-8edc-577dfde55ff9"
MESSAGE = "c7589335-c494-4fdc-9095-2a3c0e8b8c0f"
TOKEN = "KawXGk6sET2ndcOxyXFfFB"
NEXT_TOKEN = "qVU8EuaWUJcIA1QogXAq1o"
OTHER_RUN = "074f7cb2-4edd-4580-b2a3-1fcf961c17d6"
SSE = {"Content-Type": "text/event-stream; charset=utf-8"}
FORM = {
    "form_content": "Review the question: please approve\n\n{{#$output.comment#}}",
    "inputs": [{"output_variable_name": "comment", "type": "paragraph"}],
    "resolved_default_values": {},
    "user_actions": [{"id": "approve", "title": "Approve", "button_style": "primary"}],
    "expiration_time": 1796702375,
}
SUBMITTED = {
    "code": "human_input_form_submitted",
    "message": "This form has already been submitted by another user, form_id=8664d7a4",
    "status": 412,
}


def event(kind: str, **fields: Any) -> bytes:
    payload = {
        "event": kind,
        "conversation_id": CONVERSATION,
        "message_id": MESSAGE,
        "created_at": 1796615975,
        "task_id": TASK,
        **fields,
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def human_input(token: str = TOKEN) -> bytes:
    data = {"form_token": token, "expiration_time": 1796702375, "node_id": "review"}
    return event("human_input_required", workflow_run_id=RUN, data=data)


def paused(token: str = TOKEN) -> bytes:
    data = {"workflow_run_id": RUN, "reasons": [{"form_token": token}], "status": "paused"}
    return event("workflow_paused", workflow_run_id=RUN, data=data)


STARTED = event("workflow_started", workflow_run_id=RUN, data={"id": RUN, "reason": "initial"})
RESUMED = event("workflow_started", workflow_run_id=RUN, data={"id": RUN, "reason": "resumption"})
ANSWER = event("message", id=MESSAGE, answer="Approved: looks good")
MESSAGE_END = event("message_end", id=MESSAGE, metadata={"usage": {"total_tokens": 5}})
FINISHED = event("workflow_finished", workflow_run_id=RUN, data={"id": RUN, "status": "succeeded"})
PAUSED_CHAT = b"event: ping\n\n" + STARTED + human_input() + paused()
RESUMED_RUN = b"event: ping\n\n" + RESUMED + ANSWER + MESSAGE_END + FINISHED


def info(mode: str) -> dict[str, Any]:
    return {"name": "app", "description": "", "tags": [], "mode": mode, "author_name": "x"}


@pytest.fixture
def settings(settings):
    return dataclasses.replace(settings, rate_limit=None, daily_token_budget=1000)


@pytest.fixture
def owners(app):
    return app.extensions["dify_proxy.owners"]


@pytest.fixture
def mode(requests_mock):
    """The app behind the key: a chatflow unless a test says otherwise."""

    def set_mode(name: str):
        return requests_mock.get(f"{DIFY_URL}/info", json=info(name))

    set_mode("advanced-chat")
    return set_mode


@pytest.fixture
def bob() -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.hs256(sub='bob')}"}


def dify_calls(requests_mock) -> list[str]:
    return [f"{r.method} {urlsplit(r.url).path}" for r in requests_mock.request_history]


def read_stream(response) -> bytes:
    return b"".join(response.response)


def paused_chat(client, auth, requests_mock) -> bytes:
    requests_mock.post(f"{DIFY_URL}/chat-messages", content=PAUSED_CHAT, headers=SSE)
    response = client.post("/api/chat", json={"message": "please approve"}, headers=auth)
    return read_stream(response)


# --- a chatflow that pauses ------------------------------------------------------------------


def test_a_paused_chat_answer_ends_with_workflow_paused_and_no_error_event(
    client, auth, requests_mock
):
    assert paused_chat(client, auth, requests_mock) == PAUSED_CHAT


def test_a_paused_chat_answer_binds_its_task_run_and_form_to_the_user(
    client, auth, requests_mock, owners
):
    paused_chat(client, auth, requests_mock)
    assert owners.owner_of("task", TASK) == USER
    assert owners.owner_of("run", RUN) == USER
    assert owners.lookup("form", TOKEN).extra == RUN


def test_a_blocking_paused_answer_passes_through_and_binds_its_form(
    client, auth, requests_mock, owners
):
    body = {
        "event": "workflow_paused",
        "task_id": TASK,
        "workflow_run_id": RUN,
        "answer": "",
        "data": {"status": "paused", "reasons": [{"form_token": TOKEN}]},
    }
    requests_mock.post(f"{DIFY_URL}/chat-messages", json=body)
    response = client.post(
        "/api/chat", json={"message": "hi", "response_mode": "blocking"}, headers=auth
    )
    assert response.get_json() == body
    assert owners.owner_of("form", TOKEN) == USER


# --- the form ----------------------------------------------------------------------------------


def test_the_owner_fetches_the_form_as_dify_gives_it(client, auth, requests_mock, owners, mode):
    owners.bind("form", TOKEN, USER)
    requests_mock.get(f"{DIFY_URL}/form/human_input/{TOKEN}", json=FORM)
    response = client.get(f"/api/form/human_input/{TOKEN}", headers=auth)
    assert (response.status_code, response.get_json()) == (200, FORM)


def test_a_form_already_answered_is_difys_412_as_dify_says_it(
    client, auth, requests_mock, owners, mode
):
    owners.bind("form", TOKEN, USER)
    requests_mock.get(f"{DIFY_URL}/form/human_input/{TOKEN}", status_code=412, json=SUBMITTED)
    response = client.get(f"/api/form/human_input/{TOKEN}", headers=auth)
    assert (response.status_code, response.get_json()) == (412, SUBMITTED)


def test_submitting_a_form_sends_the_sessions_user_not_the_bodys(
    client, auth, requests_mock, owners, mode
):
    owners.bind("form", TOKEN, USER, extra=RUN)
    submit = requests_mock.post(f"{DIFY_URL}/form/human_input/{TOKEN}", json={})
    response = client.post(
        f"/api/form/human_input/{TOKEN}",
        json={"inputs": {"comment": "ok"}, "action": "approve", "user": "mallory"},
        headers=auth,
    )
    assert (response.status_code, response.get_json()) == (200, {})
    assert submit.last_request.json() == {
        "inputs": {"comment": "ok"},
        "action": "approve",
        "user": USER,
    }


def test_difys_400_for_a_bad_action_passes_through(client, auth, requests_mock, owners, mode):
    owners.bind("form", TOKEN, USER, extra=RUN)
    refused = {"code": "invalid_form_data", "message": "Invalid action: maybe", "status": 400}
    requests_mock.post(f"{DIFY_URL}/form/human_input/{TOKEN}", status_code=400, json=refused)
    response = client.post(f"/api/form/human_input/{TOKEN}", json={"action": "maybe"}, headers=auth)
    assert (response.status_code, response.get_json()) == (400, refused)


@pytest.mark.parametrize(
    ("body", "names"),
    [({}, "action"), ({"action": ""}, "action"), ({"action": "a", "inputs": []}, "inputs")],
)
def test_a_malformed_form_answer_is_a_400_before_dify(
    client, auth, requests_mock, owners, body, names
):
    owners.bind("form", TOKEN, USER, extra=RUN)
    response = client.post(f"/api/form/human_input/{TOKEN}", json=body, headers=auth)
    assert response.status_code == 400 and names in response.get_json()["message"]
    assert requests_mock.call_count == 0


def test_an_sse_client_answering_a_form_reads_the_rest_of_the_answer_on_the_same_request(
    client, auth, requests_mock, owners, mode
):
    owners.bind("form", TOKEN, USER, extra=RUN)
    requests_mock.get(f"{DIFY_URL}/workflow/{RUN}/events", content=RESUMED_RUN, headers=SSE)
    requests_mock.post(f"{DIFY_URL}/form/human_input/{TOKEN}", json={})
    response = client.post(
        f"/api/form/human_input/{TOKEN}",
        json={"action": "approve", "inputs": {"comment": "looks good"}},
        headers={**auth, "Accept": "text/event-stream"},
    )
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events, _ = sse.cut_events(read_stream(response))
    kinds = [sse.event_type(e) for e in events]
    assert kinds == ["ping", "ping", "workflow_started", "message", "message_end"] + [
        "workflow_finished"
    ]
    data_events = [e for e in events if sse.event_type(e) != "ping"]
    assert all(b"\nid: " in e for e in data_events)  # ids: the stream can be resumed


def test_the_run_is_followed_before_the_form_is_answered(client, auth, requests_mock, owners, mode):
    """Opened after the answer, the events of a run that finished at once would be only its
    workflow_finished (hitl-A17): the answer's text would be lost."""
    owners.bind("form", TOKEN, USER, extra=RUN)
    events = requests_mock.get(
        f"{DIFY_URL}/workflow/{RUN}/events", content=RESUMED_RUN, headers=SSE
    )
    requests_mock.post(f"{DIFY_URL}/form/human_input/{TOKEN}", json={})
    response = client.post(
        f"/api/form/human_input/{TOKEN}",
        json={"action": "approve"},
        headers={**auth, "Accept": "text/event-stream"},
    )
    read_stream(response)
    assert dify_calls(requests_mock)[-2:] == [
        f"GET /v1/workflow/{RUN}/events",
        f"POST /v1/form/human_input/{TOKEN}",
    ]
    assert events.last_request.qs == {"user": [USER.lower()]}


def test_an_sse_client_whose_form_dify_refuses_gets_difys_error_as_json(
    client, auth, requests_mock, owners, mode
):
    owners.bind("form", TOKEN, USER, extra=RUN)
    requests_mock.get(f"{DIFY_URL}/workflow/{RUN}/events", content=RESUMED_RUN, headers=SSE)
    requests_mock.post(f"{DIFY_URL}/form/human_input/{TOKEN}", status_code=412, json=SUBMITTED)
    response = client.post(
        f"/api/form/human_input/{TOKEN}",
        json={"action": "approve"},
        headers={**auth, "Accept": "text/event-stream"},
    )
    assert (response.status_code, response.get_json()) == (412, SUBMITTED)


# --- following a run ---------------------------------------------------------------------------


def test_the_owner_follows_a_run_as_themselves(client, auth, requests_mock, owners, mode):
    owners.bind("run", RUN, USER)
    events = requests_mock.get(
        f"{DIFY_URL}/workflow/{RUN}/events", content=RESUMED_RUN, headers=SSE
    )
    response = client.get(f"/api/workflow/{RUN}/events?continue_on_pause=true", headers=auth)
    body = read_stream(response)
    assert events.last_request.qs == {"user": [USER.lower()], "continue_on_pause": ["true"]}
    assert [sse.event_type(e) for e in sse.cut_events(body)[0]][-1] == "workflow_finished"


def test_a_resumed_run_that_pauses_again_ends_cleanly_and_binds_its_next_form(
    client, auth, requests_mock, owners, mode
):
    owners.bind("run", RUN, USER)
    again = b"event: ping\n\n" + RESUMED + human_input(NEXT_TOKEN) + paused(NEXT_TOKEN)
    requests_mock.get(f"{DIFY_URL}/workflow/{RUN}/events", content=again, headers=SSE)
    body = read_stream(client.get(f"/api/workflow/{RUN}/events", headers=auth))
    last = sse.cut_events(body)[0][-1]
    assert sse.event_type(last) == "workflow_paused"
    assert owners.lookup("form", NEXT_TOKEN).user == USER


@pytest.mark.parametrize("value", ["yes", "1"])
def test_a_malformed_flag_is_a_400(client, auth, requests_mock, owners, value):
    owners.bind("run", RUN, USER)
    response = client.get(f"/api/workflow/{RUN}/events?continue_on_pause={value}", headers=auth)
    assert response.status_code == 400
    assert requests_mock.call_count == 0


# --- only the owner ----------------------------------------------------------------------------

NOT_YOURS = [
    ("GET", f"/api/form/human_input/{TOKEN}", "form", TOKEN, "Form not found."),
    ("POST", f"/api/form/human_input/{TOKEN}", "form", TOKEN, "Form not found."),
    ("GET", f"/api/workflow/{RUN}/events", "run", RUN, "Workflow run not found."),
    ("GET", f"/api/workflows/run/{RUN}", "run", RUN, "Workflow run not found."),
    ("POST", f"/api/workflows/tasks/{TASK}/stop", "task", TASK, "Task not found."),
    ("POST", f"/api/completion-messages/{TASK}/stop", "task", TASK, "Task not found."),
    ("POST", f"/api/chat/{TASK}/stop", "task", TASK, "Task not found."),
]


@pytest.mark.parametrize(("method", "path", "kind", "value", "message"), NOT_YOURS)
def test_another_users_id_is_a_404_that_never_reaches_dify(
    client, bob, requests_mock, owners, method, path, kind, value, message
):
    owners.bind(kind, value, USER)
    response = client.open(path, method=method, json={"action": "approve"}, headers=bob)
    assert response.status_code == 404
    assert response.get_json() == {"code": "not_found", "message": message, "status": 404}
    assert requests_mock.call_count == 0


@pytest.mark.parametrize(("method", "path", "kind", "value", "message"), NOT_YOURS)
def test_another_users_id_and_an_unknown_one_are_answered_alike(
    app, client, bob, requests_mock, owners, method, path, kind, value, message
):
    owners.bind(kind, value, USER)
    theirs = client.open(path, method=method, json={"action": "approve"}, headers=bob)
    unknown_path = path.replace(value, OTHER_RUN if kind != "form" else NEXT_TOKEN)
    unknown = client.open(unknown_path, method=method, json={"action": "approve"}, headers=bob)
    assert (theirs.status_code, theirs.data) == (unknown.status_code, unknown.data)


def test_the_owner_sees_the_run_detail(client, auth, requests_mock, owners, mode):
    owners.bind("run", RUN, USER)
    detail = {"id": RUN, "status": "paused", "outputs": {}}
    requests_mock.get(f"{DIFY_URL}/workflows/run/{RUN}", json=detail)
    assert client.get(f"/api/workflows/run/{RUN}", headers=auth).get_json() == detail


# --- workflow apps -----------------------------------------------------------------------------

WF_STARTED = b'data: {"event":"workflow_started","workflow_run_id":"%b","task_id":"%b"}\n\n' % (
    RUN.encode(),
    TASK.encode(),
)
WF_CHUNK = b'data: {"event":"text_chunk","workflow_run_id":"%b","task_id":"%b"}\n\n' % (
    RUN.encode(),
    TASK.encode(),
)
WF_FINISHED = (
    b'data: {"event":"workflow_finished","workflow_run_id":"%b","task_id":"%b",'
    b'"data":{"id":"%b","status":"succeeded","total_tokens":9}}\n\n'
) % (RUN.encode(), TASK.encode(), RUN.encode())


def test_a_workflow_run_streams_as_the_sessions_user_and_counts_its_tokens(
    app, client, auth, requests_mock, owners, mode
):
    mode("workflow")
    run = requests_mock.post(
        f"{DIFY_URL}/workflows/run", content=WF_STARTED + WF_CHUNK + WF_FINISHED, headers=SSE
    )
    response = client.post(
        "/api/workflows/run", json={"inputs": {"text": "hi"}, "user": "mallory"}, headers=auth
    )
    assert read_stream(response) == WF_STARTED + WF_CHUNK + WF_FINISHED
    assert run.last_request.json() == {
        "inputs": {"text": "hi"},
        "response_mode": "streaming",
        "user": USER,
    }
    assert owners.owner_of("task", TASK) == USER and owners.owner_of("run", RUN) == USER
    assert app.extensions["dify_proxy.quotas"].tokens_used(USER) == 9


def test_a_blocking_workflow_run_passes_through_binds_and_counts(
    app, client, auth, requests_mock, owners, mode
):
    mode("workflow")
    body = {
        "task_id": TASK,
        "workflow_run_id": RUN,
        "data": {"id": RUN, "status": "succeeded", "outputs": {"result": "x"}, "total_tokens": 4},
    }
    requests_mock.post(f"{DIFY_URL}/workflows/run", json=body)
    response = client.post(
        "/api/workflows/run", json={"inputs": {}, "response_mode": "blocking"}, headers=auth
    )
    assert response.get_json() == body
    assert owners.owner_of("run", RUN) == USER
    assert app.extensions["dify_proxy.quotas"].tokens_used(USER) == 4


def test_the_owner_stops_a_workflow_task_at_difys_workflow_stop(
    client, auth, requests_mock, owners, mode
):
    mode("workflow")
    owners.bind("task", TASK, USER)
    stop = requests_mock.post(f"{DIFY_URL}/workflows/tasks/{TASK}/stop", json={"result": "success"})
    response = client.post(f"/api/workflows/tasks/{TASK}/stop", headers=auth)
    assert response.get_json() == {"result": "success"}
    assert stop.last_request.json() == {"user": USER}


def test_a_workflow_route_on_a_chat_app_names_the_mode_and_asks_dify_only_for_info(
    client, auth, requests_mock, mode
):
    mode("advanced-chat")
    response = client.post("/api/workflows/run", json={"inputs": {}}, headers=auth)
    assert response.status_code == 400
    assert response.get_json()["code"] == "app_mode_mismatch"
    assert "advanced-chat" in response.get_json()["message"]
    assert "POST /api/chat" in response.get_json()["message"]
    assert dify_calls(requests_mock) == ["GET /v1/info"]


def test_the_apps_mode_is_asked_once_per_process(client, auth, requests_mock, mode):
    info_route = mode("chat")
    for _ in range(3):
        client.post("/api/workflows/run", json={"inputs": {}}, headers=auth)
    assert info_route.call_count == 1


def test_a_chat_question_to_a_workflow_app_names_the_mode(client, auth, requests_mock, mode):
    mode("workflow")
    not_chat = {
        "code": "not_chat_app",
        "message": "Please check if your app mode matches the right API route.",
        "status": 400,
    }
    requests_mock.post(f"{DIFY_URL}/chat-messages", status_code=400, json=not_chat)
    response = client.post("/api/chat", json={"message": "hi"}, headers=auth)
    assert response.status_code == 400
    assert response.get_json()["code"] == "app_mode_mismatch"
    assert "POST /api/workflows/run" in response.get_json()["message"]
    again = client.post("/api/chat", json={"message": "hi"}, headers=auth)
    assert again.get_json()["code"] == "app_mode_mismatch"
    assert dify_calls(requests_mock) == ["POST /v1/chat-messages", "GET /v1/info"]


@pytest.mark.parametrize(
    "body",
    [{"inputs": []}, {"files": {}}, {"response_mode": "fast"}, {"files": ["x"]}],
)
def test_a_malformed_run_is_a_400_before_dify(client, auth, requests_mock, body):
    response = client.post("/api/workflows/run", json=body, headers=auth)
    assert response.status_code == 400
    assert requests_mock.call_count == 0


# --- completion apps ---------------------------------------------------------------------------

COMPLETION = (
    b'data: {"event":"message","task_id":"%b","message_id":"%b","answer":"Hi"}\n\n'
    b'data: {"event":"message_end","task_id":"%b","message_id":"%b",'
    b'"metadata":{"usage":{"total_tokens":3}}}\n\n'
) % (TASK.encode(), MESSAGE.encode(), TASK.encode(), MESSAGE.encode())


def test_a_completion_streams_as_the_sessions_user(client, auth, requests_mock, owners, mode):
    mode("completion")
    send = requests_mock.post(f"{DIFY_URL}/completion-messages", content=COMPLETION, headers=SSE)
    response = client.post(
        "/api/completion-messages", json={"inputs": {"query": "hi"}}, headers=auth
    )
    assert read_stream(response) == COMPLETION
    assert send.last_request.json()["user"] == USER
    assert owners.owner_of("task", TASK) == USER


def test_the_owner_stops_a_completion(client, auth, requests_mock, owners, mode):
    mode("completion")
    owners.bind("task", TASK, USER)
    stop = requests_mock.post(
        f"{DIFY_URL}/completion-messages/{TASK}/stop", json={"result": "success"}
    )
    response = client.post(f"/api/completion-messages/{TASK}/stop", headers=auth)
    assert response.status_code == 200
    assert stop.last_request.json() == {"user": USER}


# --- a paused answer's record, log and metrics --------------------------------------------------


def test_a_paused_answer_resumes_to_the_same_clean_end(client, auth, requests_mock):
    requests_mock.post(f"{DIFY_URL}/chat-messages", content=PAUSED_CHAT, headers=SSE)
    sse_client = {**auth, "Accept": "text/event-stream"}
    first = read_stream(client.post("/api/chat", json={"message": "hi"}, headers=sse_client))
    events = [e for e in sse.cut_events(first)[0] if sse.event_type(e) != "ping"]
    started_id = events[0].rsplit(b"id: ", 1)[1].strip().decode()
    resumed = client.post(
        "/api/chat", json={"message": "hi"}, headers={**sse_client, "Last-Event-ID": started_id}
    )
    assert resumed.status_code == 200
    replayed = sse.cut_events(read_stream(resumed))[0]
    assert [sse.event_type(e) for e in replayed if sse.event_type(e) != "ping"] == [
        "human_input_required",
        "workflow_paused",
    ]
    assert requests_mock.call_count == 1  # Dify was not asked again


def test_a_paused_answer_is_logged_and_counted_as_paused(client, auth, requests_mock, caplog):
    from dify_proxy import metrics

    before = metrics.STREAM_ENDS.labels("paused")._value.get()
    with caplog.at_level("INFO", logger="dify_proxy.access"):
        requests_mock.post(f"{DIFY_URL}/chat-messages", content=PAUSED_CHAT, headers=SSE)
        response = client.post("/api/chat", json={"message": "hi"}, headers=auth)
        read_stream(response)
        response.close()
    ends = [r.fields.get("end") for r in caplog.records if hasattr(r, "fields")]
    assert "paused" in ends
    assert metrics.STREAM_ENDS.labels("paused")._value.get() == before + 1


def test_a_completions_query_is_passed_on(client, auth, requests_mock, mode):
    mode("completion")
    send = requests_mock.post(f"{DIFY_URL}/completion-messages", content=COMPLETION, headers=SSE)
    read_stream(
        client.post("/api/completion-messages", json={"inputs": {}, "query": "Write"}, headers=auth)
    )
    assert send.last_request.json()["query"] == "Write"


def test_a_query_on_a_workflow_run_is_not_sent(client, auth, requests_mock, mode):
    mode("workflow")
    run = requests_mock.post(f"{DIFY_URL}/workflows/run", content=WF_FINISHED, headers=SSE)
    read_stream(client.post("/api/workflows/run", json={"inputs": {}, "query": "x"}, headers=auth))
    assert "query" not in run.last_request.json()


# --- a reloaded page ---------------------------------------------------------------------------


def history(submitted: bool) -> dict[str, Any]:
    """`GET /messages` with a paused answer, as Dify 1.16.1 lists it (hitl-A9)."""
    form = {"form_id": "8664d7a4", "form_token": TOKEN, "expiration_time": 1796702375}
    content = {
        "workflow_run_id": RUN,
        "submitted": submitted,
        "form_definition": form,
        "type": "human_input",
    }
    message = {"id": MESSAGE, "status": "paused", "extra_contents": [content]}
    return {"limit": 20, "has_more": False, "data": [message]}


def test_a_paused_message_in_the_users_history_binds_its_form_and_run(
    client, auth, requests_mock, owners
):
    requests_mock.get(f"{DIFY_URL}/messages", json=history(submitted=False))
    response = client.get(f"/api/messages?conversation_id={CONVERSATION}", headers=auth)
    assert response.get_json() == history(submitted=False)
    assert owners.lookup("form", TOKEN).user == USER
    assert owners.lookup("form", TOKEN).extra == RUN
    assert owners.owner_of("run", RUN) == USER


def test_an_answered_form_in_the_history_binds_nothing(client, auth, requests_mock, owners):
    requests_mock.get(f"{DIFY_URL}/messages", json=history(submitted=True))
    client.get(f"/api/messages?conversation_id={CONVERSATION}", headers=auth)
    assert owners.owner_of("form", TOKEN) is None


def test_a_followed_run_resumes_with_last_event_id_without_asking_dify_again(
    client, auth, requests_mock, owners, mode
):
    owners.bind("run", RUN, USER)
    events = requests_mock.get(
        f"{DIFY_URL}/workflow/{RUN}/events", content=RESUMED_RUN, headers=SSE
    )
    first = sse.cut_events(read_stream(client.get(f"/api/workflow/{RUN}/events", headers=auth)))
    resumed_id = first[0][2].rsplit(b"id: ", 1)[1].strip().decode()  # workflow_started's
    again = client.get(f"/api/workflow/{RUN}/events", headers={**auth, "Last-Event-ID": resumed_id})
    replayed = [sse.event_type(e) for e in sse.cut_events(read_stream(again))[0]]
    assert [kind for kind in replayed if kind != "ping"] == [
        "message",
        "message_end",
        "workflow_finished",
    ]
    assert events.call_count == 1


def test_when_info_fails_too_difys_own_not_chat_app_stands(client, auth, requests_mock):
    not_chat = {"code": "not_chat_app", "message": "Please check.", "status": 400}
    requests_mock.post(f"{DIFY_URL}/chat-messages", status_code=400, json=not_chat)
    requests_mock.get(f"{DIFY_URL}/info", status_code=500, text="oops")
    response = client.post("/api/chat", json={"message": "hi"}, headers=auth)
    assert (response.status_code, response.get_json()["code"]) == (400, "not_chat_app")
