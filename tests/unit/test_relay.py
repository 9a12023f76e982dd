"""The stream relay's whole life, in process: a Dify on loopback sends its answer in several
reads with pauses, and the test reads what the client would get.

What is specified here is what a client and Dify see (bytes, keep-alives, the final event, the
stop call, the hang-up), plus one thing nobody sees until it leaks: once a stream has ended,
however it ended, nothing of it is left in the relay's registry of open answers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dify_proxy import relay as relay_module
from dify_proxy import sse
from dify_proxy.relay import StreamStats, drain, relay
from tests.support.fake_dify import FakeDify
from tests.support.messages import is_a_sentence

TASK = "c3800678-a077-43df-a102-53f23ed20b88"
CONVERSATION = "45701982-8118-4bc5-8e9b-64562b4555f2"
MESSAGE = "9da23599-e713-473b-982c-4328d4f5c78a"


def dify_event(event: str, **fields: Any) -> bytes:
    payload = {
        "event": event,
        "task_id": TASK,
        "conversation_id": CONVERSATION,
        "message_id": MESSAGE,
        "created_at": 1705407629,
        **fields,
    }
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


HELLO = dify_event("message", answer="Hél")
WORLD = dify_event("message", answer="lo 😀\u2028")
END = dify_event("message_end", metadata={"usage": {"total_tokens": 42}})
DIFY_ERROR = dify_event("error", status=400, code="invalid_param", message="bad")


_streams: list[Stream] = []  # closed after each test, so a failing test leaks into no other


class Stream:
    """One relayed stream, as the WSGI server drives it: `next()` is one write to the client."""

    def __init__(
        self,
        dify: FakeDify,
        heartbeat: float = 30.0,
        on_stop: Any = lambda task_id: None,
        **options: Any,
    ) -> None:
        _streams.append(self)
        self.stats = StreamStats()
        self.on_stop = on_stop  # what Dify does when told to stop
        self.stopped: list[str] = []
        self.stop_called = threading.Event()
        self.ticks = 0
        self.ended: list[StreamStats] = []
        self.body = relay(
            dify.open(options.pop("read_timeout", 60.0)),
            heartbeat_interval=heartbeat,
            stop=self._stop,
            stats=self.stats,
            on_tick=self._tick,
            on_end=self.ended.append,
            **options,
        )

    def _stop(self, task_id: str) -> None:
        self.stopped.append(task_id)
        self.stop_called.set()
        self.on_stop(task_id)

    def _tick(self) -> None:
        self.ticks += 1

    def __iter__(self) -> Iterator[bytes]:
        return self.body

    def read_all(self) -> bytes:
        return b"".join(self.body)

    def read_until(self, wanted: bytes) -> bytes:
        got = b""
        while wanted not in got:
            got += next(self.body)
        return got


def final_event(body: bytes) -> dict[str, Any]:
    events, rest = sse.cut_events(body)
    assert rest == b""
    return sse.event_data(events[-1])


@pytest.fixture
def dify() -> Iterator[FakeDify]:
    with FakeDify() as server:
        yield server


def eventually(condition, seconds: float = 5.0) -> bool:
    """The reader finishes an answer on its own thread, a moment after the client's stream."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def nothing_open() -> bool:
    return not relay_module._open


@pytest.fixture(autouse=True)
def short_stop_read(monkeypatch) -> None:
    """A fake Dify that ignores a stop is hung up on after this, not after seconds."""
    monkeypatch.setattr(relay_module, "STOP_READ_SECONDS", 0.3)


@pytest.fixture(autouse=True)
def nothing_left_open() -> Iterator[None]:
    """Every test here ends its streams; none may stay registered afterwards (a leak)."""
    assert nothing_open()
    yield
    left_open = eventually(nothing_open)
    while _streams:
        _streams.pop().body.close()
    relay_module._draining.clear()  # drain() marks the worker as stopping
    assert left_open, relay_module._open


# --- bytes ---------------------------------------------------------------------------------


def test_events_split_across_reads_with_pauses_reach_the_client_byte_for_byte(dify):
    answer = HELLO + b"event: ping\n\n" + WORLD + END
    stream = Stream(dify)
    mid_utf8 = answer.index("é".encode()) + 1
    cuts = [0, 3, mid_utf8, len(HELLO) + 2, len(HELLO) + 15, len(answer) - 40, len(answer)]
    dify.send(*(answer[a:b] for a, b in zip(cuts, cuts[1:], strict=False)), pause=0.01)
    dify.end()
    assert stream.read_all() == answer


def test_the_first_write_is_empty_so_the_head_goes_out_before_difys_first_event(dify):
    stream = Stream(dify)
    assert next(stream.body) == b""
    dify.send(HELLO, END)
    dify.end()
    assert stream.read_all() == HELLO + END


def test_each_write_carries_only_whole_events(dify):
    stream = Stream(dify)
    assert next(stream.body) == b""
    dify.send(HELLO[:10], HELLO[10:] + WORLD[:5], WORLD[5:], pause=0.02)
    writes = [next(stream.body), next(stream.body)]
    dify.send(END)
    dify.end()
    writes.extend(stream)
    assert b"".join(writes) == HELLO + WORLD + END
    for write in writes:
        assert sse.cut_events(write)[1] == b""


def test_a_crlf_blank_line_split_between_its_cr_and_lf_still_gets_its_id_in_place(dify):
    crlf = HELLO.replace(b"\n\n", b"\r\n\r\n")
    stream = Stream(dify, ids=True)
    dify.send(crlf[:-1], pause=0.02)
    dify.send(crlf[-1:] + END)
    dify.end()
    stream_id = stream.stats.stream_id
    assert stream.read_all() == (
        sse.opening(stream_id + b"-0")
        + sse.with_id(crlf, stream_id + b"-1")
        + sse.with_id(END, stream_id + b"-2")
    )
    assert stream.stats.end == "completed"


def test_with_ids_each_data_event_gets_an_id_and_pings_pass_unchanged(dify):
    stream = Stream(dify, ids=True)
    dify.send(HELLO, b"event: ping\n\n", END)
    dify.end()
    body = stream.read_all()
    events = sse.cut_events(body)[0]
    stream_id = stream.stats.stream_id
    assert events == [
        sse.opening(stream_id + b"-0"),
        sse.with_id(HELLO, stream_id + b"-1"),
        b"event: ping\n\n",
        sse.with_id(END, stream_id + b"-2"),
    ]


# --- keep-alives -------------------------------------------------------------------------


def test_a_silent_dify_gets_the_client_a_ping_every_heartbeat(dify):
    stream = Stream(dify, heartbeat=0.05)
    assert next(stream.body) == b""
    assert next(stream.body) == sse.PING
    assert next(stream.body) == sse.PING
    assert stream.ticks == 2
    dify.send(HELLO, END)
    dify.end()
    assert stream.read_all().endswith(HELLO + END)


def test_every_write_of_events_also_ticks_so_a_busy_stream_renews_its_lease(dify):
    stream = Stream(dify)
    dify.send(HELLO, pause=0.05)
    dify.send(WORLD, pause=0.05)
    dify.send(END)
    dify.end()
    writes = [w for w in stream if w]
    assert stream.ticks == len(writes) >= 2


# --- endings -------------------------------------------------------------------------------


def test_message_end_completes_the_stream_without_a_stop(dify):
    stream = Stream(dify)
    dify.send(HELLO, END)
    dify.end()
    assert stream.read_all() == HELLO + END
    assert stream.stats.end == "completed"
    assert eventually(lambda: stream.ended == [stream.stats])
    assert not stream.stop_called.wait(0.1)


def test_difys_own_error_event_ends_the_stream_as_dify_sent_it_without_a_stop(dify):
    stream = Stream(dify)
    dify.send(HELLO, DIFY_ERROR)
    dify.end()
    assert stream.read_all() == HELLO + DIFY_ERROR
    assert stream.stats.end == "upstream_error"
    assert not stream.stop_called.wait(0.1)


@pytest.mark.parametrize("how", ["body ends early", "connection cut"])
def test_a_dify_that_stops_before_message_end_gets_the_client_a_502_error_event(dify, how):
    stream = Stream(dify)
    dify.send(HELLO)
    dify.end() if how == "body ends early" else dify.drop()
    body = stream.read_all()
    assert body.startswith(HELLO)
    error = final_event(body)
    assert error["event"] == "error"
    assert (error["status"], error["code"]) == (502, "upstream_dropped")
    assert (error["conversation_id"], error["message_id"]) == (CONVERSATION, MESSAGE)
    assert stream.stats.end == "upstream_dropped"
    assert is_a_sentence(error["message"])
    assert eventually(lambda: stream.ended == [stream.stats])


def test_a_dropped_stream_asks_dify_to_stop_the_task(dify):
    stream = Stream(dify)
    dify.send(HELLO)
    dify.drop()
    stream.read_all()
    assert stream.stop_called.wait(5)
    assert stream.stopped == [TASK]


def test_a_dify_silent_past_the_read_timeout_gets_the_client_a_504_error_event(dify):
    stream = Stream(dify, heartbeat=0.05, read_timeout=0.3)
    dify.send(HELLO)
    body = stream.read_all()
    assert body.startswith(HELLO)
    assert sse.PING in body  # keep-alives while waiting
    error = final_event(body)
    assert (error["event"], error["status"], error["code"]) == ("error", 504, "upstream_timeout")
    assert stream.stats.end == "timeout"
    assert stream.stop_called.wait(5)
    assert dify.hung_up.wait(10)


def test_the_error_event_is_dify_shaped_with_a_message_and_a_time(dify):
    stream = Stream(dify)
    dify.drop()
    error = final_event(stream.read_all())
    assert set(error) == {
        "event",
        "conversation_id",
        "message_id",
        "created_at",
        "status",
        "code",
        "message",
    }
    assert isinstance(error["created_at"], int) and error["created_at"] > 1_700_000_000
    assert error["message"].endswith("incomplete.")


def test_with_ids_the_final_error_event_carries_the_next_id(dify):
    stream = Stream(dify, ids=True)
    dify.send(HELLO)
    dify.drop()
    events = sse.cut_events(stream.read_all())[0]
    assert events[-1].endswith(b"id: " + stream.stats.stream_id + b"-2\n\n")


# --- the client leaves -----------------------------------------------------------------------


def test_a_client_that_leaves_mid_answer_stops_the_task_and_hangs_up_on_dify(dify):
    stream = Stream(dify)
    dify.send(HELLO)
    assert stream.read_until(HELLO)
    stream.body.close()  # what the WSGI server does when a write fails
    assert stream.stats.end == "client_gone"
    assert stream.stop_called.wait(5)
    assert stream.stopped == [TASK]
    assert dify.hung_up.wait(10)
    assert eventually(lambda: stream.ended == [stream.stats])


def test_a_client_that_leaves_while_dify_is_silent_gets_the_task_stopped_and_dify_hung_up(dify):
    stream = Stream(dify, heartbeat=0.05)
    dify.send(HELLO)
    stream.read_until(HELLO)
    assert next(stream.body) == sse.PING
    stream.body.close()
    assert dify.hung_up.wait(10)


def test_a_client_that_leaves_at_the_first_write_still_gets_difys_task_stopped(dify):
    """Issue 11, item 6: the task id comes with Dify's first event, so the relay reads on until
    it arrives, then stops the task and hangs up."""
    stream = Stream(dify)
    assert next(stream.body) == b""
    stream.body.close()
    assert stream.stats.end == "client_gone"
    assert not stream.stop_called.wait(0.2)  # no task id yet: nothing to stop
    dify.send(HELLO)
    assert stream.stop_called.wait(5)
    assert stream.stopped == [TASK]
    assert dify.hung_up.wait(10)


def test_a_client_that_leaves_after_message_end_stops_nothing(dify):
    stream = Stream(dify)
    dify.send(HELLO + END)
    stream.read_until(END)
    dify.end()
    assert stream.read_all() == b""
    assert not stream.stop_called.wait(0.1)


# --- tokens of answers nobody reads (issue 20, M4) -------------------------------------------


def end_after_stop(dify: FakeDify, *events: bytes):
    """Dify's answer to a stop: its last events, then the end of the stream."""

    def on_stop(task_id: str) -> None:
        dify.send(*events)
        dify.end()

    return on_stop


def leave_after(stream: Stream, wanted: bytes) -> None:
    stream.read_until(wanted)
    stream.body.close()  # the client left


def test_an_answer_nobody_reads_is_stopped_while_read_on_and_difys_usage_is_kept(dify):
    stream = Stream(dify, on_stop=end_after_stop(dify, END))
    dify.send(HELLO)
    leave_after(stream, HELLO)
    assert eventually(lambda: stream.ended == [stream.stats])
    assert stream.stats.usage == {"total_tokens": 42}
    assert stream.stats.answer_end == "abandoned"
    assert stream.stopped == [TASK]  # asked once


def test_a_stopped_chatflow_that_sends_only_workflow_finished_counts_its_total_tokens(dify):
    finished = dify_event("workflow_finished", data={"status": "stopped", "total_tokens": 7})
    stream = Stream(dify, on_stop=end_after_stop(dify, finished))
    dify.send(HELLO)
    leave_after(stream, HELLO)
    assert eventually(lambda: stream.ended == [stream.stats])
    assert stream.stats.usage == {"total_tokens": 7}


def test_a_chatflows_message_end_usage_wins_over_its_workflow_finished(dify):
    finished = dify_event("workflow_finished", data={"status": "succeeded", "total_tokens": 7})
    stream = Stream(dify)
    dify.send(HELLO, END, finished)
    dify.end()
    stream.read_all()
    assert stream.stats.usage == {"total_tokens": 42}


def test_when_dify_does_not_end_after_the_stop_one_token_per_event_is_counted(dify):
    stream = Stream(dify)
    dify.send(HELLO, WORLD)
    leave_after(stream, WORLD)
    assert stream.stop_called.wait(5)
    assert dify.hung_up.wait(10)
    assert eventually(lambda: stream.ended == [stream.stats])
    assert stream.stats.usage == {"total_tokens": 2, "estimated": True}


def test_a_dropped_answer_counts_one_token_per_event_dify_sent(dify):
    stream = Stream(dify)
    dify.send(HELLO, WORLD, HELLO)
    dify.drop()
    stream.read_all()  # ends with the proxy's own error event, which is not Dify's
    assert stream.stats.usage == {"total_tokens": 3, "estimated": True}


def test_an_answer_that_brought_no_event_counts_no_tokens(dify):
    stream = Stream(dify)
    dify.drop()
    stream.read_all()
    assert stream.stats.usage is None


# --- drain ---------------------------------------------------------------------------------


def reading(stream: Stream) -> Stream:
    """Drive a new stream until its reader runs (Dify still silent)."""
    assert next(stream.body) in (b"", sse.opening(stream.stats.stream_id + b"-0"))
    assert next(stream.body) == sse.PING
    return stream


def test_drain_at_its_deadline_ends_every_running_answer_with_a_503_restarting_event(dify):
    first = Stream(dify)
    dify.send(HELLO)
    first.read_until(HELLO)
    second = reading(Stream(dify, heartbeat=0.05))  # opened after HELLO went to the first
    assert drain(0)["ended_at_deadline"] == 2
    for stream in (first, second):
        error = final_event(stream.read_all().replace(sse.PING, b""))
        assert (error["event"], error["status"], error["code"]) == (
            "error",
            503,
            "server_restarting",
        )
        assert stream.stats.end == "server_restarting"
        assert is_a_sentence(error["message"]) and "restarting" in error["message"]
    assert first.stop_called.wait(5)
    assert first.stopped == [TASK]
    assert dify.hung_up.wait(10)


def test_drain_lets_an_answer_that_ends_before_the_deadline_finish_whole(dify):
    stream = Stream(dify)
    dify.send(HELLO)
    stream.read_until(HELLO)
    outcome = []
    draining = threading.Thread(target=lambda: outcome.append(drain(10)))
    draining.start()
    dify.send(END)
    dify.end()
    assert stream.read_all() == END
    draining.join(15)
    assert outcome == [{"finished": 1, "ended_at_deadline": 0, "interrupted": 0}]
    assert stream.stats.end == "completed"


def test_a_drained_stream_with_ids_gets_its_next_id(dify):
    stream = reading(Stream(dify, ids=True, heartbeat=0.05))
    drain(0)
    events = sse.cut_events(stream.read_all())[0]
    assert b"id: " + stream.stats.stream_id + b"-1\n" in events[-1]
    assert events[-1].endswith(b"retry: 1000\n\n")  # come back soon, to another instance


# --- what the request log and the quotas learn ---------------------------------------------


def test_stats_count_data_events_and_bytes_and_note_the_answers_ids_and_usage(dify):
    stream = Stream(dify)
    dify.send(HELLO, b"event: ping\n\n", WORLD, pause=0.01)
    dify.send(END)
    dify.end()
    body = stream.read_all()
    stats = stream.stats
    assert stats.events == 3
    assert stats.bytes == len(body)
    assert stats.first_event is not None and stats.first_event >= stats.started
    assert (stats.task_id, stats.conversation_id, stats.message_id) == (
        TASK,
        CONVERSATION,
        MESSAGE,
    )
    assert stats.usage == {"total_tokens": 42}


def test_the_first_task_id_is_kept_even_if_a_later_event_names_another(dify):
    stream = Stream(dify)
    dify.send(HELLO, dify_event("message", task_id="other", answer="x"))
    dify.drop()
    stream.read_all()
    assert stream.stats.task_id == TASK
    assert stream.stop_called.wait(5)
    assert stream.stopped == [TASK]


def test_ids_missing_from_the_first_event_are_taken_from_a_later_one(dify):
    first = b'data: {"event":"workflow_started","data":{}}\n\n'
    stream = Stream(dify)
    dify.send(first, HELLO, END)
    dify.end()
    stream.read_all()
    assert stream.stats.task_id == TASK
    assert stream.stats.conversation_id == CONVERSATION


@pytest.mark.parametrize("usage", [None, "lots", 7])
def test_a_message_end_without_a_usage_object_counts_no_usage(dify, usage):
    stream = Stream(dify)
    dify.send(HELLO, dify_event("message_end", metadata={"usage": usage}))
    dify.end()
    stream.read_all()
    assert stream.stats.usage is None
    assert stream.stats.end == "completed"


def test_a_stream_with_no_data_event_has_no_first_event_time(dify):
    stream = Stream(dify)
    dify.drop()
    stream.read_all()
    assert stream.stats.first_event is None


def test_a_burst_of_reads_goes_out_in_fewer_writes_than_reads(dify, monkeypatch):
    """While the client is slower than Dify, what has piled up goes out in one write."""
    monkeypatch.setattr(relay_module, "YIELD_EVERY_SECONDS", 0)
    stream = Stream(dify)
    dify.send(WORLD)
    assert stream.read_until(WORLD) == WORLD  # the reader runs from here on
    dify.send(*[HELLO] * 50, pause=0.001)
    dify.send(END)
    dify.end()
    threading.Event().wait(0.3)  # the client is busy; reads pile up
    writes = [w for w in stream if w]
    assert b"".join(writes) == HELLO * 50 + END
    assert len(writes) < 51


# --- framing across reads, and what does not come from Dify's stream ------------------------


def test_an_event_whose_blank_line_is_split_across_reads_still_ends_the_answer(dify):
    """The blank line's first `\n` ends one read, its second starts the next: the reader must
    still see HELLO and END as two events, or it would miss `message_end`."""
    stream = Stream(dify)
    dify.send(HELLO[:-1], pause=0.02)
    dify.send(HELLO[-1:] + END)
    dify.end()
    assert stream.read_all() == HELLO + END
    assert stream.stats.end == "completed"
    assert stream.stats.events == 2


def test_a_large_event_in_many_reads_is_scanned_a_bounded_number_of_times(dify, event_end_scans):
    scanned = event_end_scans
    big = dify_event("message", answer="x" * 500_000)
    stream = Stream(dify)
    dify.send(*(big[i : i + 8192] for i in range(0, len(big), 8192)))
    dify.send(END)
    dify.end()
    assert stream.read_all() == big + END
    assert sum(scanned) < 2 * (len(big) + len(END))


def test_without_ids_the_final_error_event_has_no_id_line(dify):
    stream = Stream(dify)
    dify.send(HELLO)
    dify.drop()
    body = stream.read_all()
    assert b"id:" not in body
    assert final_event(body)["code"] == "upstream_dropped"


def test_with_ids_the_timeout_error_event_carries_the_next_id(dify):
    stream = Stream(dify, ids=True, read_timeout=0.3)
    dify.send(HELLO)
    events = sse.cut_events(stream.read_all())[0]
    assert events[-1].endswith(b"id: " + stream.stats.stream_id + b"-2\n\n")


def test_the_timeout_error_event_says_why_in_a_sentence(dify):
    stream = Stream(dify, read_timeout=0.3)
    message = final_event(stream.read_all())["message"]
    assert is_a_sentence(message) and "incomplete" in message


@pytest.mark.parametrize("bad", [123, "", None, ["t"]])
def test_a_task_id_that_is_not_a_non_empty_string_is_never_sent_to_stop(dify, bad):
    stream = Stream(dify)
    dify.send(dify_event("message", task_id=bad, conversation_id=bad, answer="x"))
    dify.drop()
    error = final_event(stream.read_all())
    assert stream.stats.task_id is None
    assert error["conversation_id"] is None
    assert not stream.stop_called.wait(0.1)


def test_a_broken_dify_stream_is_logged_with_the_errors_name(dify, caplog):
    stream = Stream(dify)
    dify.send(HELLO)
    with caplog.at_level(logging.INFO, logger="dify_proxy.relay"):
        dify.drop()
        stream.read_all()
    (record,) = [r for r in caplog.records if r.name == "dify_proxy.relay"]
    assert record.levelno == logging.INFO
    assert re.fullmatch(r"dify stream broke: [A-Z]\w+Error", record.getMessage())


def test_the_relays_threads_never_keep_a_stopping_worker_alive(dify):
    """A reader blocked on Dify, or a stop call that hangs, must not delay the process's exit."""
    before = set(threading.enumerate())
    release_stop = threading.Event()
    body = relay(
        dify.open(),
        heartbeat_interval=30,
        stop=lambda task_id: release_stop.wait(5),
        stats=StreamStats(),
    )
    dify.send(HELLO)
    got = b""
    while HELLO not in got:
        got += next(body)
    started = set(threading.enumerate()) - before  # the reader
    body.close()  # the client left: Dify is hung up on and told to stop, which hangs
    started |= set(threading.enumerate()) - before
    release_stop.set()
    assert started
    assert all(thread.daemon for thread in started)


def test_a_client_that_leaves_before_difys_first_event_stops_the_task_once_its_id_comes(dify):
    """The stop call needs Dify's task id, which comes with its first event."""
    stream = Stream(dify, heartbeat=0.05)
    assert next(stream.body) == b""
    assert next(stream.body) == sse.PING  # the reader is running, Dify silent
    stream.body.close()
    assert not dify.hung_up.wait(0.2)
    dify.send(HELLO)
    assert stream.stop_called.wait(5)
    assert stream.stopped == [TASK]
    assert dify.hung_up.wait(10)


# --- endings of runs (Dify 1.13+: human input, workflow apps) --------------------------------

RUN = "13924a7f-b93e-4e89-80c2-6525bb22e834"
FORM_TOKEN = "KawXGk6sET2ndcOxyXFfFB"
STARTED = dify_event("workflow_started", workflow_run_id=RUN, data={"id": RUN})
FORM = dify_event(
    "human_input_required",
    workflow_run_id=RUN,
    data={"form_token": FORM_TOKEN, "expiration_time": 1796702375},
)
PAUSED = dify_event(
    "workflow_paused",
    workflow_run_id=RUN,
    data={"workflow_run_id": RUN, "reasons": [{"form_token": FORM_TOKEN}], "status": "paused"},
)


def finished(total_tokens: int = 0, status: str = "succeeded") -> bytes:
    return dify_event(
        "workflow_finished",
        workflow_run_id=RUN,
        data={"id": RUN, "status": status, "total_tokens": total_tokens},
    )


def test_a_run_paused_for_a_person_ends_cleanly_with_no_error_event_and_no_stop(dify):
    stream = Stream(dify)
    dify.send(STARTED, FORM, PAUSED)
    dify.end()
    assert stream.read_all() == STARTED + FORM + PAUSED
    assert stream.stats.end == "paused"
    assert eventually(lambda: stream.ended == [stream.stats])
    assert stream.stats.answer_end == "paused"
    assert not stream.stop_called.wait(0.1)


def test_a_chatflows_workflow_finished_after_message_end_reaches_the_client(dify):
    stream = Stream(dify)
    dify.send(STARTED, HELLO, END, pause=0.01)
    dify.send(finished())
    dify.end()
    assert stream.read_all() == STARTED + HELLO + END + finished()
    assert stream.stats.end == "completed"
    assert not stream.stop_called.wait(0.1)


def test_a_workflow_apps_stream_ends_with_workflow_finished(dify):
    chunk = dify_event("text_chunk", workflow_run_id=RUN, data={"text": "hi"})
    stream = Stream(dify)
    dify.send(STARTED, chunk, finished(7))
    dify.end()
    assert stream.read_all() == STARTED + chunk + finished(7)
    assert stream.stats.end == "completed"
    assert stream.stats.usage == {"total_tokens": 7}
    assert stream.stats.workflow_run_id == RUN
    assert not stream.stop_called.wait(0.1)


def test_a_chatflows_usage_is_its_message_ends_not_its_workflow_finisheds(dify):
    stream = Stream(dify)
    dify.send(STARTED, HELLO, END, finished(999))
    dify.end()
    stream.read_all()
    assert stream.stats.usage == {"total_tokens": 42}


def test_a_run_resumed_on_the_same_stream_and_then_cut_is_a_dropped_stream(dify):
    """With continue_on_pause, a pause followed by the run's next start is no ending."""
    stream = Stream(dify)
    dify.send(STARTED, FORM, PAUSED, STARTED, HELLO)
    dify.end()
    error = final_event(stream.read_all())
    assert (error["event"], error["code"]) == ("error", "upstream_dropped")
    assert stream.stop_called.wait(5)


def test_a_run_that_ends_with_none_of_the_endings_is_still_a_dropped_stream(dify):
    stream = Stream(dify)
    dify.send(STARTED, FORM)
    dify.end()
    error = final_event(stream.read_all())
    assert error["code"] == "upstream_dropped"
    assert stream.stats.end == "upstream_dropped"


def test_each_id_carrying_event_is_bound_before_the_client_gets_it(dify):
    received: list[bytes] = []
    bound: list[tuple[str, bool]] = []
    carrying = {
        "workflow_started": STARTED,
        "human_input_required": FORM,
        "workflow_paused": PAUSED,
    }

    def bind(data: Any) -> None:  # each event's own bytes: not sent yet
        bound.append((data["event"], carrying[data["event"]] in b"".join(received)))

    stream = Stream(dify, bind=bind)
    dify.send(STARTED, HELLO, HELLO, FORM, PAUSED)
    dify.end()
    received.extend(stream.body)
    assert bound == [
        ("workflow_started", False),
        ("human_input_required", False),
        ("workflow_paused", False),
    ]
    assert b"".join(received) == STARTED + HELLO + HELLO + FORM + PAUSED


def test_the_relay_parses_no_message_event_once_it_has_the_task_id(dify, monkeypatch):
    parsed = []
    real = sse.event_data
    monkeypatch.setattr(sse, "event_data", lambda event: parsed.append(event) or real(event))
    stream = Stream(dify)
    dify.send(STARTED, HELLO, WORLD, HELLO, END, finished())
    dify.end()
    stream.read_all()
    assert parsed == [STARTED, END, finished()]


def test_without_await_task_id_a_client_leaving_a_silent_run_hangs_up_and_stops_nothing(dify):
    """Following a paused run: a client that leaves before it resumes must not stop it."""
    stream = Stream(dify, heartbeat=0.05, await_task_id=False)
    assert next(stream.body) == b""
    assert next(stream.body) == sse.PING
    stream.body.close()
    assert dify.hung_up.wait(10)
    assert not stream.stop_called.wait(0.2)
