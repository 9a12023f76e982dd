"""gunicorn serving behaviour: a deploy's SIGTERM ends open streams with a clear last event."""

from __future__ import annotations

import signal
import time

from tests.integration.conftest import DIFY_KEY, Proxy, scenario
from tests.support import processes, tokens
from tests.support.sse_client import read_stream


def test_sigterm_ends_open_streams_with_a_server_restarting_error_event(standin, tmp_path):
    env = {
        "DIFY_API_KEY": DIFY_KEY,
        "DIFY_API_URL": standin.url,
        "SUPABASE_JWT_SECRET": tokens.SECRET,
        "HEARTBEAT_INTERVAL": "5",
        "WEB_CONCURRENCY": "1",
    }
    process, url = processes.start_proxy(env, tmp_path / "gunicorn.log")
    try:
        proxy = Proxy(url, tmp_path / "gunicorn.log")
        response = proxy.chat(scenario(events=1, end="hang"))
        read_stream(response, until=lambda r: bool(r.data_events()))
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        received = read_stream(response, seconds=15)
        ended_after = time.monotonic() - sent_at
        process.wait(timeout=20)
    finally:
        processes.stop(process)
    assert received.ended
    last = received.data()[-1]
    assert (last["event"], last["status"], last["code"]) == ("error", 503, "server_restarting")
    assert ended_after < 5  # at once, not when the graceful timeout (20 s) runs out
    calls = standin.wait_for(lambda calls: any(c["path"].endswith("/stop") for c in calls))
    assert any(c["path"].endswith("/stop") for c in calls)  # Dify was told to stop
