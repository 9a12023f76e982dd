"""What the stand-in remembers: the call log the tests read (`GET /_standin/calls`), the runs
that a stop can reach, the workflow runs that run detail, events and forms reach (by run id,
task id and form token), uploaded files, and each user's conversations, messages and
conversation variables, scoped per `user` as Dify scopes them (another user's conversation is
a 404)."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dify_proxy.standin.wire import bad, not_found

if TYPE_CHECKING:
    from dify_proxy.standin.events import Run
    from dify_proxy.standin.human_input import Form

MAX_RECORDS = 10_000  # conversations and messages kept; the oldest go first (benchmarks)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as Dify shows it: the stand-in's own keys start with `_`."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class Records:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.runs: dict[str, Run] = {}  # by task id, while their request runs
        self.flows: dict[str, Run] = {}  # chatflow and workflow runs, by workflow run id
        self.flow_tasks: dict[str, Run] = {}  # the same, by task id
        self.forms: dict[str, Form] = {}  # by form token
        self.files: dict[str, dict[str, Any]] = {}  # uploads by id, with their bytes
        self.variables: dict[str, list[dict[str, Any]]] = {}  # by conversation id
        self.background: set[Any] = set()  # resumed runs' tasks, held so they are not collected
        self.conversations: dict[str, dict[str, Any]] = {}  # by id; each has its `_user`
        self.messages: dict[str, dict[str, Any]] = {}
        self.recordings: dict[str, str] = {}  # by name, for the replay_recording knob
        self._seq = itertools.count()  # orders records created within the same second

    def reset(self) -> None:
        self.calls.clear()
        self.conversations.clear()
        self.messages.clear()
        self.flows.clear()
        self.flow_tasks.clear()
        self.forms.clear()
        self.files.clear()
        self.variables.clear()

    def remember_flow(self, run: Run) -> None:
        """A chatflow or workflow run, for run detail, its events, and a stop after its stream."""
        assert run.workflow_run_id is not None
        self._keep(self.flows, run.workflow_run_id, run)
        self._keep(self.flow_tasks, run.task_id, run)

    def open_streams(self) -> int:
        return sum(r.streaming and r.record["stream_end"] is None for r in self.runs.values())

    def log_call(
        self, method: str, path: str, query: str, headers: dict[str, str], auth_ok: bool, body: Any
    ) -> dict[str, Any]:
        """One request to `/v1`, as the tests see it: the key itself is never recorded."""
        auth = headers.get("authorization")
        call = {
            "method": method,
            "path": path,
            "query": query,
            "headers": {**headers, "authorization": "present" if auth is not None else "absent"},
            "auth_ok": auth_ok,
            "app": None,  # the mode of the app the key opened
            "json": body,
            "task_id": None,
            "status": None,
            "stream_end": None,
            "started_at": time.time(),
            "ended_at": None,
        }
        self.calls.append(call)
        return call

    def remember_chat(self, run: Run, inputs: dict[str, Any], query: str, answer: str) -> None:
        """What Dify's conversation and message lists show once this chat has run."""
        now, seq = run.created_at, next(self._seq)
        conversation = self.conversations.get(run.conversation_id) or {
            "id": run.conversation_id,
            "name": query[:40] or "New conversation",
            "inputs": inputs,
            "status": "normal",
            "introduction": "",
            "created_at": now,
            "_user": run.user,
            "_created": (now, seq),
        }
        conversation.update(updated_at=now, _updated=(now, seq))
        self._keep(self.conversations, run.conversation_id, conversation)
        message = {
            "id": run.message_id,
            "conversation_id": run.conversation_id,
            "parent_message_id": None,
            "inputs": inputs,
            "query": query,
            "answer": answer,
            "message_files": [],
            "feedback": None,
            "retriever_resources": [],
            "agent_thoughts": [],
            "status": "normal",
            "error": None,
            "created_at": now,
            "_user": run.user,
        }
        self._keep(self.messages, run.message_id, message)

    def touch(self, conversation: dict[str, Any]) -> None:
        now = int(time.time())
        conversation.update(updated_at=now, _updated=(now, next(self._seq)))

    def conversation(self, conversation_id: str, user: str) -> dict[str, Any]:
        found = self.conversations.get(conversation_id)
        if found is None or found["_user"] != user:
            raise not_found("Conversation")
        return found

    def message(self, message_id: str, user: str) -> dict[str, Any]:
        found = self.messages.get(message_id)
        if found is None or found["_user"] != user:
            raise not_found("Message")
        return found

    def forget_conversation(self, conversation_id: str) -> None:
        del self.conversations[conversation_id]
        for message_id in [
            m["id"] for m in self.messages.values() if m["conversation_id"] == conversation_id
        ]:
            del self.messages[message_id]

    @staticmethod
    def _keep(store: dict[str, Any], key: str, record: Any) -> None:
        store[key] = record
        while len(store) > MAX_RECORDS:
            del store[next(iter(store))]


RECORDS = web.AppKey("records", Records)
CALL = web.RequestKey("call", dict)  # this request's entry in the call log (only under /v1)


def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, as parsed once for the call log."""
    body = request[CALL]["json"]
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body
