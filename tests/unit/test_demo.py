"""The /demo blueprint: off unless ENABLE_DEMO, the dev-token route only with DEV_TOKENS, and
nothing from node_modules but the listed browser files."""

from __future__ import annotations

from dataclasses import replace

import jwt
import pytest

from dify_proxy import create_app, demo
from dify_proxy.devtokens import DEV_USER_ID
from dify_proxy.settings import load_settings
from tests.conftest import DIFY_KEY
from tests.support import tokens


@pytest.fixture
def needs_packages() -> None:
    if not demo.packages_installed():
        pytest.fail("frontend/node_modules is missing: run scripts/setup", pytrace=False)


DEV_SECRET = "a-dev-token-secret-made-for-one-local-run-only"
DEV = {"dev_tokens": True, "dev_token_secret": DEV_SECRET}


def client_for(settings, **changes):
    return create_app(replace(settings, **changes)).test_client()


def test_the_demo_is_off_unless_enabled(settings):
    client = client_for(settings)
    for path in ("/demo", "/demo/", "/demo/static/demo.js", "/demo/vendor/x", "/demo/dev-token"):
        assert client.get(path).status_code == 404
    assert client.post("/demo/dev-token").status_code == 404


def test_enable_demo_is_read_from_the_environment():
    env = {"DIFY_API_KEY": DIFY_KEY, "SUPABASE_JWT_SECRET": tokens.SECRET}
    assert load_settings(env).enable_demo is False
    assert load_settings({**env, "ENABLE_DEMO": "1"}).enable_demo is True


@pytest.mark.usefixtures("needs_packages")
def test_the_demo_page_is_served_when_enabled(settings):
    client = client_for(settings, enable_demo=True)
    assert client.get("/demo").status_code == 308  # to /demo/, so relative URLs resolve there
    response = client.get("/demo/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert 'src="static/demo.js"' in page
    assert 'src="vendor/event-source-polyfill/eventsource.min.js"' in page
    assert "<script>" not in page  # no inline script: it runs under script-src 'self'
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]


def test_without_node_modules_the_page_says_to_run_setup(settings, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "NODE_MODULES", tmp_path / "node_modules")
    response = client_for(settings, enable_demo=True).get("/demo/")
    assert response.status_code == 503
    assert "run <code>scripts/setup</code>" in response.get_data(as_text=True)


@pytest.mark.usefixtures("needs_packages")
@pytest.mark.parametrize("name", sorted(demo.VENDOR_FILES))
def test_the_listed_vendor_files_are_served_as_javascript(settings, name):
    response = client_for(settings, enable_demo=True).get(f"/demo/vendor/{name}")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    assert response.get_data() == (demo.NODE_MODULES / demo.VENDOR_FILES[name]).read_bytes()


@pytest.mark.usefixtures("needs_packages")
def test_the_fetch_event_source_modules_import_only_served_names(settings):
    """Its ES modules import "./fetch" and "./parse": those resolve to served URLs."""
    client = client_for(settings, enable_demo=True)
    index = client.get("/demo/vendor/fetch-event-source/index.js").get_data(as_text=True)
    fetch = client.get("/demo/vendor/fetch-event-source/fetch").get_data(as_text=True)
    assert "from './fetch'" in index
    assert "from './parse'" in fetch
    assert client.get("/demo/vendor/fetch-event-source/parse").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/demo/vendor/event-source-polyfill/src/eventsource.js",
        "/demo/vendor/event-source-polyfill/package.json",
        "/demo/vendor/@microsoft/fetch-event-source/package.json",
        "/demo/vendor/fetch-event-source/fetch.js.map",
        "/demo/vendor/fetch-event-source/../../package-lock.json",
        "/demo/vendor/..%2f..%2fpackage.json",
        "/demo/vendor/%2e%2e/%2e%2e/app.py",
        "/demo/vendor/",
        "/demo/static/../demo.py",
        "/demo/static/%2e%2e/%2e%2e/settings.py",
        "/demo/static/nothing-here.js",
    ],
)
def test_paths_outside_the_whitelist_are_404(settings, path):
    assert client_for(settings, enable_demo=True).get(path).status_code == 404


def test_the_dev_token_route_exists_only_with_dev_tokens(settings):
    assert client_for(settings, enable_demo=True).post("/demo/dev-token").status_code == 404
    client = client_for(settings, enable_demo=True, **DEV)
    response = client.post("/demo/dev-token")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    claims = jwt.decode(
        response.get_json()["access_token"],
        DEV_SECRET,
        algorithms=["HS256"],
        audience="authenticated",
    )
    assert claims["sub"] == DEV_USER_ID
    assert claims["role"] == "authenticated"


def test_a_dev_token_is_never_signed_with_the_supabase_secret(settings):
    """Supabase (and anything else trusting the project's secret) must not accept it."""
    assert settings.supabase_jwt_secret == tokens.SECRET
    client = client_for(settings, enable_demo=True, **DEV)
    token = client.post("/demo/dev-token").get_json()["access_token"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, tokens.SECRET, algorithms=["HS256"], audience="authenticated")


def test_a_dev_token_opens_a_session(settings):
    client = client_for(settings, enable_demo=True, **DEV)
    token = client.post("/demo/dev-token").get_json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    # Past the session check, the blank message is refused before Dify would be called.
    response = client.post("/api/chat", json={"message": " "}, headers=headers)
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_param"


@pytest.mark.usefixtures("needs_packages")
def test_the_page_and_its_scripts_hold_no_dify_key(settings):
    client = client_for(settings, enable_demo=True, **DEV)
    paths = ["/demo/", "/demo/static/demo.js", "/demo/static/demo.css"]
    paths += [f"/demo/vendor/{name}" for name in demo.VENDOR_FILES]
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, path
        assert DIFY_KEY.encode() not in response.get_data()
        assert DIFY_KEY not in str(response.headers)
    token_answer = client.post("/demo/dev-token").get_data()
    assert DIFY_KEY.encode() not in token_answer


def test_the_demo_and_the_run_command_do_not_import_each_other_in_a_cycle():
    """demo.py needs only the dev tokens; dev.py (the run command) uses demo.py."""
    import subprocess
    import sys

    code = "import sys, dify_proxy.demo; print('dify_proxy.dev' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
