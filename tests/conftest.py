import pytest

from dify_proxy import create_app
from dify_proxy.settings import Settings
from tests.support import tokens

DIFY_URL = "https://dify.test/v1"
DIFY_KEY = "app-unit-test-key-0123456789abcdef"


@pytest.fixture
def settings() -> Settings:
    return Settings(
        dify_api_key=DIFY_KEY,
        dify_api_url=DIFY_URL,
        supabase_jwt_secret=tokens.SECRET,
        heartbeat_interval=0.2,
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
