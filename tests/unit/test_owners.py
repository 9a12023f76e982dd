"""Whose is an id: bindings in the local spool (every worker) and in Redis (every instance)."""

from __future__ import annotations

import os
import stat
import time

import pytest
import redis

from dify_proxy.owners import REDIS_PREFIX, Binding, Owners, ids_in
from tests.support.redis_server import RedisServer

TASK = "ef00f9ca-7c32-46b7-9e0a-8a2e6db0e7f2"
RUN = "13924a7f-b93e-4e89-80c2-6525bb22e834"
TOKEN = "KawXGk6sET2ndcOxyXFfFB"
LATER_TOKEN = "qVU8EuaWUJcIA1QogXAq1o"


@pytest.fixture
def owners(tmp_path) -> Owners:
    return Owners(str(tmp_path), default_ttl=3600)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    return client


def paused_event(expiration_time: int) -> dict:
    """A `human_input_required` event as real Dify 1.16.1 sends it (hitl-A1)."""
    return {
        "event": "human_input_required",
        "task_id": TASK,
        "workflow_run_id": RUN,
        "data": {"form_token": TOKEN, "expiration_time": expiration_time, "node_id": "review"},
    }


def test_a_bound_id_is_its_users_and_nobody_elses(owners):
    owners.bind("task", TASK, "alice")
    assert owners.owner_of("task", TASK) == "alice"
    assert owners.owned("task", TASK, "alice") == Binding("alice")
    assert owners.owned("task", TASK, "bob") is None


def test_an_id_never_bound_has_no_owner(owners):
    assert owners.owner_of("task", TASK) is None
    assert owners.owned("task", TASK, "alice") is None


def test_kinds_are_kept_apart(owners):
    owners.bind("task", TASK, "alice")
    assert owners.owner_of("run", TASK) is None


def test_a_binding_past_its_time_is_gone(owners):
    owners.bind("task", TASK, "alice", ttl=-1)
    assert owners.owner_of("task", TASK) is None


def test_bindings_live_in_a_private_subdirectory_of_the_spool_under_hashed_names(tmp_path):
    owners = Owners(str(tmp_path))
    owners.bind("form", TOKEN, "alice")
    directory = tmp_path / "bindings"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = os.listdir(directory)
    assert len(names) == 1 and TOKEN not in names[0]
    assert TOKEN.encode() not in (directory / names[0]).read_bytes()


def test_another_worker_on_the_same_spool_sees_the_binding(tmp_path):
    Owners(str(tmp_path)).bind("run", RUN, "alice")
    assert Owners(str(tmp_path)).owner_of("run", RUN) == "alice"


def test_expired_binding_files_are_swept(tmp_path, monkeypatch):
    owners = Owners(str(tmp_path))
    owners.bind("task", TASK, "alice", ttl=-10)
    monkeypatch.setattr(owners, "_swept_at", 0.0)
    owners.bind("run", RUN, "alice")
    assert len(os.listdir(tmp_path / "bindings")) == 1


def test_an_unknown_kind_is_a_programming_error(owners):
    with pytest.raises(ValueError):
        owners.bind("conversation", TASK, "alice")


def test_a_form_token_keeps_its_run_id(owners):
    owners.binder("alice")(paused_event(int(time.time()) + 60))
    assert owners.lookup("form", TOKEN) == Binding("alice", RUN)


def test_the_ids_of_an_event_are_its_task_run_and_form_tokens():
    found = ids_in(paused_event(1796702375))
    assert [(f.kind, f.value) for f in found] == [("task", TASK), ("run", RUN), ("form", TOKEN)]
    assert found[2].expires_at == 1796702375.0


def test_the_forms_of_a_pause_are_found_in_its_reasons():
    paused = {
        "event": "workflow_paused",
        "task_id": TASK,
        "workflow_run_id": RUN,
        "data": {
            "workflow_run_id": RUN,
            "reasons": [{"form_token": TOKEN}, {"form_token": LATER_TOKEN}, "junk"],
        },
    }
    assert [f.value for f in ids_in(paused) if f.kind == "form"] == [TOKEN, LATER_TOKEN]


@pytest.mark.parametrize("data", [None, "text", [], {"task_id": 7}, {"task_id": ""}])
def test_anything_else_carries_no_ids(data):
    assert ids_in(data) == []


def test_a_binder_writes_each_id_once(owners, monkeypatch):
    writes = []
    real = owners.bind_many
    monkeypatch.setattr(owners, "bind_many", lambda b, u: writes.append(list(b)) or real(b, u))
    binder = owners.binder("alice")
    binder({"event": "workflow_started", "task_id": TASK, "workflow_run_id": RUN})
    binder({"event": "message_end", "task_id": TASK})
    assert sum(len(w) for w in writes) == 2


def test_a_form_that_outlives_the_default_keeps_its_run_and_task_bound_as_long(owners):
    binder = owners.binder("alice")
    binder({"event": "workflow_started", "task_id": TASK, "workflow_run_id": RUN})
    far = time.time() + 10 * 3600  # the default here is one hour
    binder(paused_event(int(far)))
    for kind, value in (("task", TASK), ("run", RUN), ("form", TOKEN)):
        mtime = os.stat(os.path.join(owners.dir, _name(owners, kind, value))).st_mtime
        assert mtime >= far - 1


def _name(owners: Owners, kind: str, value: str) -> str:
    from dify_proxy.owners import _hashed

    return _hashed(kind, value)


# --- Redis ----------------------------------------------------------------------------------


def test_with_redis_another_instance_sees_the_binding(tmp_path, redis_client):
    Owners(str(tmp_path / "one"), redis_client=redis_client).bind("task", TASK, "alice")
    other = Owners(str(tmp_path / "two"), redis_client=redis_client)
    assert other.owner_of("task", TASK) == "alice"
    assert other.owned("task", TASK, "bob") is None


def test_the_redis_key_expires_with_the_binding(tmp_path, redis_client):
    Owners(str(tmp_path), redis_client=redis_client).bind("task", TASK, "alice", ttl=120)
    (key,) = redis_client.keys(REDIS_PREFIX + "*")
    assert 100 < redis_client.ttl(key) <= 120
    assert TASK.encode() not in key


def test_a_binder_makes_one_redis_round_trip_for_an_answers_ids(tmp_path, redis_client):
    owners = Owners(str(tmp_path), redis_client=redis_client)
    before = redis_client.info("stats")["total_commands_processed"]
    owners.binder("alice")({"event": "workflow_started", "task_id": TASK, "workflow_run_id": RUN})
    after = redis_client.info("stats")["total_commands_processed"]
    assert after - before == 2 + 1  # two SETs in one pipeline, and the INFO itself


def test_a_failing_redis_is_reported_and_the_local_binding_still_holds(tmp_path):
    server = RedisServer()  # never started: nothing listens there
    failures = []
    owners = Owners(
        str(tmp_path),
        redis_client=redis.Redis.from_url(server.url, socket_connect_timeout=0.2),
        on_redis_error=failures.append,
    )
    owners.bind("task", TASK, "alice")
    assert failures
    assert owners.owned("task", TASK, "alice") == Binding("alice")


def test_redis_in_its_back_off_is_not_asked(tmp_path, redis_client):
    owners = Owners(str(tmp_path / "a"), redis_client=redis_client, redis_usable=lambda: False)
    owners.bind("task", TASK, "alice")
    assert redis_client.keys(REDIS_PREFIX + "*") == []
