"""Local stand-in for Dify's service API (a chat app's calls), on aiohttp.

Why: the proxy has to be tested and benchmarked against real HTTP/1.1 over TCP (real chunk
boundaries, half events, abrupt disconnects, long silent streams), which mocked `requests`
cannot produce and real Dify cannot be scripted or loaded to produce. Each chat request picks
its behaviour through `inputs["_standin"]`, so one running instance serves every test and
benchmark scenario. The wire format follows /work/shared/dify-protocol.md.

Where things are: `chat.py` the chat stream and stop, `scenario.py` the `_standin` knobs,
`api.py` the rest of a chat app's API, `records.py` the call log and each user's conversations
and messages, `wire.py` Dify's JSON and error shape, `server.py` the server and the test-only
`/_standin/*` routes, `__main__.py` the command line:

    python -m dify_proxy.standin [--host 127.0.0.1] [--port 0] [--api-key KEY]

It is a development tool: its dependency (requirements-standin.txt) is not in requirements.txt.
"""

from dify_proxy.standin.api import FAKE_AUDIO
from dify_proxy.standin.server import DEFAULT_API_KEY, serve, start_in_thread

__all__ = ["DEFAULT_API_KEY", "FAKE_AUDIO", "serve", "start_in_thread"]
