"""Local stand-in for Dify's service API, on aiohttp: a chatflow, a workflow app, a completion
app and a chat app, answering as Dify 1.16.1 does.

Why: the proxy has to be tested and benchmarked against real HTTP/1.1 over TCP (real chunk
boundaries, half events, abrupt disconnects, long silent streams), which mocked `requests`
cannot produce and real Dify cannot be scripted or loaded to produce. Each request picks its
behaviour through `inputs["_standin"]` (scenario.py), so one running instance serves every test
and benchmark scenario; the API key picks the app (apps.py: K is a chatflow, K-workflow,
K-completion and K-chat the others). The wire format is Dify's as recorded in the project's
shared notes and captures of real Dify (copied into tests/standin/captures/, which the
stand-in's tests compare it with byte for byte).

Where things are: `chat.py` the chat and completion streams and their stops, `events.py` a run
and the events it writes, `human_input.py` the pause at a Human Input node and its form,
`workflow.py` workflow runs, run detail, run events and workflow stop, `scenario.py` the
`_standin` knobs, `apps.py` the app types, `api.py` the rest of a chat app's API, `records.py`
the call log and what the stand-in remembers, `wire.py` Dify's JSON and error shape,
`server.py` the server and the test-only `/_standin/*` routes, `__main__.py` the command line:

    python -m dify_proxy.standin [--host 127.0.0.1] [--port 0] [--api-key KEY]

It is a development tool: its dependency (requirements-standin.txt) is not in requirements.txt.
"""

from dify_proxy.standin.api import FAKE_AUDIO
from dify_proxy.standin.server import DEFAULT_API_KEY, serve, start_in_thread

__all__ = ["DEFAULT_API_KEY", "FAKE_AUDIO", "serve", "start_in_thread"]
