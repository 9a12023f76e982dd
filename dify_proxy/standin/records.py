"""What the stand-in remembers: the call log the tests read (`GET /_standin/calls`), the chat
runs that a stop can reach, each user's conversations (with their variables) and messages,
scoped per `user` as Dify scopes them (another user's conversation is a 404), and the uploaded
files, which, as in Dify, belong to the app and not to a user."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dify_proxy.standin.wire import bad, not_found

if TYPE_CHECKING:
    from dify_proxy.standin.chat import ChatRun

MAX_RECORDS = 10_000  # conversations and messages kept; the oldest go first (benchmarks)
MAX_FILES = 256  # uploads kept, each with at most KEEP_FILE_BYTES of content (api.py)
# The variables every conversation has, as if the app (a chatflow) declared them: each is
# (name, value_type, default value, description).
CONVERSATION_VARIABLES = (
    ("city", "string", "", "Where the user is going."),
    ("visits", "number", 0, "How often the user came back."),
    ("preferences", "object", {}, "What the user likes."),
)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as Dify shows it: the stand-in's own keys start with `_`."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


class Records:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.runs: dict[str, ChatRun] = {}  # by task id, while they run
        self.conversations: dict[str, dict[str, Any]] = {}  # by id; each has its `_user`
        self.messages: dict[str, dict[str, Any]] = {}
        self.variables: dict[str, list[dict[str, Any]]] = {}  # by conversation id
        self.files: dict[str, dict[str, Any]] = {}  # uploads by id, with their `_content`
        self.files_in_messages: set[str] = set()  # what Dify's file preview serves
        self.recordings: dict[str, str] = {}  # by name, for the replay_recording knob
        self._seq = itertools.count()  # orders records created within the same second

    def reset(self) -> None:
        self.calls.clear()
        self.conversations.clear()
        self.messages.clear()
        self.variables.clear()
        self.files.clear()
        self.files_in_messages.clear()

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
            "json": body,
            "task_id": None,
            "status": None,
            "stream_end": None,
            "started_at": time.time(),
            "ended_at": None,
        }
        self.calls.append(call)
        return call

    def remember_chat(self, run: ChatRun, inputs: dict[str, Any], query: str, answer: str) -> None:
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
        if run.conversation_id not in self.conversations:
            self.variables[run.conversation_id] = [
                {
                    "id": str(uuid.uuid4()),
                    "name": name,
                    "value_type": value_type,
                    "value": value,
                    "description": description,
                    "created_at": now,
                    "updated_at": now,
                }
                for name, value_type, value, description in CONVERSATION_VARIABLES
            ]
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

    def attach_files(self, files: Any) -> None:
        """Dify's file preview serves only files some message of the app carries."""
        for file in files if isinstance(files, list) else []:
            if isinstance(file, dict) and file.get("upload_file_id") in self.files:
                self.files_in_messages.add(file["upload_file_id"])

    def keep_file(self, file: dict[str, Any]) -> None:
        self.files[file["id"]] = file
        while len(self.files) > MAX_FILES:
            oldest = next(iter(self.files))
            del self.files[oldest]
            self.files_in_messages.discard(oldest)

    def forget_conversation(self, conversation_id: str) -> None:
        del self.conversations[conversation_id]
        self.variables.pop(conversation_id, None)
        for message_id in [
            m["id"] for m in self.messages.values() if m["conversation_id"] == conversation_id
        ]:
            del self.messages[message_id]

    def _keep(self, store: dict[str, dict[str, Any]], key: str, record: dict[str, Any]) -> None:
        store[key] = record
        while len(store) > MAX_RECORDS:
            oldest = next(iter(store))
            del store[oldest]
            self.variables.pop(oldest, None)  # a conversation's variables go with it


RECORDS = web.AppKey("records", Records)
CALL = web.RequestKey("call", dict)  # this request's entry in the call log (only under /v1)


def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, as parsed once for the call log."""
    body = request[CALL]["json"]
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body
