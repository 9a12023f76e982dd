"""What `scripts/run` prints before it starts: the mode, the Dify URL, how sessions are checked,
where /demo is, and which .env values are still .env.example's placeholders."""

from __future__ import annotations

import pytest

from dify_proxy import demo, dev
from dify_proxy.settings import Settings, load_settings
from dify_proxy.variables import BY_NAME

KEY = "app-unit-test-key-0123456789abcdef"
SECRET = "a-test-secret-that-is-longer-than-32-characters"


def settings(**overrides: str) -> Settings:
    return load_settings({"DIFY_API_KEY": KEY, "SUPABASE_JWT_SECRET": SECRET, **overrides})


def test_the_banner_names_the_stand_in_mode_and_why():
    text = dev.banner(settings(), "8000", "no DIFY_API_KEY is set", [])

    assert "mode:  the local Dify stand-in (no DIFY_API_KEY is set)" in text


def test_the_banner_names_real_dify_mode_and_its_url():
    text = dev.banner(settings(DIFY_API_URL="https://dify.example.com/v1"), "8000", None, [])

    assert "mode:  real Dify" in text
    assert "Dify:  https://dify.example.com/v1" in text


def test_the_banner_never_shows_the_key_the_secret_or_credentials_in_the_url():
    url = "https://user:hunter2-password@dify.example.com:8443/v1?token=abc"
    text = dev.banner(settings(DIFY_API_URL=url), "8000", None, [])

    assert "Dify:  https://dify.example.com:8443/v1\n" in text
    for secret in (KEY, SECRET, "hunter2", "user:", "token=abc"):
        assert secret not in text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "auth:  HS256 tokens with SUPABASE_JWT_SECRET\n"),
        (
            {"SUPABASE_JWT_SECRET": "", "SUPABASE_URL": "https://abcdefghij.supabase.co"},
            "auth:  ES256/RS256 tokens with the JWKS at"
            " https://abcdefghij.supabase.co/auth/v1/.well-known/jwks.json\n",
        ),
        (
            {"SUPABASE_URL": "https://abcdefghij.supabase.co"},
            "auth:  HS256 tokens with SUPABASE_JWT_SECRET and ES256/RS256 tokens with the JWKS",
        ),
    ],
    ids=["hs256-secret", "jwks-url", "both"],
)
def test_the_banner_says_how_sessions_are_checked(overrides, expected):
    assert expected in dev.banner(settings(**overrides), "8000", None, [])


def test_the_banner_says_demo_is_off_and_how_to_turn_it_on():
    text = dev.banner(settings(), "8000", None, [])

    assert "demo:  off (ENABLE_DEMO=1 turns it on)" in text


def test_the_banner_gives_the_demo_address_when_it_is_on(monkeypatch):
    monkeypatch.setattr(demo, "packages_installed", lambda: True)

    text = dev.banner(settings(ENABLE_DEMO="1"), "8123", None, [])

    assert "demo:  http://127.0.0.1:8123/demo" in text


def test_the_banner_says_why_demo_is_off_when_its_packages_are_missing(monkeypatch):
    monkeypatch.setattr(demo, "packages_installed", lambda: False)

    text = dev.banner(settings(ENABLE_DEMO="1"), "8000", None, [])

    assert "demo:  off: its browser packages are missing (scripts/setup installs them" in text


def test_the_banner_lists_placeholders_it_ignored():
    text = dev.banner(settings(), "8000", "x", ["SUPABASE_JWT_SECRET", "SUPABASE_URL"])

    assert ".env:  still placeholders, ignored for this run: SUPABASE_JWT_SECRET, SUPABASE_URL" in (
        text
    )


def test_values_copied_from_env_example_are_found_as_placeholders():
    copied = {name: BY_NAME[name].example for name in ("DIFY_API_KEY", "SUPABASE_URL")}
    copied["DIFY_API_URL"] = BY_NAME["DIFY_API_URL"].example  # a real default, not a placeholder

    assert dev.placeholders(copied) == ["DIFY_API_KEY", "SUPABASE_URL"]


def test_a_real_value_that_happens_to_contain_your_is_not_a_placeholder():
    assert dev.placeholders({"CORS_ORIGINS": "https://your-shop.example.com"}) == []


def test_the_banner_says_the_stand_in_listens_on_loopback_only_and_how_to_open_it():
    text = dev.banner(settings(), "8000", "x", [], dev.STANDIN_HOST)

    assert "listen: 127.0.0.1 only (scripts/run --host 0.0.0.0 opens it to the network)" in text


def test_the_stand_in_mode_binds_gunicorn_to_the_host_it_was_given(monkeypatch):
    monkeypatch.setenv("PORT", "8123")

    assert dev.gunicorn_command("127.0.0.1")[-2:] == ["--bind", "127.0.0.1:8123"]
    assert dev.gunicorn_command("::1")[-2:] == ["--bind", "[::1]:8123"]
    assert "--bind" not in dev.gunicorn_command(None)  # gunicorn.conf.py's, as the Procfile
