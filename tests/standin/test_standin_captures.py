"""The stand-in answers as real Dify 1.16.1 did (tests/standin/captures/): each run of the
captures is played against the stand-in with the same questions, and every answer matches its
capture byte for byte (status, content type, body, and one HTTP chunk per event) once ids,
form tokens, times and token counts are normalised."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from dify_proxy.standin import start_in_thread

CAPTURES = Path(__file__).parent / "captures"
KEY = "app-standin-captures-key"
WORKFLOW_KEY = KEY + "-workflow"
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TOKEN = re.compile(rb"(?<![A-Za-z0-9])[A-Za-z0-9]{22}(?![A-Za-z0-9])")
TIMES = "created_at|finished_at|expiration_time|elapsed_time|latency|time_to_first_token|"
TOKENS = "time_to_generate|total_tokens|prompt_tokens|completion_tokens"
NUMBER = re.compile(
    rb'("(?:' + (TIMES + TOKENS).encode() + rb')": ?)[0-9.]+(?:e-?[0-9]+)?|(sys.timestamp\\": )\d+'
)
PRICE = re.compile(rb'("(?:prompt|completion|total)_(?:unit_)?price(?:_unit)?": ?)"[^"]*"')


class Normal:
    """Ids and tokens become numbered placeholders in the order they first appear (so a reused
    id must be reused in the same places); times, token counts and prices become `N`."""

    def __init__(self) -> None:
        self.names: dict[bytes, bytes] = {}

    def name(self, kind: bytes) -> Callable[[re.Match[bytes]], bytes]:
        def named(m: re.Match[bytes]) -> bytes:
            return self.names.setdefault(m[0], b"<%s%d>" % (kind, len(self.names)))

        return named

    def __call__(self, data: bytes) -> bytes:
        data = UUID.sub(self.name(b"id"), data)
        data = TOKEN.sub(self.name(b"token"), data)
        data = NUMBER.sub(lambda m: (m[1] or m[2]) + b"N", data)
        return PRICE.sub(lambda m: m[1] + b'"N"', data)


def captured(name: str) -> tuple[int, str, list[bytes]]:
    """Status, content type and body of a capture: a stream as its chunks, else one piece."""
    head = (CAPTURES / f"{name}.headers.txt").read_text().splitlines()
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    raw = (CAPTURES / f"{name}.txt").read_bytes()
    if headers.get("Transfer-Encoding") != "chunked":
        return int(head[0].split()[1]), headers["Content-Type"], [raw]
    pieces, at = [], 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            return int(head[0].split()[1]), headers["Content-Type"], pieces
        pieces.append(raw[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def answered(response: requests.Response) -> tuple[int, str, list[bytes]]:
    chunked = response.headers.get("Transfer-Encoding") == "chunked"
    body = list(response.raw.read_chunked()) if chunked else [response.raw.read()]
    return response.status_code, response.headers["Content-Type"], body


class Dify:
    """The stand-in, asked as the captures asked real Dify."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, key: str = KEY, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.request(
            method, self.url + path, headers=headers, stream=True, timeout=10, **kw
        )

    def ask(self, query: str, mode: str = "streaming") -> requests.Response:
        body = {"query": query, "inputs": {"_standin": {"human_input": 1}}, "user": "alice"}
        return self.call("POST", "/chat-messages", json={**body, "response_mode": mode})


@pytest.fixture(scope="module")
def dify() -> Iterator[Dify]:
    url, stop = start_in_thread(KEY)
    yield Dify(url)
    stop()


def side_by_side(got: dict[str, tuple]) -> dict[str, tuple]:
    """Each capture and the stand-in's answer to the same question, normalised in the same
    order on both sides (the order the answers were taken in)."""
    real, ours, pairs = Normal(), Normal(), {}
    for name, (status, kind, pieces) in got.items():
        want = captured(name)
        pairs[name] = (
            (want[0], want[1], [real(p) for p in want[2]]),
            (status, kind, [ours(p) for p in pieces]),
        )
    return pairs


def run_ids(pieces: list[bytes]) -> tuple[str, str, str]:
    """A paused stream's form token, task id and workflow run id."""
    found = re.search(rb'"task_id":"([-\w]+)","workflow_run_id":"([-\w]+)"', pieces[1])
    token = re.search(rb'"form_token":"(\w+)"', b"".join(pieces))
    return token[1].decode(), found[1].decode(), found[2].decode()


class Follower:
    """`GET /workflow/{id}/events` read in the background while the test answers the form."""

    def __init__(self, dify: Dify, run_id: str) -> None:
        self.response = dify.call("GET", f"/workflow/{run_id}/events", params={"user": "alice"})
        self.result: tuple | None = None
        self.thread = threading.Thread(target=self.read)
        self.thread.start()

    def read(self) -> None:
        self.result = answered(self.response)

    def result_when_done(self) -> tuple:
        self.thread.join(10)
        assert self.result is not None
        return self.result


@pytest.fixture(scope="module")
def run_a(dify: Dify) -> dict[str, tuple]:
    """Run A: alice's run paused, inspected, refused, answered by alice, and followed."""
    got = {"hitl-A1-chat-stream-until-pause": answered(dify.ask("please approve"))}
    token, task_id, run_id = run_ids(got["hitl-A1-chat-stream-until-pause"][2])
    form, events = f"/form/human_input/{token}", f"/workflow/{run_id}/events"

    def ask(name: str, method: str, path: str, **kw) -> None:
        got[name] = answered(dify.call(method, path, **kw))

    ask("hitl-A2-run-detail-paused", "GET", f"/workflows/run/{run_id}")
    ask("hitl-A3-form-get-no-user", "GET", form)
    ask("hitl-A4-form-get-user-bob", "GET", form, params={"user": "bob"})
    ask("hitl-A5-form-get-other-app-key", "GET", form, key=WORKFLOW_KEY)
    ask("hitl-A6-events-as-bob", "GET", events, params={"user": "bob"})
    ask("hitl-A7-events-by-task-id", "GET", f"/workflow/{task_id}/events", params={"user": "alice"})
    ask("hitl-A8-events-no-user", "GET", events)
    follower = Follower(dify, run_id)
    bad = {"inputs": {"comment": "x"}, "action": "maybe", "user": "alice"}
    ask("hitl-A11-form-submit-bad-action", "POST", form, json=bad)
    no_user = {"inputs": {"comment": "x"}, "action": "approve"}
    ask("hitl-A12-form-submit-no-user", "POST", form, json=no_user)
    missing = {"inputs": {}, "action": "approve", "user": "alice"}
    ask("hitl-A13-form-submit-missing-input", "POST", form, json=missing)
    approve = {"inputs": {"comment": "looks good"}, "action": "approve", "user": "alice"}
    ask("hitl-A14-form-submit-alice", "POST", form, json=approve)
    got["hitl-A10-events-follow-resumed"] = follower.result_when_done()
    ask("hitl-A15-form-get-after-submit", "GET", form)
    ask("hitl-A16-form-submit-again", "POST", form, json=approve)
    ask("hitl-A17-events-after-finish", "GET", events, params={"user": "alice"})
    ask("hitl-A18-run-detail-finished", "GET", f"/workflows/run/{run_id}")
    return side_by_side(got)


A_STEPS = [
    "hitl-A1-chat-stream-until-pause",
    "hitl-A2-run-detail-paused",
    "hitl-A3-form-get-no-user",
    "hitl-A4-form-get-user-bob",
    "hitl-A5-form-get-other-app-key",
    "hitl-A6-events-as-bob",
    "hitl-A7-events-by-task-id",
    "hitl-A8-events-no-user",
    "hitl-A10-events-follow-resumed",
    "hitl-A11-form-submit-bad-action",
    "hitl-A12-form-submit-no-user",
    "hitl-A13-form-submit-missing-input",
    "hitl-A14-form-submit-alice",
    "hitl-A15-form-get-after-submit",
    "hitl-A16-form-submit-again",
    "hitl-A17-events-after-finish",
    "hitl-A18-run-detail-finished",
]


@pytest.mark.parametrize("name", A_STEPS)
def test_run_a_alice_answers_her_own_form(run_a: dict[str, tuple], name: str) -> None:
    real, ours = run_a[name]
    assert ours == real


def other_answer(dify: Dify, query: str, stop_by: str | None, answer: dict) -> dict[str, tuple]:
    """Runs B to D: alice's run, maybe stopped by `stop_by` while paused, its form answered."""
    letter = {"bob will answer": "B", "bob stops it": "C", "alice stops it": "D"}[query]
    names = {
        "B": [
            "B1-chat-stream-until-pause",
            None,
            None,
            "B3-form-submit-as-bob",
            "B2-events-follow-alice",
            "B4-run-detail",
        ],
        "C": [
            "C1-chat-stream-until-pause",
            "C2-chat-stop-as-bob",
            "C3-run-detail-after-stop",
            "C6-form-submit-alice",
            "C5-events-follow-alice",
            "C7-run-detail-end",
        ],
        "D": [
            "D1-chat-stream-until-pause",
            "D2-chat-stop-as-alice",
            "D3-run-detail-after-stop",
            "D6-form-submit-alice",
            "D5-events-follow-alice",
            "D7-run-detail-end",
        ],
    }[letter]
    names = [None if n is None else f"hitl-{n}" for n in names]
    got = {names[0]: answered(dify.ask(query))}
    token, task_id, run_id = run_ids(got[names[0]][2])
    if stop_by is not None:
        stop = dify.call("POST", f"/chat-messages/{task_id}/stop", json={"user": stop_by})
        got[names[1]] = answered(stop)
        got[names[2]] = answered(dify.call("GET", f"/workflows/run/{run_id}"))
        form_name = f"hitl-{letter}4-form-get-after-stop"
        got[form_name] = answered(dify.call("GET", f"/form/human_input/{token}"))
    follower = Follower(dify, run_id)
    got[names[3]] = answered(dify.call("POST", f"/form/human_input/{token}", json=answer))
    got[names[4]] = follower.result_when_done()
    got[names[5]] = answered(dify.call("GET", f"/workflows/run/{run_id}"))
    return side_by_side(got)


def test_run_b_bob_answers_alices_form_and_dify_accepts_it(dify: Dify) -> None:
    answer = {"inputs": {"comment": "bob says no"}, "action": "reject", "user": "bob"}
    for real, ours in other_answer(dify, "bob will answer", None, answer).values():
        assert ours == real


@pytest.mark.parametrize(
    ("query", "stopper", "comment"),
    [("bob stops it", "bob", "after bob stop"), ("alice stops it", "alice", "after alice stop")],
)
def test_runs_c_and_d_a_stop_leaves_the_run_paused_then_aborts_its_resumption(
    dify: Dify, query: str, stopper: str, comment: str
) -> None:
    answer = {"inputs": {"comment": comment}, "action": "approve", "user": "alice"}
    for real, ours in other_answer(dify, query, stopper, answer).values():
        assert ours == real


def test_run_e_blocking_mode_answers_the_pause_as_json(dify: Dify) -> None:
    got = {"hitl-E1-chat-blocking": answered(dify.ask("blocking please", mode="blocking"))}
    real, ours = side_by_side(got)["hitl-E1-chat-blocking"]
    assert ours == real


@pytest.fixture(scope="module")
def workflow_runs(dify: Dify) -> dict[str, tuple]:
    def run(text: str, mode: str) -> requests.Response:
        body = {"inputs": {"text": text}, "user": "alice", "response_mode": mode}
        return dify.call("POST", "/workflows/run", key=WORKFLOW_KEY, json=body)

    def ask(name: str, method: str, path: str, **kw) -> None:
        got[name] = answered(dify.call(method, path, key=WORKFLOW_KEY, **kw))

    got = {"wf-W1-run-streaming": answered(run("hello workflow", "streaming"))}
    found = re.search(
        rb'"workflow_run_id":"([-\w]+)","task_id":"([-\w]+)"', got["wf-W1-run-streaming"][2][1]
    )
    run_id, task_id = found[1].decode(), found[2].decode()
    got["wf-W2-run-blocking"] = answered(run("hello blocking", "blocking"))
    ask("wf-W3-run-detail", "GET", f"/workflows/run/{run_id}")
    ask("wf-W4-run-detail-unknown", "GET", "/workflows/run/00000000-0000-4000-8000-000000000000")
    stop = f"/workflows/tasks/{task_id}/stop"
    ask("wf-W5-task-stop-as-alice", "POST", stop, json={"user": "alice"})
    ask("wf-W6-task-stop-as-bob", "POST", stop, json={"user": "bob"})
    unknown = "/workflows/tasks/00000000-0000-4000-8000-000000000001/stop"
    ask("wf-W7-task-stop-unknown", "POST", unknown, json={"user": "alice"})
    ask("wf-W8-task-stop-no-user", "POST", stop, json={})
    events = f"/workflow/{run_id}/events"
    ask("wf-W9-events-finished-alice", "GET", events, params={"user": "alice"})
    ask("wf-W10-events-finished-bob", "GET", events, params={"user": "bob"})
    no_text = {"inputs": {}, "user": "alice", "response_mode": "blocking"}
    ask("wf-W11-run-missing-input", "POST", "/workflows/run", json=no_text)
    chat = {"query": "hi", "inputs": {}, "user": "alice", "response_mode": "blocking"}
    ask("wf-W12-chat-messages-on-workflow-app", "POST", "/chat-messages", json=chat)
    ask(
        "wf-W13-chat-stop-on-workflow-app",
        "POST",
        f"/chat-messages/{task_id}/stop",
        json={"user": "alice"},
    )
    ask("wf-W14-parameters", "GET", "/parameters")
    return side_by_side(got)


W_STEPS = [
    "wf-W1-run-streaming",
    "wf-W2-run-blocking",
    "wf-W3-run-detail",
    "wf-W4-run-detail-unknown",
    "wf-W5-task-stop-as-alice",
    "wf-W6-task-stop-as-bob",
    "wf-W7-task-stop-unknown",
    "wf-W8-task-stop-no-user",
    "wf-W9-events-finished-alice",
    "wf-W10-events-finished-bob",
    "wf-W11-run-missing-input",
    "wf-W12-chat-messages-on-workflow-app",
    "wf-W13-chat-stop-on-workflow-app",
    "wf-W14-parameters",
]


@pytest.mark.parametrize("name", W_STEPS)
def test_workflow_app_answers_as_dify_does(workflow_runs: dict[str, tuple], name: str) -> None:
    real, ours = workflow_runs[name]
    assert ours == real


def shape(event: object) -> object:
    """An event's keys, in order, all the way down (its values aside)."""
    if isinstance(event, dict):
        return [(k, shape(v)) for k, v in event.items()]
    if isinstance(event, list):
        return [shape(v) for v in event[:1]]
    return None


def test_a_chatflow_stream_has_dify_116s_events_in_its_order_and_key_order(dify: Dify) -> None:
    body = {"query": "hello", "inputs": {"_standin": {"text": "You said: hello"}}, "user": "u1"}
    response = dify.call("POST", "/chat-messages", json={**body, "response_mode": "streaming"})
    status, kind, pieces = answered(response)
    real = captured("capture-streaming-raw")
    assert (status, kind) == real[:2]
    assert [kind_of(p) for p in dedupe(pieces)] == [kind_of(p) for p in dedupe(real[2])]
    assert [shape(parse(p)) for p in dedupe(pieces)] == [shape(parse(p)) for p in dedupe(real[2])]


def parse(piece: bytes) -> object:
    return json.loads(piece[6:]) if piece.startswith(b"data: ") else piece.decode()


def kind_of(piece: bytes) -> str:
    event = parse(piece)
    return event["event"] if isinstance(event, dict) else "ping"


def dedupe(pieces: list[bytes]) -> list[bytes]:
    """The chunks with each run of `message` deltas as its first (deltas are cut differently)."""
    out: list[bytes] = []
    for piece in pieces:
        if not (out and kind_of(piece) == "message" == kind_of(out[-1])):
            out.append(piece)
    return out


def test_a_blocking_chatflow_answer_is_difys_spaced_json(dify: Dify) -> None:
    text = "You said: hello blocking"
    body = {"query": "hello blocking", "inputs": {"_standin": {"text": text}}, "user": "u1"}
    got = {"capture-blocking": answered(dify.call("POST", "/chat-messages", json=body))}
    real, ours = side_by_side(got)["capture-blocking"]
    assert ours == real


def test_parameters_are_difys_for_an_app_without_model_features(dify: Dify) -> None:
    got = {"capture-parameters": answered(dify.call("GET", "/parameters"))}
    real, ours = side_by_side(got)["capture-parameters"]
    assert ours == real


@pytest.mark.parametrize(("name", "path"), [("capture-info", "/info"), ("capture-site", "/site")])
def test_info_and_site_have_difys_keys_and_the_chatflow_mode(dify: Dify, name: str, path: str):
    status, kind, pieces = answered(dify.call("GET", path))
    real = captured(name)
    assert (status, kind) == real[:2]
    assert shape(json.loads(pieces[0])) == shape(json.loads(real[2][0]))
    assert pieces[0].endswith(b"}\n") and b", " not in pieces[0]
    if name == "capture-info":
        assert json.loads(pieces[0])["mode"] == "advanced-chat"
