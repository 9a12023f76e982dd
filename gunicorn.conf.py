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
# Heroku's router takes request lines up to 8 KB; gunicorn's default (4094 bytes) would refuse,
# with a 414 page, a GET /api/chat (event-source-polyfill) whose question fits the router.
# 8190 is gunicorn's maximum. Header fields: see "Request heads" below.
limit_request_line = 8190
# Heroku's router keeps idle client connections 90 s and needs some byte every 55 s on a
# response: streams send keep-alives (HEARTBEAT_INTERVAL), and between requests a short
# keep-alive frees the slot.
keepalive = 5
# For gevent workers `timeout` only bounds a blocked event loop, not a request's length.
timeout = 30
# A deploy's SIGTERM (Heroku sends it to every process of the dyno, and SIGKILL 30 s later):
# each worker stops taking new questions (a 503 with Retry-After), lets the answers it is
# streaming finish until a deadline, `graceful_timeout` minus a margin, and ends what is still
# running then with a final "server_restarting" event. Then gunicorn waits for the streams to
# close, up to graceful_timeout, before it kills anything.
graceful_timeout = 25


def drain_deadline(graceful: float) -> float:
    """Seconds after SIGTERM at which answers still running are ended: time for the final
    event to be written and the worker to exit before gunicorn's (and the host's) kill."""
    return max(0.0, graceful - min(3.0, graceful * 0.2))


# Request heads. @supabase/ssr splits a large session into cookies of about 3,200 characters, all
# in one Cookie header: three chunks (about 9.5 KB) passed gunicorn's default 8,190-byte field
# limit and got a 431. 16 KiB per field holds four chunks; fewer fields (a browser sends about
# 20, a router adds about 8) keep the largest possible head (fields x size) where the defaults
# had it, about 800 KB. Hosts in front have limits of their own (see the README: Heroku's router
# refuses any header line over 8,192 bytes, so there a large session needs Authorization).
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

# Answers are recorded for resumes in a spool directory that every worker shares: a reconnect
# lands on whichever worker accepts it. A fresh one per start (made once the port is bound, in
# when_ready) unless RESUME_SPOOL_DIR names one.
_own_spool_dir = not os.environ.get("RESUME_SPOOL_DIR")


def when_ready(server):
    # The directories made here are listed on the arbiter, which outlives a reload: SIGHUP
    # re-reads this file, and the re-read sees them in the environment as if someone had named
    # them, so module variables could not tell on_exit to remove them.
    made = server.__dict__.setdefault("dify_proxy_made_dirs", [])
    if _own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dify-proxy-metrics-")
        made.append(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if _own_spool_dir:
        os.environ["RESUME_SPOOL_DIR"] = tempfile.mkdtemp(prefix="dify-proxy-answers-")
        made.append(os.environ["RESUME_SPOOL_DIR"])


def post_worker_init(worker):
    """On SIGTERM, drain this worker's answers (see graceful_timeout above) instead of a silent
    cut when the graceful timeout runs out. The handler runs in gevent's loop, so it only
    spawns the work; a second SIGTERM (the master's, after the host's) changes nothing."""
    import signal

    import gevent

    from dify_proxy.answers import flush_all
    from dify_proxy.ledger import flush_all as flush_ledger
    from dify_proxy.relay import ServerRestarting, drain

    stop_accepting = worker.handle_exit
    deadline = drain_deadline(worker.cfg.graceful_timeout)
    started = []

    def drain_and_report():
        import logging

        from dify_proxy import metrics

        counts = drain(
            deadline, interrupt=lambda greenlet: greenlet.kill(ServerRestarting, block=False)
        )
        flush_all()  # the records a client resumes from on another instance
        flush_ledger()  # the usage rows, to the database or to the outbox on disk
        for outcome, count in counts.items():
            metrics.DRAIN.labels(outcome).inc(count)
        logging.getLogger("dify_proxy.drain").info(
            "drained", extra={"fields": {"deadline_s": deadline, **counts}}
        )
        stop_accepting(signal.SIGTERM, None)  # now gunicorn closes the listener and exits

    def handle_exit(sig, frame):
        # Keep accepting while draining: a new question then gets a 503 it can act on at once,
        # where a closed listener would leave it waiting in the backlog until the master exits.
        if not started:
            started.append(gevent.spawn(drain_and_report))
            worker.dify_proxy_drain = started[0]

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)


def worker_exit(server, worker):
    """gunicorn stops waiting once no request is open, but an answer whose client left may
    still be running for a resume (RESUME_GRACE): the drain sees those through too."""
    drain = getattr(worker, "dify_proxy_drain", None)
    if drain is not None:
        drain.join(timeout=worker.cfg.graceful_timeout)


def child_exit(server, worker):
    """What prometheus_client.multiprocess.mark_process_dead does, without importing it here
    (see the module docstring): a dead worker's open-stream gauge must stop counting."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for mode in ("liveall", "livesum", "livemax", "livemin", "livemostrecent"):
        for path in glob.glob(os.path.join(directory, f"gauge_{mode}_{worker.pid}.db")):
            os.remove(path)


def on_exit(server):
    for directory in getattr(server, "dify_proxy_made_dirs", ()):
        shutil.rmtree(directory, ignore_errors=True)
