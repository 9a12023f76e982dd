"""Gunicorn settings for long-lived SSE streams (used by the Procfile and scripts/run).

The default `sync` worker holds one request per process and kills it at `timeout`, which ends
every long answer; gevent's worker holds thousands of open streams in one process.

This file runs in the master, before any worker forks: it must not import Flask, requests,
prometheus_client or anything else that loads `ssl` before gevent patches it in the workers.
"""

import glob
import os
import shutil
import sys
import tempfile

from dify_proxy.settings import ConfigError, load_settings

# Check the configuration here: a bad variable then stops start-up with one line instead of a
# traceback from every worker.
try:
    load_settings()
except ConfigError as exc:
    print(f"dify-proxy: configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)

# gevent's default resolver runs getaddrinfo on a pool of OS threads; every new connection to
# Dify then costs a thread hand-off under the GIL, which in the benchmark's burst of 1,000
# streams doubled p99 time to first event. c-ares (bundled with gevent) resolves inside the
# event loop. Its known differences (result order, .local names; see gevent.resolver.ares) do not
# matter for one API host; GEVENT_RESOLVER=thread restores the default.
os.environ.setdefault("GEVENT_RESOLVER", "ares")

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
# One worker per core: a gevent worker is one thread, so more workers than cores only adds
# context switches. Heroku sets WEB_CONCURRENCY from the dyno size.
workers = int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
# Open connections per worker: each open stream is one (plus its connection to Dify).
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "5000"))
backlog = 4096
# Heroku's router keeps idle client connections 90 s and needs some byte every 55 s on a
# response: streams send keep-alives (HEARTBEAT_INTERVAL), and between requests a short
# keep-alive frees the slot.
keepalive = 5
# For gevent workers `timeout` only bounds a blocked event loop, not a request's length.
timeout = 30
# A deploy's SIGTERM: open streams get a final "server restarting" error event at once (see
# post_worker_init), then the worker waits up to this long for them to finish closing.
# Heroku sends SIGKILL 30 s after SIGTERM.
graceful_timeout = 20
# Request heads. @supabase/ssr splits a large session into cookies of about 3,200 characters, all
# in one Cookie header: three chunks (about 9.5 KB) passed gunicorn's default 8,190-byte field
# limit and got a 431. 16 KiB per field holds four chunks; fewer fields (a browser sends about
# 20, a router adds about 8) keep the largest possible head (fields x size) where the defaults
# had it, about 800 KB. The request line gets gunicorn's maximum, 8,190 bytes, which is what
# Heroku's router allows too (see the README: hosts in front have limits of their own).
limit_request_line = 8190
limit_request_field_size = 16384
limit_request_fields = 50
accesslog = None  # the app writes its own request line, without query strings
# gunicorn 25+ opens a control socket at a fixed path in $HOME: not needed on a platform, and
# two instances on one machine (tests, benchmarks) would fight over it.
control_socket_disable = True
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# Prometheus multiprocess mode: every worker writes its samples under this directory, and
# /metrics sums them. A fresh directory per start, so a restart does not add old counts. It is
# made once the port is bound (when_ready, before any worker forks): a start that fails to bind
# used to leave an empty directory behind.
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if not _own_metrics_dir:
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def when_ready(server):
    if _own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dify-proxy-metrics-")


def post_worker_init(worker):
    """On SIGTERM, end this worker's open streams with a final error event saying the server is
    restarting (a browser can then ask again), instead of a silent cut when the graceful
    timeout runs out. The handler runs in gevent's loop, so it only spawns the work."""
    import signal

    import gevent

    from dify_proxy.relay import drain

    stop_accepting = worker.handle_exit

    def handle_exit(sig, frame):
        stop_accepting(sig, frame)
        gevent.spawn(drain)

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)


def child_exit(server, worker):
    """What prometheus_client.multiprocess.mark_process_dead does, without importing it here
    (see the module docstring): a dead worker's open-stream gauge must stop counting."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for mode in ("liveall", "livesum", "livemax", "livemin", "livemostrecent"):
        for path in glob.glob(os.path.join(directory, f"gauge_{mode}_{worker.pid}.db")):
            os.remove(path)


def on_exit(server):
    if _own_metrics_dir and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
