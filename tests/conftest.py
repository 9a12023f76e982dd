import os

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from dify_proxy import create_app
from dify_proxy.settings import Settings
from tests.support import tokens

# The fuzzing suite's budget (tests/fuzz): "ci" is what scripts/test runs; the README's longer
# run is `HYPOTHESIS_PROFILE=long scripts/test tests/fuzz`. Every example is a real request.
for _name, _examples in (("ci", 25), ("long", 1000)):
    hypothesis_settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
        print_blob=True,
    )
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DIFY_URL = "https://dify.test/v1"
DIFY_KEY = "app-unit-test-key-0123456789abcdef"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        dify_api_key=DIFY_KEY,
        dify_api_url=DIFY_URL,
        supabase_jwt_secret=tokens.SECRET,
        heartbeat_interval=0.2,
        usage_sqlite_path=str(tmp_path / "usage.sqlite3"),
        usage_outbox_path=str(tmp_path / "usage-outbox.sqlite3"),
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.hs256()}"}


@pytest.fixture
def event_end_scans(monkeypatch):
    """How many bytes each search for an event's end looked at: framing is tested to stay
    linear in the bytes received by counting, not timing."""
    from dify_proxy import sse

    scanned: list[int] = []
    real = sse._EVENT_END

    class CountingPattern:
        def finditer(self, buffer, pos=0):
            scanned.append(len(buffer) - pos)
            return real.finditer(buffer, pos)

    monkeypatch.setattr(sse, "_EVENT_END", CountingPattern())
    return scanned
