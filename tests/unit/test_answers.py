"""The answer record on the local spool: what a resume reads back, and when it refuses."""

from __future__ import annotations

import os
import time

import pytest

from dify_proxy import answers as answers_module
from dify_proxy.answers import Answers, _decode, _encode, parse_event_id

STREAM = "A" * 22
OWNER = "5b1f0c2e-1111-4a6f-9d3e-0a1b2c3d4e5f"


@pytest.fixture
def answers(tmp_path):
    return Answers(str(tmp_path), window=300, max_bytes=1000)


def record(recorder, *items) -> None:
    """Record events and pings the way the relay does: one batch, encoded."""
    size = sum(len(item[2]) for item in items if item[0] == "e")
    recorder.events([_encode(item) for item in items], size)


def read_all(source) -> list:
    items = []
    for item in source.items(stop=lambda: False):
        if item is None:
            break
        items.append(item)
    return items


def test_a_record_reads_back_its_owner_events_pings_and_end_in_order(answers):
    recorder = answers.record(STREAM, OWNER)
    record(recorder, ("e", 1, b'data: {"a":1}\n\n'), ("p",), ("e", 2, b"data: 2\r\n\r\n"))
    recorder.end("completed")
    assert read_all(answers.find(STREAM, OWNER)) == [
        ("o", OWNER),
        ("e", 1, b'data: {"a":1}\n\n'),
        ("p",),
        ("e", 2, b"data: 2\r\n\r\n"),
        ("x", "completed"),
    ]


def test_event_bytes_come_back_byte_for_byte_whatever_they_hold(answers):
    event = 'data: {"t":"\u2028 e 3 9\\n"}\n\n'.encode() + bytes(range(256))
    recorder = answers.record(STREAM, OWNER)
    record(recorder, ("e", 1, event))
    recorder.end("completed")
    assert read_all(answers.find(STREAM, OWNER))[1] == ("e", 1, event)


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
    record(recorder, ("e", 1, b"x" * 600))
    record(recorder, ("e", 2, b"y" * 600), ("p",))
    record(recorder, ("e", 3, b"z"))
    recorder.end("completed")
    items = read_all(answers.find(STREAM, OWNER))
    assert [item[0] for item in items] == ["o", "e", "t", "x"]
    assert recorder.truncated


def test_a_follower_sees_items_written_after_it_started_reading(answers):
    recorder = answers.record(STREAM, OWNER)
    items = answers.find(STREAM, OWNER).items(stop=lambda: False)
    assert next(items) == ("o", OWNER)
    assert next(items) is None  # nothing new yet
    record(recorder, ("e", 1, b"data: 1\n\n"))
    assert next(item for item in items if item is not None) == ("e", 1, b"data: 1\n\n")


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


def test_an_answer_with_items_lost_to_a_redis_outage_is_marked_unresumable_there(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, redis_client=client)

    def batch(*items):
        return (STREAM, b"".join(_encode(item) for item in items))

    answers._flush([batch(("o", OWNER), ("e", 1, b"one"))])
    client.down = True
    answers._flush([batch(("e", 2, b"two"))])
    client.down = False
    answers._flush([batch(("e", 3, b"three"))])
    answers._flush([batch(("e", 4, b"four"), ("x", "completed"))])
    entries = [sent[1] for sent in client.sent if sent[0] != "expire"]
    sent = [item[0] for fields in entries for item in _decode(fields["b"])[0]]
    assert sent == ["o", "e", "t"]


def test_a_running_answer_has_its_redis_expiry_set_once_not_per_write(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, redis_client=client)
    for n in range(1, 4):
        answers._flush([(STREAM, _encode(("e", n, b"event")))])
    expiries = [sent for sent in client.sent if sent[0] == "expire"]
    assert expiries == [("expire", "dify-proxy:answer:" + STREAM, 330)]


def test_a_redis_key_outlives_its_answer_by_at_least_the_window(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, redis_client=client)
    answers._flush([(STREAM, _encode(("x", "completed")))])
    (ttl,) = [sent[2] for sent in client.sent if sent[0] == "expire"]
    assert ttl >= 300 + answers_module.EXPIRE_EVERY_SECONDS


def test_an_expiry_lost_to_a_redis_outage_is_set_on_the_next_write(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, redis_client=client)
    client.down = True
    answers._flush([(STREAM, _encode(("e", 1, b"event")))])
    client.down = False
    answers._flush([(STREAM, _encode(("e", 2, b"event")))])
    assert [sent[0] for sent in client.sent].count("expire") == 1


def test_an_answers_batches_queued_between_sends_become_one_redis_entry_in_order(tmp_path):
    client = FlakyRedis()
    answers = Answers(str(tmp_path), window=300, max_bytes=1000, redis_client=client)
    answers.queue_redis(STREAM, _encode(("e", 1, b"one")))
    answers.queue_redis("B" * 22, _encode(("e", 1, b"other")))
    answers.queue_redis(STREAM, _encode(("e", 2, b"two")))
    answers.flush()
    mine = [sent[1] for sent in client.sent if sent[0] == "dify-proxy:answer:" + STREAM]
    assert len(mine) == 1
    assert _decode(mine[0]["b"])[0] == [("e", 1, b"one"), ("e", 2, b"two")]
