"""dify-proxy: a Supabase-authenticated, streaming proxy in front of Dify's chat API.

Importing this package stays cheap on purpose: gunicorn's master imports `dify_proxy.settings`
to check the configuration before it forks, and anything that imports `ssl` there (Flask,
requests) would be loaded before the gevent worker can monkey-patch it. So the app's own
imports live inside `create_app`, as flaskr's blueprint imports do.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

from .settings import Settings, load_settings

if TYPE_CHECKING:
    from flask import Flask

MAX_BODY_BYTES = 1024 * 1024
MAX_UPLOADS_PER_USER = 2  # file or audio bodies coming in at once, per user (see api.py)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; configuration is read and validated here, once, and raises ConfigError."""
    from flask import Flask
    from flask_cors import CORS
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import api, bodies, chat, errors, limits, metrics, openapi, relay, requestlog
    from .answers import Answers
    from .auth import Verifier
    from .dify import Dify
    from .owners import Owners
    from .quotas import Quotas

    settings = settings or load_settings()
    app = Flask(__name__)
    # Heroku's router (and most hosts) terminate TLS and say so in X-Forwarded-Proto; the
    # same-origin check for cookie sessions needs the scheme the browser used.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1)  # type: ignore[method-assign]
    app.wsgi_app = bodies.PacedBodies(app.wsgi_app)  # type: ignore[method-assign]
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    requestlog.init_app(app, settings.log_level)

    app.extensions["dify_proxy.verifier"] = Verifier(settings)
    app.extensions["dify_proxy.dify"] = Dify(settings)
    quotas = app.extensions["dify_proxy.quotas"] = Quotas(
        settings.redis_url,
        max_streams=settings.max_streams_per_user,
        lease_seconds=settings.stream_lease_seconds,
        daily_token_budget=settings.daily_token_budget,
        max_uploads=MAX_UPLOADS_PER_USER,
    )
    spool_dir = settings.resume_spool_dir or tempfile.mkdtemp(prefix="dify-proxy-answers-")
    app.extensions["dify_proxy.answers"] = Answers(
        spool_dir,
        window=settings.resume_window,
        max_bytes=settings.resume_max_bytes,
        redis_client=quotas.redis,
        on_redis_error=quotas.redis_failed,
        redis_usable=quotas.redis_usable,
    )
    app.extensions["dify_proxy.owners"] = Owners(
        spool_dir,
        default_ttl=settings.ownership_ttl,
        redis_client=quotas.redis,
        on_redis_error=quotas.redis_failed,
        redis_usable=quotas.redis_usable,
    )
    limits.init_app(app, settings)

    if settings.cors_origins:
        CORS(
            app,
            resources={r"/api/*": {"origins": list(settings.cors_origins)}},
            supports_credentials=True,
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=[
                "Retry-After",
                "X-Request-ID",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
            max_age=600,
        )
    errors.register_error_handlers(app)
    app.register_blueprint(chat.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(openapi.bp)
    if settings.enable_demo:
        from . import demo

        app.register_blueprint(demo.create_blueprint(settings))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: answers while the process serves requests; touches nothing else."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Any:
        """Readiness: configuration (checked at start) and Redis; never Dify.

        A Redis outage is reported but still ready: chat keeps working on per-process limits,
        and taking every instance out of rotation because a shared Redis is down would turn a
        degraded service into no service. A worker that is draining for a restart is not
        ready: it takes no new questions.
        """
        if relay.draining():
            return {"status": "draining", "checks": {"config": "ok"}}, 503
        redis_state = "not configured"
        if settings.redis_url:
            redis_state = "ok" if quotas.check_redis() else "unavailable"
        status = "degraded" if redis_state == "unavailable" else "ok"
        return {"status": status, "checks": {"config": "ok", "redis": redis_state}}

    return app
