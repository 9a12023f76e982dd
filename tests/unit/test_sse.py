"""SSE framing on raw bytes: whatever the read boundaries, events come out whole and unchanged."""

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dify_proxy import sse

EVENT = 'data: {"event":"message","answer":"héllo\u2028wörld\u0085 😀"}\n\n'.encode()


def frame_in_pieces(stream: bytes, size: int) -> list[bytes]:
    """Feed `stream` to the framer `size` bytes at a time, as the relay's reader does."""
    events, pending = [], b""
    for start in range(0, len(stream), size):
        scan_from = len(pending) - 3
        found, pending = sse.cut_events(pending + stream[start : start + size], scan_from)
        events.extend(found)
    assert pending == b""
    return events


def test_one_whole_event_is_cut_with_its_blank_line():
    assert sse.cut_events(EVENT) == ([EVENT], b"")


def test_half_an_event_waits_for_the_rest():
    assert sse.cut_events(EVENT[:10]) == ([], EVENT[:10])


def test_several_events_in_one_read_come_out_separately():
    events, rest = sse.cut_events(EVENT * 3 + EVENT[:5])
    assert events == [EVENT] * 3
    assert rest == EVENT[:5]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_events_split_at_every_byte_boundary_arrive_intact(size):
    stream = EVENT * 5 + b"event: ping\n\n" + EVENT
    assert b"".join(frame_in_pieces(stream, size)) == stream
    assert frame_in_pieces(stream, size)[0] == EVENT


def test_unicode_line_separators_inside_json_do_not_split_an_event():
    (event,), _ = sse.cut_events(EVENT)
    assert sse.event_data(event)["answer"] == "héllo\u2028wörld\u0085 😀"


@pytest.mark.parametrize("terminator", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\r\n\n", b"\n\r\n"])
def test_every_blank_line_form_ends_an_event(terminator):
    raw = b'data: {"event":"message"}' + terminator
    assert sse.cut_events(raw + raw) == ([raw, raw], b"")


@given(st.lists(st.sampled_from([b"data: x", b"a", b":", b"\n"]), max_size=30))
def test_lf_and_crlf_line_ends_cut_a_stream_at_the_same_places(parts):
    lf = b"".join(parts)  # LF only: framed by the fast path
    crlf = lf.replace(b"\n", b"\r\n")  # framed by the general rules
    lf_events, lf_rest = sse.cut_events(lf)
    crlf_events, crlf_rest = sse.cut_events(crlf)
    assert [event.replace(b"\n", b"\r\n") for event in lf_events] == crlf_events
    assert lf_rest.replace(b"\n", b"\r\n") == crlf_rest


def test_a_run_of_three_line_ends_ends_one_event_and_starts_the_next():
    assert sse.cut_events(b"a\n\n\nb\n\n") == ([b"a\n\n", b"\nb\n\n"], b"")


def test_a_single_crlf_is_one_line_end_not_a_blank_line():
    raw = b'event: message\r\ndata: {"event":"message"}\r\n'
    assert sse.cut_events(raw) == ([], raw)


def test_a_one_megabyte_event_in_small_reads_arrives_intact():
    big = b'data: {"event":"message","answer":"' + b"x" * 1_000_000 + b'"}\n\n'
    assert frame_in_pieces(big + EVENT, 16_384) == [big, EVENT]


def test_event_type_reads_the_json_event_key():
    assert sse.event_type(b'data: {"event":"message_end","x":1}\n\n') == "message_end"


def test_event_type_reads_old_dify_json_with_spaces():
    assert sse.event_type(b'data: {"event": "agent_message", "answer": "a"}\n\n') == "agent_message"


def test_event_type_is_not_fooled_by_an_escaped_event_key_in_the_answer():
    payload = json.dumps({"event": "message", "answer": '"event":"message_end"'})
    assert sse.event_type(f"data: {payload}\n\n".encode()) == "message"


def test_ping_is_recognised_without_a_data_line():
    assert sse.event_type(b"event: ping\n\n") == "ping"


def test_a_comment_has_no_type():
    assert sse.event_type(b": hello\n\n") is None


def test_event_data_joins_multiple_data_lines():
    assert sse.event_data(b'data: {"a":\ndata: 1}\n\n') == {"a": 1}


def test_event_data_of_broken_json_is_none():
    assert sse.event_data(b"data: {nope\n\n") is None


def test_data_event_is_compact_json_with_raw_utf8():
    assert sse.data_event({"event": "error", "message": "é"}) == (
        'data: {"event":"error","message":"é"}\n\n'.encode()
    )


def test_event_data_reads_a_data_line_without_the_optional_space():
    assert sse.event_data(b'data:{"event":"message"}\n\n') == {"event": "message"}


def test_event_data_strips_only_one_leading_space():
    assert sse.event_data(b'data:  "x"\n\n') == "x"  # JSON ignores the second space
    assert sse.event_data(b"data:  7\n\n") == 7


def test_event_data_ignores_id_event_and_comment_lines():
    raw = b'id: 4\nevent: message\n: note\ndata: {"a":1}\n\n'
    assert sse.event_data(raw) == {"a": 1}


def test_event_data_of_an_event_without_data_is_none():
    assert sse.event_data(b"event: ping\n\n") is None


def test_event_data_reads_cr_only_line_ends():
    assert sse.event_data(b'data: {"a":\rdata: 1}\r\r') == {"a": 1}


def test_a_ping_with_cr_only_line_ends_is_a_ping():
    assert sse.event_type(b"event: ping\r\r") == "ping"


@pytest.mark.parametrize("raw", [b"event: pinged\n\n", b"event: ping-pong\n\n", b"event: pin\n\n"])
def test_an_event_name_that_only_starts_like_ping_is_not_a_ping(raw):
    assert sse.event_type(raw) is None


def test_a_ping_written_without_the_space_is_a_ping():
    assert sse.event_type(b"event:ping\n\n") == "ping"


def test_a_ping_after_a_blank_line_is_a_ping():
    assert sse.event_type(b"\nevent: ping\n\n") == "ping"


def test_a_non_ascii_event_name_does_not_break_framing():
    """Dify's types are ASCII; anything else must still pass through, not raise."""
    event_type = sse.event_type('data: {"event":"réponse"}\n\n'.encode())
    assert isinstance(event_type, str)
    assert event_type not in ("message", "message_end", "error", "ping")


def test_a_blank_line_at_the_very_start_is_an_event_of_its_own():
    assert sse.cut_events(b"\n\n" + EVENT) == ([b"\n\n", EVENT], b"")


def test_framing_a_large_event_in_small_reads_looks_at_each_byte_a_bounded_number_of_times(
    event_end_scans,
):
    """Rescanning the whole pending buffer on every read would be quadratic: a 1 MB answer in
    16 KB reads would be scanned 64 times over. Counted, not timed."""
    scanned = event_end_scans
    big = b'data: {"event":"message","answer":"' + b"x" * 1_000_000 + b'"}\n\n'
    assert frame_in_pieces(big, 16_384) == [big]
    assert sum(scanned) < 2 * len(big)


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n"])
def test_an_id_goes_last_in_the_event_and_keeps_difys_line_ends(end):
    event = b'data: {"event":"message"}' + end
    framed = sse.with_id(event, b"s-1")
    assert framed.startswith(b'data: {"event":"message"}' + end[: len(end) // 2])
    assert sse.cut_events(framed) == ([framed], b"")
    assert [line for line in re.split(rb"\r\n|\r|\n", framed) if line][-1] == b"id: s-1"


@pytest.mark.parametrize(
    ("event", "is_data"),
    [
        (b"data: {}\n\n", True),
        (b"data:{}\n\n", True),
        (b"event: message\ndata: {}\n\n", True),
        (b"event: ping\n\n", False),
        (b": comment data: x\n\n", False),
        (b"id: 3\r\rdata: x\r\r", True),
    ],
)
def test_a_data_event_is_a_block_with_a_data_line(event, is_data):
    assert sse.is_data_event(event) is is_data


def test_the_opening_is_a_ping_that_carries_an_id():
    assert sse.opening(b"s-0") == b"event: ping\ndata:\nid: s-0\n\n"
    assert sse.event_type(sse.opening(b"s-0")) == "ping"


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n"])
def test_a_retry_line_goes_last_in_the_event_and_keeps_its_line_ends(end):
    event = b'data: {"event":"error"}' + end
    last = 2 if end.endswith(b"\r\n") else 1
    assert sse.with_retry(event, 1000) == event[:-last] + b"retry: 1000\n" + event[-last:]
    (whole,), rest = sse.cut_events(sse.with_retry(event, 1000))
    assert rest == b"" and sse.event_data(whole) == {"event": "error"}
