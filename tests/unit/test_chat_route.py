"""POST /api/chat in-process: validation, the payload Dify gets, and error rendering."""

import json

import pytest

from tests.conftest import DIFY_KEY, DIFY_URL
from tests.support import tokens

CHAT = f"{DIFY_URL}/chat-messages"
CONVERSATION = "3f8e5c1a-9b2d-4e6f-8a7b-1c2d3e4f5a6b"
BLOCKING_ANSWER = {"event": "message", "answer": "Hi!", "conversation_id": CONVERSATION}
STREAM = (
    b'data: {"event":"message","conversation_id":"c","message_id":"m","created_at":1,'
    b'"task_id":"t","answer":"Hi"}\n\n'
    b"event: ping\n\n"
    b'data: {"event":"message_end","conversation_id":"c","message_id":"m","created_at":1,'
    b'"task_id":"t","metadata":{"usage":{"total_tokens":3}}}\n\n'
)


@pytest.fixture
def dify_blocking(requests_mock):
    return requests_mock.post(CHAT, json=BLOCKING_ANSWER)


@pytest.fixture
def dify_stream(requests_mock):
    return requests_mock.post(
        CHAT, content=STREAM, headers={"Content-Type": "text/event-stream; charset=utf-8"}
    )


def post(client, auth, body, **kwargs):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    kwargs.setdefault("content_type", "application/json")
    kwargs.setdefault("headers", auth)
    return client.post("/api/chat", data=body, **kwargs)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({}, "message"),
        ({"message": ""}, "message"),
        ({"message": "   \n"}, "message"),
        ({"message": 42}, "message"),
        ({"message": ["hi"]}, "message"),
        ({"message": "x" * 32_001}, "32000"),
        ({"message": "hi", "conversation_id": "nope"}, "conversation_id"),
        ({"message": "hi", "conversation_id": "../../etc"}, "conversation_id"),
        ({"message": "hi", "conversation_id": 7}, "conversation_id"),
        ({"message": "hi", "inputs": []}, "inputs"),
        ({"message": "hi", "inputs": "a"}, "inputs"),
        ({"message": "hi", "files": {}}, "files"),
        ({"message": "hi", "response_mode": "fast"}, "response_mode"),
        (["message"], "JSON object"),
        ("not json", "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
    ],
)
def test_bad_input_is_a_400_naming_the_problem_and_never_reaches_dify(
    client, auth, requests_mock, body, names
):
    response = post(client, auth, body)
    assert response.status_code == 400
    assert response.json["code"] == "invalid_param"
    assert response.json["status"] == 400
    assert names in response.json["message"]
    assert requests_mock.call_count == 0


def test_a_body_that_is_not_json_typed_is_415(client, auth, requests_mock):
    response = post(client, auth, "message=hi", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert response.json["code"] == "unsupported_media_type"
    assert requests_mock.call_count == 0


def test_a_body_over_one_megabyte_is_413(client, auth, requests_mock):
    response = post(client, auth, {"message": "hi", "inputs": {"pad": "x" * 1_100_000}})
    assert response.status_code == 413
    assert response.json["code"] == "request_too_large"
    assert requests_mock.call_count == 0


def test_a_message_of_exactly_32000_characters_is_accepted(client, auth, dify_blocking):
    response = post(client, auth, {"message": "x" * 32_000, "response_mode": "blocking"})
    assert response.status_code == 200


def test_dify_gets_the_sessions_sub_as_user_not_the_bodys(client, auth, dify_blocking):
    post(client, auth, {"message": "hi", "user": "somebody-else", "response_mode": "blocking"})
    assert dify_blocking.last_request.json()["user"] == tokens.USER_ID


def test_dify_gets_query_inputs_mode_and_conversation(client, auth, dify_blocking):
    post(
        client,
        auth,
        {
            "message": "hi",
            "inputs": {"a": 1},
            "conversation_id": CONVERSATION,
            "response_mode": "blocking",
            "unknown": True,
        },
    )
    assert dify_blocking.last_request.json() == {
        "query": "hi",
        "inputs": {"a": 1},
        "user": tokens.USER_ID,
        "response_mode": "blocking",
        "conversation_id": CONVERSATION,
    }


def test_files_are_passed_on(client, auth, dify_blocking):
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://x.test/a.png"}]
    post(client, auth, {"message": "hi", "files": files, "response_mode": "blocking"})
    assert dify_blocking.last_request.json()["files"] == files


def test_streaming_is_the_default_mode(client, auth, dify_stream):
    post(client, auth, {"message": "hi"})
    assert dify_stream.last_request.json()["response_mode"] == "streaming"


def test_blocking_mode_returns_difys_json_unchanged(client, auth, dify_blocking):
    response = post(client, auth, {"message": "hi", "response_mode": "blocking"})
    assert response.status_code == 200
    assert response.json == BLOCKING_ANSWER


def test_a_stream_has_sse_headers_and_no_compression(client, auth, dify_stream):
    response = post(client, auth, {"message": "hi"}, headers={**auth, "Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache, no-transform"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers


def blocks(body: bytes) -> list[bytes]:
    return [block for block in body.split(b"\n\n") if block]


def test_a_client_that_did_not_ask_for_ids_gets_exactly_difys_bytes(client, auth, dify_stream):
    assert post(client, auth, {"message": "hi"}).get_data() == STREAM


def test_a_client_that_accepts_event_streams_gets_ids(client, auth, dify_stream):
    headers = {**auth, "Accept": "text/event-stream"}
    body = post(client, auth, {"message": "hi"}, headers=headers).get_data()
    assert body.count(b"\nid: ") == 3


def test_accepting_anything_is_not_asking_for_ids(client, auth, dify_stream):
    headers = {**auth, "Accept": "*/*"}
    assert post(client, auth, {"message": "hi"}, headers=headers).get_data() == STREAM


def test_an_eventsource_get_always_gets_ids(client, auth, dify_stream):
    body = client.get("/api/chat?message=hi", headers=auth).get_data()
    assert b"\nid: " in body


def sse_post(client, auth):
    return post(client, auth, {"message": "hi"}, headers={**auth, "Accept": "text/event-stream"})


def test_with_ids_every_data_event_ends_with_a_unique_id_line(client, auth, dify_stream):
    data_blocks = [b for b in blocks(sse_post(client, auth).get_data()) if b"data:" in b]
    ids = [b.rsplit(b"\n", 1)[1] for b in data_blocks]
    assert all(i.startswith(b"id: ") for i in ids)
    assert len(set(ids)) == len(ids) == 2


def test_with_ids_the_data_lines_are_difys_own_bytes(client, auth, dify_stream):
    data_blocks = [b for b in blocks(sse_post(client, auth).get_data()) if b"data:" in b]
    assert [b.rsplit(b"\n", 1)[0] for b in data_blocks] == [
        b for b in blocks(STREAM) if b"data:" in b
    ]


def test_with_ids_the_first_id_rides_on_a_ping_so_an_early_drop_is_also_a_reconnect(
    client, auth, dify_stream
):
    first = blocks(sse_post(client, auth).get_data())[0]
    assert first.split(b"\n")[0] == b"event: ping"
    assert first.split(b"\n")[1].startswith(b"id: ")


def test_event_ids_name_the_stream_with_at_least_128_random_bits(client, auth, dify_stream):
    first = blocks(sse_post(client, auth).get_data())[0]
    stream_id = first.split(b"id: ")[1].rsplit(b"-", 1)[0]
    assert len(stream_id) >= 22  # URL-safe base64 of 16 random bytes


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_reconnect_with_last_event_id_is_204_and_never_reaches_dify(
    client, auth, requests_mock, method
):
    response = client.open(
        "/api/chat?message=hi",
        method=method,
        json={"message": "hi"},
        headers={**auth, "Last-Event-ID": "abc-3"},
    )
    assert response.status_code == 204
    assert requests_mock.call_count == 0


def test_a_reconnect_with_last_event_id_in_the_query_is_204(client, auth, requests_mock):
    response = client.get("/api/chat?message=hi&lastEventId=abc-3", headers=auth)
    assert response.status_code == 204
    assert requests_mock.call_count == 0


def test_get_takes_the_question_from_the_query_string(client, auth, dify_stream):
    response = client.get(
        f"/api/chat?message=hi&conversation_id={CONVERSATION}&inputs=%7B%22a%22%3A1%7D",
        headers=auth,
    )
    assert response.status_code == 200
    assert dify_stream.last_request.json() == {
        "query": "hi",
        "inputs": {"a": 1},
        "user": tokens.USER_ID,
        "response_mode": "streaming",
        "conversation_id": CONVERSATION,
    }


@pytest.mark.parametrize(
    "query",
    [
        "",
        "message=",
        "message=hi&inputs=nope",
        "message=hi&inputs=%5B%5D",
        "message=hi&conversation_id=x",
    ],
)
def test_get_with_a_bad_query_is_400_and_never_reaches_dify(client, auth, requests_mock, query):
    response = client.get(f"/api/chat?{query}", headers=auth)
    assert response.status_code == 400
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("accept", ["*/*", "text/event-stream"])
def test_difys_ping_passes_through_and_nothing_is_a_comment(client, auth, dify_stream, accept):
    body = post(client, auth, {"message": "hi"}, headers={**auth, "Accept": accept}).get_data()
    assert b"event: ping\n\n" in body
    assert not [line for line in body.split(b"\n") if line.startswith(b":")]


def test_dify_errors_before_the_stream_become_real_http_statuses(client, auth, requests_mock):
    requests_mock.post(
        CHAT,
        status_code=404,
        json={"code": "not_found", "message": "Conversation Not Exists.", "status": 404},
    )
    response = post(client, auth, {"message": "hi", "conversation_id": CONVERSATION})
    assert response.status_code == 404
    assert response.json == {
        "code": "not_found",
        "message": "Conversation Not Exists.",
        "status": 404,
    }


def test_dify_401_is_a_502_for_the_user(client, auth, requests_mock):
    requests_mock.post(
        CHAT,
        status_code=401,
        json={"code": "unauthorized", "message": "Access token is invalid", "status": 401},
    )
    response = post(client, auth, {"message": "hi"})
    assert response.status_code == 502
    assert "WWW-Authenticate" not in response.headers


def test_healthz_needs_no_session_and_calls_nothing(client, requests_mock):
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (200, {"status": "ok"})
    assert requests_mock.call_count == 0


def test_unknown_path_is_a_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json["code"] == "not_found"


def test_wrong_method_is_a_json_405(client):
    response = client.put("/api/chat")
    assert response.status_code == 405
    assert response.json["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_an_unexpected_failure_is_a_json_500_without_a_traceback(client, auth, requests_mock):
    requests_mock.post(CHAT, exc=ZeroDivisionError("boom"))
    response = post(client, auth, {"message": "hi"})
    assert response.status_code == 500
    assert response.json["code"] == "internal_server_error"
    assert "Traceback" not in response.get_data(as_text=True)
    assert "boom" not in response.get_data(as_text=True)


def test_the_key_is_in_no_response(client, auth, requests_mock):
    requests_mock.post(
        CHAT, status_code=401, json={"code": "unauthorized", "message": f"bad key {DIFY_KEY}"}
    )
    response = post(client, auth, {"message": "hi"})
    assert DIFY_KEY not in response.get_data(as_text=True)
    assert DIFY_KEY not in str(response.headers)
