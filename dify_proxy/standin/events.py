"""One run of a stand-in app and the events it writes, keys in the order Dify 1.16.1 writes
them (see the project's captures of real Dify): a chatflow's `workflow_started`, `message`
deltas, node events, `message_end` and `workflow_finished`; a workflow app's `text_chunk`s;
the plain `message`/`message_end` of chat and completion apps; and the human-input pause.

A run's node list is fixed by its app: a chatflow is Start -> Answer, or Start -> Human Input
(`review`, `review_2`, ...) -> Answer when it pauses; a workflow app is Start -> End.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from dify_proxy.standin.apps import CHAT, CHATFLOW, COMPLETION, WORKFLOW
from dify_proxy.standin.wire import dumps

PING = b"event: ping\n\n"
STOPPED = "Aborted: User requested stop"
ACTIONS = [
    {"id": "approve", "title": "Approve", "button_style": "primary"},
    {"id": "reject", "title": "Reject", "button_style": "default"},
]
FORM_INPUTS = [
    {
        "output_variable_name": "comment",
        "type": "paragraph",
        "default": {"type": "constant", "selector": [], "value": ""},
    }
]
FORM_LIFETIME = 24 * 3600  # Dify's default: a form expires a day after the pause


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + dumps(event) + b"\n\n"


class Run:
    """One run: the handle through which stop reaches a sleeping stream, the ids and events it
    writes, and how it ended in the call log."""

    def __init__(
        self,
        mode: str,
        user: str,
        record: dict[str, Any],
        streaming: bool,
        *,
        conversation_id: str | None = None,
        query: str = "",
        inputs: dict[str, Any] | None = None,
        app_id: str = "",
        workflow_id: str = "",
    ) -> None:
        self.mode, self.user, self.record, self.streaming = mode, user, record, streaming
        self.task_id, self.message_id = str(uuid.uuid4()), str(uuid.uuid4())
        flow = mode in (CHATFLOW, WORKFLOW)
        self.workflow_run_id = str(uuid.uuid4()) if flow else None
        self.conversation_id, self.query = conversation_id, query
        self.inputs = {k: v for k, v in (inputs or {}).items() if k != "_standin"}
        self.app_id, self.workflow_id = app_id, workflow_id
        self.created_at, self.started = int(time.time()), time.time()
        self.stopped = False
        self.waiter: asyncio.Future[None] | None = None  # the pause a stop cuts short
        self.scenario: Any = None
        # A workflow run's state, for run detail, its events and its forms:
        self.status = "running"  # then paused, succeeded, stopped or failed
        self.steps = 0  # nodes started, as Dify counts `total_steps`
        self.final: dict[str, Any] | None = None  # the data of its workflow_finished
        self.finished_at: int | None = None
        self.forms: list[Any] = []  # human_input.Form, one per Human Input node
        self.at = 0  # the form it waits for
        self.segments: list[list[bytes]] = []  # the events of each resumption
        self.segment_done = True
        self.changed: asyncio.Future[None] | None = None

    def settle(
        self,
        status: str,
        outputs: dict[str, Any] | None = None,
        error: str | None = None,
        tokens: int = 0,
    ) -> dict[str, Any]:
        """The run has ended: what its workflow_finished says, and run detail after it."""
        if status == "stopped" and error is None:
            error = STOPPED
        self.status, self.finished_at = status, int(time.time())
        self.final = self.finished_data(status, outputs or {}, error, tokens)
        self.notify()
        return self.final

    def notify(self) -> None:
        """Wake whoever follows this run's events."""
        if self.changed is not None:
            wake(self.changed)
            self.changed = None

    async def changes(self, timeout: float | None) -> bool:
        """Wait until the run changes; False if `timeout` seconds pass first."""
        if self.changed is None:
            self.changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.changed), timeout)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        self.stopped = True
        if self.waiter is not None:
            wake(self.waiter)

    async def pause(self, seconds: float | None) -> None:
        """A sleep that stop cuts short; `None` waits for the stop (or the client leaving).

        asyncio.sleep with a handle for stop, rather than asyncio.wait: a benchmark's 5,000
        streams pause 30 times each, and wait() costs several times more CPU."""
        if self.stopped or (seconds is not None and seconds <= 0):
            return
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, wake, self.waiter)
        try:
            await self.waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def finish(self, how: str) -> None:
        if self.record["stream_end"] is None:
            self.record["stream_end"], self.record["ended_at"] = how, time.time()

    # -- the head every event of this app starts with ------------------------------------
    def head(self, kind: str) -> dict[str, Any]:
        if self.mode == WORKFLOW:
            return {"event": kind, "workflow_run_id": self.workflow_run_id, "task_id": self.task_id}
        head: dict[str, Any] = {"event": kind}
        if self.mode != COMPLETION:
            head["conversation_id"] = self.conversation_id
        head.update(message_id=self.message_id, created_at=self.created_at, task_id=self.task_id)
        return head

    def flow_event(self, kind: str, data: dict[str, Any]) -> bytes:
        """A workflow event (`workflow_*`, `node_*`, the pause): it names the run."""
        head = self.head(kind)
        if self.mode == CHATFLOW:
            head["workflow_run_id"] = self.workflow_run_id
        return sse({**head, "data": data})

    def delta(self, answer: str, selector: list[str] | None = None) -> bytes:
        """One piece of the answer: `text_chunk` in a workflow app, `message` elsewhere."""
        if self.mode == WORKFLOW:
            data = {"text": answer, "from_variable_selector": selector or ["start", "text"]}
            return sse({**self.head("text_chunk"), "data": data})
        if self.mode == CHATFLOW:
            selector = selector or ["answer", "answer"]
        event = {**self.head("message"), "id": self.message_id, "answer": answer}
        event["from_variable_selector"] = selector
        return sse(event)

    def error(self, status: int, code: str, message: str) -> bytes:
        """Dify's error event carries no task id."""
        head = {k: v for k, v in self.head("error").items() if k != "task_id"}
        return sse({**head, "status": status, "code": code, "message": message})

    def usage(self, completion: int) -> dict[str, Any]:
        prompt = len(self.query.split()) + 1
        total = prompt + completion
        return {
            "prompt_tokens": prompt,
            "prompt_unit_price": "0.001",
            "prompt_price_unit": "0.001",
            "prompt_price": f"{prompt * 1e-6:.7f}",
            "completion_tokens": completion,
            "completion_unit_price": "0.002",
            "completion_price_unit": "0.001",
            "completion_price": f"{completion * 2e-6:.7f}",
            "total_tokens": total,
            "total_price": f"{(prompt + completion * 2) * 1e-6:.7f}",
            "currency": "USD",
            "latency": round(time.time() - self.started, 3),
            "time_to_first_token": 0.01,
            "time_to_generate": round(time.time() - self.started, 3),
        }

    def message_end(self, completion: int) -> bytes:
        metadata = {
            "annotation_reply": None,
            "retriever_resources": [],
            "usage": self.usage(completion),
            "reasoning": {},
        }
        event = {**self.head("message_end"), "id": self.message_id, "metadata": metadata}
        return sse({**event, "files": []})

    # -- workflow events ------------------------------------------------------------------
    def flow_inputs(self) -> dict[str, Any]:
        """`sys.*` as Dify fills them (a chatflow's also carry the query)."""
        if self.mode == CHATFLOW:
            sys = {"sys.query": self.query, "sys.files": [], "sys.user_id": self.user}
            sys["sys.dialogue_count"] = 1
        else:
            sys = {"sys.files": [], "sys.user_id": self.user}
        sys.update({"sys.app_id": self.app_id, "sys.workflow_id": self.workflow_id})
        return {**self.inputs, **sys, "sys.workflow_run_id": self.workflow_run_id}

    def workflow_started(self, reason: str = "initial") -> bytes:
        data = {
            "id": self.workflow_run_id,
            "workflow_id": self.workflow_id,
            "inputs": self.flow_inputs(),
            "created_at": int(time.time()),
            "reason": reason,
        }
        return self.flow_event("workflow_started", data)

    def node_started(self, node: Node) -> bytes:
        self.steps += 1
        data = {
            **node.head(),
            "inputs": None,
            "inputs_truncated": False,
            "created_at": int(time.time()),
            "extras": {},
            "iteration_id": None,
            "loop_id": None,
            "agent_strategy": None,
        }
        return self.flow_event("node_started", data)

    def node_finished(self, node: Node, inputs: dict[str, Any], outputs: dict[str, Any]) -> bytes:
        now = int(time.time())
        data = {
            **node.head(),
            "inputs": inputs,
            "inputs_truncated": False,
            "process_data": {},
            "process_data_truncated": False,
            "outputs": outputs,
            "outputs_truncated": False,
            "status": "succeeded",
            "error": None,
            "elapsed_time": 0.0002,
            "execution_metadata": None,
            "created_at": now,
            "finished_at": now,
            "files": [],
            "iteration_id": None,
            "loop_id": None,
        }
        return self.flow_event("node_finished", data)

    def finished_data(
        self, status: str, outputs: dict[str, Any], error: str | None, tokens: int
    ) -> dict[str, Any]:
        return {
            "id": self.workflow_run_id,
            "workflow_id": self.workflow_id,
            "status": status,
            "outputs": outputs,
            "error": error,
            "elapsed_time": round(time.time() - self.started, 6),
            "total_tokens": tokens,
            "total_steps": self.steps,
            "created_by": {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, self.user)), "user": self.user},
            "created_at": self.created_at,
            "finished_at": int(time.time()),
            "exceptions_count": 0,
            "files": [],
        }


class Node:
    def __init__(self, node_id: str, node_type: str, title: str) -> None:
        self.id, self.node_id = str(uuid.uuid4()), node_id
        self.node_type, self.title = node_type, title

    def head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node_id": self.node_id,
            "node_type": self.node_type,
            "title": self.title,
            "index": 1,
            "predecessor_node_id": None,
        }


def wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def ends(run: Run, how: str, answer: str, sent: int) -> list[bytes]:
    """The events after the answer's deltas: the nodes that ran and the end, for `how` being
    `message_end` (the run succeeded) or `stopped`; a workflow run is settled with them."""
    if run.mode in (CHAT, COMPLETION):
        return [run.message_end(sent)]
    tokens = run.usage(sent)["total_tokens"]
    if how == "stopped":
        finished = run.flow_event("workflow_finished", run.settle("stopped", tokens=tokens))
        return [finished] if run.mode == WORKFLOW else [finished, run.message_end(sent)]
    if run.mode == WORKFLOW:
        start, end = Node("start", "start", "Start"), Node("end", "end", "End")
        text = run.inputs.get("text")
        outputs: dict[str, Any] = {"result": answer}
        nodes = [
            run.node_started(start),
            run.node_finished(start, {"text": text}, {"text": text}),
            run.node_started(end),
            run.node_finished(end, {"result": answer}, outputs),
        ]
        data = run.settle("succeeded", outputs, tokens=tokens)
        return [*nodes, run.flow_event("workflow_finished", data)]
    start, reply = Node("start", "start", "Start"), Node("answer", "answer", "Answer")
    outputs = {"answer": answer, "files": []}
    nodes = [
        run.node_started(start),
        run.node_finished(start, {}, {}),
        run.node_started(reply),
        run.node_finished(reply, {}, outputs),
        run.message_end(sent),
    ]
    data = run.settle("succeeded", outputs, tokens=tokens)
    return [*nodes, run.flow_event("workflow_finished", data)]


def detail(run: Run) -> dict[str, Any]:
    """`GET /workflows/run/{id}`: the run as it stands, its inputs as a JSON string."""
    inputs = run.flow_inputs()
    if run.mode == WORKFLOW:  # run detail also shows the time the run began
        at = list(inputs).index("sys.workflow_id")
        items = list(inputs.items())
        inputs = dict([*items[:at], ("sys.timestamp", run.created_at), *items[at:]])
    final = run.final or {}
    return {
        "id": run.workflow_run_id,
        "workflow_id": run.workflow_id,
        "status": run.status,
        "inputs": json.dumps(inputs),
        "outputs": final.get("outputs", {}),
        "error": final.get("error"),
        "total_steps": run.steps,
        "total_tokens": final.get("total_tokens", 0),
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "elapsed_time": final.get("elapsed_time", 0.0),
    }
