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

    from . import chat, errors, requestlog
    from .auth import Verifier
    from .dify import Dify

    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    requestlog.init_app(app, settings.log_level)

    app.extensions["dify_proxy.verifier"] = Verifier(settings)
    app.extensions["dify_proxy.dify"] = Dify(settings)

    errors.register_error_handlers(app)
    app.register_blueprint(chat.bp)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
