"""dify-proxy: a Supabase-authenticated, streaming proxy in front of Dify's chat API.

Importing this package stays cheap on purpose: gunicorn's master imports `dify_proxy.settings`
to check the configuration before it forks, and anything that imports `ssl` there (Flask,
requests) would be loaded before the gevent worker can monkey-patch it. So the app's own
imports live inside `create_app`, as flaskr's blueprint imports do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import Settings, load_settings

if TYPE_CHECKING:
    from flask import Flask

MAX_BODY_BYTES = 1024 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; configuration is read and validated here, once, and raises ConfigError."""
    from flask import Flask
    from flask_cors import CORS
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import api, chat, errors, requestlog
    from .auth import Verifier
    from .dify import Dify

    settings = settings or load_settings()
    app = Flask(__name__)
    # Heroku's router (and most hosts) terminate TLS and say so in X-Forwarded-Proto; the
    # same-origin check for cookie sessions needs the scheme the browser used.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1)  # type: ignore[method-assign]
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    requestlog.init_app(app, settings.log_level)

    app.extensions["dify_proxy.verifier"] = Verifier(settings)
    app.extensions["dify_proxy.dify"] = Dify(settings)

    if settings.cors_origins:
        CORS(
            app,
            resources={r"/api/*": {"origins": list(settings.cors_origins)}},
            supports_credentials=True,
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    errors.register_error_handlers(app)
    app.register_blueprint(chat.bp)
    app.register_blueprint(api.bp)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
