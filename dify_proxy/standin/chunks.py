"""How the stand-in writes a stream's body: one HTTP chunk per write, as real Dify does (one
chunk per event, ping included), or cut into the scenario's `split`-byte chunks."""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web

from dify_proxy.standin.events import Run
from dify_proxy.standin.scenario import Scenario

SSE_HEADERS = {hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8"}


class ChunkedBody:
    """A stream's body, one HTTP chunk per scenario write (or `split`-byte chunks `split_delay`
    apart). aiohttp sends the head and the last chunk; the chunks in between go straight onto
    the connection, because aiohttp's own write path costs about 3 us more per write, which
    raised the stand-in's CPU in the firehose benchmark by a third (it has to stay cheap)."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        writer: Any,
        run: Run,
        s: Scenario,
    ) -> None:
        self.transport, self.protocol = request.transport, request.protocol
        self.response, self.writer = response, writer
        self.run, self.split, self.split_delay = run, s.split, s.split_delay

    @classmethod
    async def start(cls, request: web.Request, run: Run, s: Scenario) -> ChunkedBody:
        response = web.StreamResponse(headers=SSE_HEADERS)
        response.enable_chunked_encoding()
        return cls(request, response, await response.prepare(request), run, s)

    async def write(self, data: bytes) -> None:
        if self.split:
            for i in range(0, len(data), self.split):
                if i:
                    await self.run.pause(self.split_delay)
                await self.write_chunk(data[i : i + self.split])
        else:
            await self.write_chunk(data)

    async def write_chunk(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client has gone")
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        if self.protocol.writing_paused:  # the socket's buffer is full: wait for it
            await self.writer.drain()

    async def end(self) -> web.StreamResponse:
        await self.response.write_eof()
        return self.response

    def drop(self) -> web.StreamResponse:
        """Cut the connection without ending the body."""
        self.run.finish("dropped")
        if self.transport is not None:
            self.transport.abort()
        return self.response
