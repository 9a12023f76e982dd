"""The scenario of one chat request, read from `inputs["_standin"]`.

Each knob shapes the stream the proxy receives: the answer (`text`, `events`, `pad`), its
timing (`interval`, `header_delay`, `first_delay`, `pings`), how its bytes are cut (`split`,
`coalesce`), how it ends (`end`: message_end, error, drop, drop_mid_event, hang), a plain error
reply (`status`, `body`, `content_type`, `code`, `message`, `retry_after`), or a recorded Dify
stream sent byte for byte (`replay`: the body as Dify framed it, cut into `replay_pieces` sizes,
cycled, or one piece per event without them; `replay_delay` seconds apart, with one
`replay_stall`-second silence before piece `replay_stall_at`).

A chatflow (the stand-in's default app) that meets Human Input nodes: `human_input` (how many:
the stream pauses at the first, and each answered form resumes the run up to the next), and
`wait_ping_interval` (seconds between the pings of `/workflow/{id}/events` while the run waits
for a form), and `form_reply_delay` (seconds the answer to a submitted form lags behind the
resumed run's events: Dify resumes the run in a worker, so a follower may see the next pause
before the submitter sees `{}`). The answer knobs (`text`, `events`, `interval`) then shape
the resumed answer.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from dify_proxy.standin.wire import bad

ENDS = ("message_end", "error", "drop", "drop_mid_event", "hang")
WORD = re.compile(r"\s*\S+\s*")


def knob(kind: type, default: Any = None) -> Any:
    return field(default=default, metadata={"kind": kind})


@dataclass(frozen=True, slots=True)
class Scenario:
    text: str | None = knob(str)
    events: int | None = knob(int)
    pad: int = knob(int, 0)
    interval: float = knob(float, 0.05)
    header_delay: float = knob(float, 0.0)
    first_delay: float = knob(float, 0.0)
    pings: int = knob(int, 0)
    ping_interval: float = knob(float, 0.0)
    split: int = knob(int, 0)
    split_delay: float = knob(float, 0.005)
    coalesce: bool = knob(bool, False)
    end: str = knob(str, "message_end")
    status: int | None = knob(int)
    body: str | None = knob(str)
    content_type: str = knob(str, "text/html")
    code: str = knob(str, "stand_in_error")
    message: str = knob(str, "stand-in error")
    retry_after: Any = knob(object)
    replay: str | None = knob(str)
    replay_pieces: tuple[int, ...] = knob(list, ())
    replay_delay: float = knob(float, 0.002)
    replay_stall: float = knob(float, 0.0)
    replay_stall_at: int = knob(int, 0)
    # Or the name of a recording stored with `PUT /_standin/recordings/<name>`, for clients that
    # can only GET, whose whole question must fit in a URL.
    replay_recording: str | None = knob(str)
    human_input: int = knob(int, 0)
    wait_ping_interval: float = knob(float, 10.0)
    form_reply_delay: float = knob(float, 0.0)

    @classmethod
    def parse(cls, raw: Any) -> Scenario:
        """Strict, so a typo in a test's scenario fails loudly instead of silently."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise bad("inputs._standin must be an object")
        given = {
            f.name: _checked(f.name, raw[f.name], f.metadata["kind"])
            for f in fields(cls)
            if raw.get(f.name) is not None
        }
        scenario = cls(**given)
        if scenario.end not in ENDS:
            raise bad(f"inputs._standin.end must be one of {', '.join(ENDS)}")
        return scenario

    def replay_writes(self) -> list[bytes]:
        """The recorded body cut into the writes that deliver it."""
        data = (self.replay or "").encode("utf-8", "surrogatepass")
        if not self.replay_pieces:
            return [part + b"\n\n" for part in data.split(b"\n\n") if part]
        writes, at = [], 0
        for size in itertools.cycle(self.replay_pieces):
            if at >= len(data):
                return writes
            writes.append(data[at : at + size])
            at += size
        return writes

    def delta(self) -> str:
        """The one answer every event carries in `events` mode."""
        return (self.text if self.text is not None else "tok ") + "x" * self.pad

    def answers(self, query: str, default: str | None = None) -> tuple[Iterable[str], int]:
        """The answer deltas and their count; `events` mode repeats one delta without a list.
        Without `text`, `default` is the whole answer in one delta (a workflow echoing its
        input), or else the stand-in's sentence, word by word."""
        if self.events is not None:
            return itertools.repeat(self.delta(), self.events), self.events
        text = self.text
        if text is None and default is not None:
            return [default], 1
        if text is None:
            text = (
                f"You said: {query}. This reply comes from the local Dify stand-in, "
                "streamed word by word."
            )
        words = WORD.findall(text) or ([text] if text else [])
        return words, len(words)

    def preview(self, query: str, limit: int = 1_000) -> str:
        """The start of the answer, in constant time even for a benchmark's thousands of padded
        events: what the message list shows."""
        if self.events is None:
            return "".join(self.answers(query)[0])[:limit]
        delta = self.delta()[:limit]
        return (delta * min(self.events, limit // max(len(delta), 1) + 1))[:limit]


def _checked(name: str, value: Any, kind: type) -> Any:
    if kind is object:
        return value
    if kind is list:
        if not isinstance(value, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value
        ):
            raise bad(f"inputs._standin.{name} must be a list of positive integers")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise bad(f"inputs._standin.{name} must be {kind.__name__}")
    if kind in (int, float) and value < 0:
        raise bad(f"inputs._standin.{name} must not be negative")
    return value
