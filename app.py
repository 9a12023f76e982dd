"""The WSGI entry point: `gunicorn app:app` (see Procfile and gunicorn.conf.py)."""

import sys

from dify_proxy import create_app
from dify_proxy.settings import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # One line naming the variable, not a traceback; exit code 3 makes gunicorn's master halt
    # ("Worker failed to boot") instead of respawning the worker forever.
    print(f"dify-proxy: configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
