"""The recorded Dify streams and the ways the suite delivers them (the stand-in's replay knobs)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent / "recordings"
# Recordings as current Dify frames them: `data: ` + compact raw-UTF-8 JSON + blank line, and
# `event: ping` blocks. The first two end a chat app's stream in its two ways (`message_end`,
# `error`); the others are real Dify 1.16.1's, from tests/standin/captures/ with the chunk
# framing taken off: a chatflow's answer, its pause at a Human Input node, the resumed run
# (plain, and aborted by a stop while paused), and a workflow app's run.
RECORDINGS = {
    "chatflow_tts": "a chatflow answer: workflow and node events, message, message_replace, "
    "message_end with usage and retriever_resources, tts_message, tts_message_end",
    "agent_error": "an agent answer: agent_thought, message_file, agent_message, then error",
    "chatflow_echo_1_16": "a chatflow answer as Dify 1.16.1 sends it: message events before "
    "the node events, workflow_finished after message_end",
    "hitl_paused": "a chatflow paused at a Human Input node: human_input_required, then "
    "workflow_paused, and no message_end",
    "hitl_resumed": "the same run after its form was answered: workflow_started (resumption), "
    "message, node events, message_end, workflow_finished",
    "hitl_resumed_stopped": "a resumed run that a stop aborted: workflow_finished with status "
    "stopped, and no message_end",
    "workflow_run": "a workflow app's run: workflow_started, text_chunk, node events, "
    "workflow_finished",
}
STALL = 2.5  # seconds of silence mid-answer: with HEARTBEAT_INTERVAL=1, keep-alives fire
PING = b"event: ping\n\n"
# Irregular piece sizes, cycled: they cut events, lines, `data:` prefixes and UTF-8 characters.
SIZES = (1, 7, 3, 61, 2, 13, 29, 5, 97, 11, 4, 43)


def body(name: str) -> bytes:
    return (HERE / f"{name}.sse").read_bytes()


def data_lines(data: bytes) -> list[bytes]:
    """The `data:` lines of every block but pings (the proxy's opening ping has an empty one)."""
    return [
        line
        for block in data.split(b"\n\n")
        if not block.startswith(b"event: ping")
        for line in block.split(b"\n")
        if line.startswith(b"data:")
    ]


def ping_count(data: bytes) -> int:
    return data.split(b"\n\n").count(b"event: ping")


@dataclass(frozen=True)
class Delivery:
    """How the stand-in sends a recording: `pieces` (irregular sizes) or one event per write."""

    name: str
    pieces: bool

    def knobs(self, recording: str) -> dict:
        """The stand-in knobs, with a STALL-second silence right after Dify's first ping.

        The stall sits after that ping so that a reader that stops at any ping (the Dify SDK
        README loop) stops at Dify's own one on both paths; the proxy's keep-alives come later.
        """
        data = body(recording)
        after_ping = data.index(PING) + len(PING)
        knobs: dict = {"replay_recording": recording, "replay_stall": STALL}
        if self.pieces:
            sizes = irregular_pieces(data, after_ping)
            knobs["replay_pieces"] = sizes
            knobs["replay_stall_at"] = list(itertools.accumulate(sizes)).index(after_ping) + 1
        else:
            knobs["replay_stall_at"] = data[:after_ping].count(b"\n\n")
        return knobs


DELIVERIES = (Delivery("pieces", True), Delivery("per_event", False))


def irregular_pieces(data: bytes, must_cut_at: int) -> list[int]:
    """Piece sizes covering `data`, cut irregularly, and also at `must_cut_at`.

    No piece ends just before the newline that ends a non-empty line: Dify's own web template
    (`handleStream`) dispatches such a line at once, then again when its newline arrives. That
    is its bug, straight from Dify as well; the proxy, which writes whole events, never cuts
    there, so leaving it in would make the straight path the odd one out.
    """
    sizes, at = [], 0
    for size in itertools.cycle(SIZES):
        if at >= len(data):
            return sizes
        end = min(at + size, len(data))
        if at < must_cut_at < end:
            end = must_cut_at
        while end < len(data) and data[end : end + 1] == b"\n" and data[end - 1 : end] != b"\n":
            end += 1
        sizes.append(end - at)
        at = end
    return sizes
