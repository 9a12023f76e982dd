"""Gunicorn settings for long-lived SSE streams (read by the Procfile and the dev scripts).

The default `sync` worker holds one request per process and kills it at `timeout`, which ends
every long answer; gevent's worker holds thousands of open streams in one process.
"""

import os
import sys

from dify_proxy.settings import ConfigError, load_settings

# Check the configuration in the master, before any worker forks: a bad variable then stops
# start-up with one line instead of a traceback from every worker.
try:
    load_settings()
except ConfigError as exc:
    print(f"dify-proxy: configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "5000"))
# Heroku's router closes an idle client connection after 55 s; a stream is never idle that
# long (heartbeats), and between requests a short keep-alive frees the slot sooner.
keepalive = 5
# For gevent workers `timeout` only bounds a blocked event loop, not a request's length.
timeout = 30
graceful_timeout = 20
accesslog = None  # the app writes its own request line, without query strings
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
