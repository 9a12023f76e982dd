"""The answer record on the local spool: what a resume reads back, and when it refuses."""

from __future__ import annotations

import os
import time

import pytest
import redis

from dify_proxy import answers as answers_module
from dify_proxy import redisconn, sse
from dify_proxy.answers import Answers, Cut, End, Event, Owner, Ping, _decode, _encode
from dify_proxy.eventids import parse_event_id
from dify_proxy.redisconn import RedisConn
from dify_proxy.relay import StreamStats
from dify_proxy.resume import follow
from tests.support.redis_server import RedisServer

STREAM = "A" * 22
OWNER = "5b1f0c2e-1111-4a6f-9d3e-0a1b2c3d4e5f"


@pytest.fixture
def answers(tmp_path):
    return Answers(str(tmp_path), window=300, max_bytes=1000)


def record(recorder, *items) -> None:
    """Record events and pings the way the relay does: one batch."""
    events = [(item.seq, item.data) for item in items if isinstance(item, Event)]
    pinged = any(isinstance(item, Ping) for item in items)
    recorder.events(events, sum(len(data) for _, data in events), pinged)


def read_all(source) -> list:
    """Every item up to the record's end."""
    items = []
    for item in source.items(stop=lambda: False):
        if item is None:
            continue
        items.append(item)
        if isinstance(item, (End, Cut)):
            break
    return items


def test_a_record_reads_back_its_owner_events_pings_and_end_in_order(answers):
    recorder = answers.record(STREAM, OWNER)
    record(recorder, Event(1, b'data: {"a":1}\n\n'), Ping(), Event(2, b"data: 2\r\n\r\n"))
    recorder.end("completed")
    assert read_all(answers.find(STREAM, OWNER)) == [
        Owner(OWNER),
        Event(1, b'data: {"a":1}\n\n'),
        Event(2, b"data: 2\r\n\r\n"),
        Ping(),
        End("completed", 2),
    ]


def test_event_bytes_come_back_byte_for_byte_whatever_they_hold(answers):
    event = 'data: {"t":"\u2028 e 3 9\\n"}\n\n'.encode() + bytes(range(256))
    recorder = answers.record(STREAM, OWNER)
    record(recorder, Event(1, event))
    recorder.end("completed")
    assert read_all(answers.find(STREAM, OWNER))[1] == Event(1, event)


def test_another_users_answer_is_not_found(answers):
    answers.record(STREAM, OWNER)
    assert answers.find(STREAM, "someone-else") is None


def test_an_unknown_answer_is_not_found(answers):
    assert answers.find(STREAM, OWNER) is None


def test_an_answer_older_than_the_window_is_not_found(tmp_path):
    answers = Answers(str(tmp_path), window=1, max_bytes=1000)
    answers.record(STREAM, OWNER).end("completed")
    old = time.time() - 5
    os.utime(answers.spool_path(STREAM), (old, old))
    assert answers.find(STREAM, OWNER) is None


def test_past_the_byte_cap_events_are_dropped_and_the_record_says_so(answers):
    recorder = answers.record(STREAM, OWNER)
    record(recorder, Event(1, b"x" * 600))
    record(recorder, Event(2, b"y" * 600), Ping())
    record(recorder, Event(3, b"z"))
    recorder.end("completed")
    source = answers.find(STREAM, OWNER)
    assert source.ending == Cut()
    assert read_all(source) == [Owner(OWNER), Event(1, b"x" * 600), Cut()]
    assert recorder.truncated


def test_a_follower_sees_items_written_after_it_started_reading(answers):
    recorder = answers.record(STREAM, OWNER)
    items = answers.find(STREAM, OWNER).items(stop=lambda: False)
    assert next(items) == Owner(OWNER)
    assert next(items) is None  # the piece read
    assert next(items) is None  # nothing new yet
    record(recorder, Event(1, b"data: 1\n\n"))
    assert next(item for item in items if item is not None) == Event(1, b"data: 1\n\n")


def test_a_resumed_client_marks_the_answer_seen(answers):
    answers.record(STREAM, OWNER)
    assert answers.seen_at(STREAM) == 0
    answers.mark_seen(STREAM)
    assert time.time() - answers.seen_at(STREAM) < 5


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (f"{STREAM}-0", (STREAM, 0)),
        (f"{STREAM}-12", (STREAM, 12)),
        (f" {STREAM}-3 ", (STREAM, 3)),
        (f"{STREAM[:-1]}-3", None),
        (f"{STREAM}x-3", None),
        (f"{STREAM}-", None),
        (f"{STREAM}--3", None),
        ("abc-3", None),
        (f"{STREAM}-1234567890", None),
        ("../../etc/passwd-1", None),
    ],
)
def test_only_the_proxys_own_event_ids_name_an_answer(value, parsed):
    assert parse_event_id(value) == parsed


class FlakyRedis:
    """Just enough of a Redis client to see what a flush sends; fails while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.sent: list[tuple] = []

    def pipeline(self, transaction: bool = True) -> FlakyRedis:
        self.queued: list[tuple] = []
        return self

    def xadd(self, key, fields, maxlen=None, approximate=True):
        self.queued.append((key, fields))

    def expire(self, key, ttl):
        self.queued.append(("expire", key, ttl))

    def execute(self):
        import redis

        if self.down:
            raise redis.ConnectionError("down")
        self.sent.extend(self.queued)


def fake_conn(client) -> RedisConn:
    conn = RedisConn(None)
    conn.client = client
    return conn


@pytest.fixture(autouse=True)
def no_back_off(monkeypatch):
    """Redis is tried again at once after a failure: each test says when it is down."""
    monkeypatch.setattr(redisconn, "REDIS_RETRY_SECONDS", 0)


def test_an_answer_with_items_lost_to_a_redis_outage_is_marked_unresumable_there(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))

    def batch(*items):
        return (STREAM, b"".join(_encode(item) for item in items))

    answers._flush([batch(Owner(OWNER), Event(1, b"one"))])
    client.down = True
    answers._flush([batch(Event(2, b"two"))])
    client.down = False
    answers._flush([batch(Event(3, b"three"))])
    answers._flush([batch(Event(4, b"four"), End("completed", 4))])
    entries = [sent[1] for sent in client.sent if sent[0] != "expire"]
    sent = [item for fields in entries for item in _decode(fields["b"])[0]]
    assert sent == [Owner(OWNER), Event(1, b"one"), Cut()]


def test_a_running_answer_has_its_redis_expiry_set_once_not_per_write(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))
    for n in range(1, 4):
        answers._flush([(STREAM, _encode(Event(n, b"event")))])
    expiries = [sent for sent in client.sent if sent[0] == "expire"]
    assert expiries == [("expire", "dify-proxy:answer:" + STREAM, 330)]


def test_a_redis_key_outlives_its_answer_by_at_least_the_window(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))
    answers._flush([(STREAM, _encode(End("completed", 0)))])
    (ttl,) = [sent[2] for sent in client.sent if sent[0] == "expire"]
    assert ttl >= 300 + answers_module.EXPIRE_EVERY_SECONDS


def test_an_expiry_lost_to_a_redis_outage_is_set_on_the_next_write(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))
    client.down = True
    answers._flush([(STREAM, _encode(Event(1, b"event")))])
    client.down = False
    answers._flush([(STREAM, _encode(Event(2, b"event")))])
    assert [sent[0] for sent in client.sent].count("expire") == 1


def test_an_answers_batches_queued_between_sends_become_one_redis_entry_in_order(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))
    answers.queue_redis(STREAM, _encode(Event(1, b"one")))
    answers.queue_redis("B" * 22, _encode(Event(1, b"other")))
    answers.queue_redis(STREAM, _encode(Event(2, b"two")))
    answers.flush()
    mine = [sent[1] for sent in client.sent if sent[0] == "dify-proxy:answer:" + STREAM]
    assert len(mine) == 1
    assert _decode(mine[0]["b"])[0] == [Event(1, b"one"), Event(2, b"two")]


def test_an_outage_longer_than_the_back_off_still_marks_the_answer_unresumable(tmp_path):
    """L2: the mark was lost when Redis was still down once the back-off was over, and a
    resume elsewhere then waited for the rest and ended with upstream_dropped."""
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))

    def batch(*items):
        return (STREAM, b"".join(_encode(item) for item in items))

    answers._flush([batch(Owner(OWNER), Event(1, b"one"))])
    client.down = True
    answers._flush([batch(Event(2, b"two"))])
    answers._flush([batch(Event(3, b"three"))])  # tried again after the back-off: still down
    client.down = False
    answers._flush([batch(Event(4, b"four"), End("completed", 4))])
    entries = [sent[1] for sent in client.sent if sent[0] != "expire"]
    sent = [item for fields in entries for item in _decode(fields["b"])[0]]
    assert sent == [Owner(OWNER), Event(1, b"one"), Cut()]


def test_answers_that_ended_during_an_outage_are_marked_and_forgotten_once_redis_is_back(
    tmp_path,
):
    """L11: one entry per answer stayed in memory for good after an outage."""
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=fake_conn(client))
    client.down = True
    ended = [f"{n:022d}" for n in range(50)]
    for stream_id in ended:
        answers._flush([(stream_id, _encode(Event(1, b"e")) + _encode(End("completed", 1)))])
    client.down = False
    answers.flush()
    assert answers._broken == {}
    marked = {sent[0] for sent in client.sent if sent[0] != "expire"}
    assert marked == {"dify-proxy:answer:" + stream_id for stream_id in ended}


# --- with a real Redis ------------------------------------------------------------------------


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_an_unknown_id_and_another_users_id_cost_redis_the_same(tmp_path, redis_server):
    """L5: an unknown id cost one more Redis command than another user's id on this instance,
    which told whether an id exists."""
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, conn=RedisConn(redis_server.url))
    answers.record(STREAM, OWNER).end("completed")
    answers.flush()
    probe = redis_server.client()

    def commands() -> int:
        return probe.info("stats")["total_commands_processed"]

    before = commands()
    assert answers.find("B" * 22, OWNER) is None
    unknown = commands() - before
    before = commands()
    assert answers.find(STREAM, "someone-else") is None
    assert commands() - before == unknown


class FailsOnSecondRead:
    """A real Redis client whose second stream read fails, as Redis going away mid-resume."""

    def __init__(self, client) -> None:
        self._client = client
        self.reads = 0

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name not in ("xread", "xrange"):
            return attribute

        def read(*args, **kwargs):
            self.reads += 1
            if self.reads == 2:
                raise redis.ConnectionError("gone")
            return attribute(*args, **kwargs)

        return read


def test_redis_failing_while_a_resume_reads_ends_it_with_an_error_event(tmp_path, redis_server):
    """L3: the resume ended as if the answer had, with no error event."""
    writer = Answers(
        str(tmp_path / "a"), window=300, max_bytes=10_000, conn=RedisConn(redis_server.url)
    )
    recorder = writer.record(STREAM, OWNER)
    record(recorder, Event(1, b"data: {}\n\n"), Event(2, b"data: {}\n\n"))
    writer.flush()
    record(recorder, Event(3, b"data: {}\n\n"))
    writer.flush()
    conn = RedisConn(redis_server.url)
    reader = Answers(str(tmp_path / "b"), window=300, max_bytes=10_000, conn=conn)
    source = reader.find(STREAM, OWNER)
    conn.client = FailsOnSecondRead(conn.client)
    stats = StreamStats(stream_id=STREAM.encode())
    body = follow(
        source,
        STREAM,
        1,
        heartbeat_interval=5,
        give_up_after=5,
        stats=stats,
        mark_seen=lambda: None,
    )
    events = sse.cut_events(b"".join(body))[0]
    assert sse.event_data(events[-1])["code"] == "resume_incomplete"
    assert stats.end == "resume_incomplete"
