"""Configuration: read once, validated at start-up, and a bad variable is named in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from dotenv import dotenv_values

from dify_proxy.settings import PLACEHOLDERS, ConfigError, Settings, load_settings
from tests.support.jwks import free_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "app-SeCrEt-dify-key-7f3a9c0e1b2d"
JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
SUPABASE_URL = "https://abcdefghijklmnop.supabase.co"
MINIMAL = {"DIFY_API_KEY": API_KEY, "SUPABASE_JWT_SECRET": JWT_SECRET}
TIMEOUT_VARIABLES = ["DIFY_CONNECT_TIMEOUT", "DIFY_READ_TIMEOUT", "HEARTBEAT_INTERVAL"]


def env(**overrides: str | None) -> dict[str, str]:
    """The minimal valid environment with some variables changed (None removes one)."""
    merged: dict[str, str | None] = {**MINIMAL, **overrides}
    return {name: value for name, value in merged.items() if value is not None}


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(environ)
    return str(excinfo.value)


# --- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, default",
    [
        ("dify_api_url", "https://api.dify.ai/v1"),
        ("dify_read_timeout", 25),
        ("heartbeat_interval", 15),
        ("supabase_jwt_audience", "authenticated"),
        ("log_level", "INFO"),
    ],
)
def test_unset_variable_takes_its_default(field: str, default: object) -> None:
    assert getattr(load_settings(MINIMAL), field) == default


def test_blank_optional_variable_takes_its_default() -> None:
    settings = load_settings(env(DIFY_API_URL=" ", DIFY_READ_TIMEOUT="", LOG_LEVEL=""))
    assert (settings.dify_api_url, settings.dify_read_timeout, settings.log_level) == (
        "https://api.dify.ai/v1",
        25,
        "INFO",
    )


def test_secret_alone_is_enough_to_verify_sessions() -> None:
    settings = load_settings(MINIMAL)
    assert (settings.supabase_jwt_secret, settings.supabase_url) == (JWT_SECRET, None)


def test_supabase_url_alone_is_enough_to_verify_sessions() -> None:
    settings = load_settings(env(SUPABASE_JWT_SECRET=None, SUPABASE_URL=SUPABASE_URL))
    assert settings.supabase_jwt_secret is None
    assert settings.jwks_url == f"{SUPABASE_URL}/auth/v1/.well-known/jwks.json"
    assert settings.jwt_issuer == f"{SUPABASE_URL}/auth/v1"


# --- required variables --------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_missing_dify_api_key_is_named(value: str | None) -> None:
    assert "DIFY_API_KEY" in config_error(env(DIFY_API_KEY=value))


def test_missing_both_session_keys_names_both_variables() -> None:
    message = config_error(env(SUPABASE_JWT_SECRET=None))
    assert "SUPABASE_JWT_SECRET" in message
    assert "SUPABASE_URL" in message


# --- malformed values ----------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["DIFY_API_URL", "SUPABASE_URL"])
@pytest.mark.parametrize(
    "value",
    ["ftp://api.dify.ai/v1", "api.dify.ai/v1", "localhost:8080", "https://", "not a url"],
)
def test_url_that_is_not_http_is_named(variable: str, value: str) -> None:
    assert variable in config_error(env(**{variable: value}))


@pytest.mark.parametrize("variable", TIMEOUT_VARIABLES)
@pytest.mark.parametrize("value", ["abc", "10s", "0", "-1", "-0.5", "nan", "inf", "-inf"])
def test_seconds_that_are_not_a_positive_finite_number_are_named(variable: str, value: str) -> None:
    assert variable in config_error(env(**{variable: value}))


@pytest.mark.parametrize("variable", TIMEOUT_VARIABLES)
def test_seconds_are_read_as_numbers(variable: str) -> None:
    settings = load_settings(env(**{variable: "42"}))
    assert getattr(settings, variable.lower()) == 42.0


def test_fractional_heartbeat_interval_is_accepted() -> None:
    assert load_settings(env(HEARTBEAT_INTERVAL="0.5")).heartbeat_interval == 0.5


@pytest.mark.parametrize("value", ["verbose", "TRACE", "5"])
def test_unknown_log_level_is_named(value: str) -> None:
    assert "LOG_LEVEL" in config_error(env(LOG_LEVEL=value))


def test_log_level_is_case_insensitive() -> None:
    assert load_settings(env(LOG_LEVEL="debug")).log_level == "DEBUG"


# --- normalisation -------------------------------------------------------------------------


def test_trailing_slash_of_dify_api_url_is_stripped() -> None:
    settings = load_settings(env(DIFY_API_URL="https://dify.example.com/v1/"))
    assert settings.dify_api_url == "https://dify.example.com/v1"


@pytest.mark.parametrize("path", ["/auth/v1", "/rest/v1/"])
def test_supabase_url_with_a_path_is_named(path: str) -> None:
    with pytest.raises(ConfigError, match="SUPABASE_URL"):
        load_settings({**MINIMAL, "SUPABASE_URL": SUPABASE_URL + path})


def test_trailing_slash_of_supabase_url_is_stripped() -> None:
    settings = load_settings(env(SUPABASE_URL=f"{SUPABASE_URL}/"))
    assert settings.supabase_url == SUPABASE_URL
    assert settings.jwt_issuer == f"{SUPABASE_URL}/auth/v1"
    assert settings.jwks_url == f"{SUPABASE_URL}/auth/v1/.well-known/jwks.json"


# --- secrets stay out of messages ----------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        {"SUPABASE_JWT_SECRET": None, "SUPABASE_URL": None},
        {"DIFY_API_URL": "dify"},
        {"SUPABASE_URL": "supabase"},
        {"DIFY_READ_TIMEOUT": "soon"},
        {"HEARTBEAT_INTERVAL": "0"},
        {"DIFY_CONNECT_TIMEOUT": "nan"},
        {"LOG_LEVEL": "loud"},
        pytest.param({"DIFY_API_URL": API_KEY}, id="API key pasted into DIFY_API_URL"),
        pytest.param({"SUPABASE_URL": JWT_SECRET}, id="JWT secret pasted into SUPABASE_URL"),
    ],
    ids=lambda broken: next(iter(broken)),
)
def test_config_error_never_contains_the_api_key_or_the_jwt_secret(
    broken: dict[str, str | None],
) -> None:
    message = config_error(env(**{"SUPABASE_URL": SUPABASE_URL, **broken}))
    assert API_KEY not in message
    assert JWT_SECRET not in message


@pytest.mark.parametrize("render", [repr, str], ids=["repr", "str"])
def test_settings_text_never_contains_the_api_key_or_the_jwt_secret(render: object) -> None:
    settings = load_settings(env(SUPABASE_URL=SUPABASE_URL))
    text = render(settings)  # type: ignore[operator]
    assert API_KEY not in text
    assert JWT_SECRET not in text


def test_settings_keep_the_key_and_secret_for_the_app() -> None:
    settings = load_settings(MINIMAL)
    assert isinstance(settings, Settings)
    assert (settings.dify_api_key, settings.supabase_jwt_secret) == (API_KEY, JWT_SECRET)


# --- start-up through the real entry points ------------------------------------------------


@pytest.fixture
def environ_without_api_key(tmp_path: Path) -> dict[str, str]:
    """A clean process environment: everything valid except DIFY_API_KEY, and an empty HOME."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "PYTHONDONTWRITEBYTECODE": "1",
        "SUPABASE_JWT_SECRET": JWT_SECRET,
        "PORT": str(free_port()),
    }


def run_entry_point(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess:
    """Run from the repository root; a process that does not exit within 20 s is a failure
    (a server that started despite the bad configuration), and its whole group is killed."""
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{args[0]} kept running despite the missing DIFY_API_KEY")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def assert_one_line_naming_the_api_key(stderr: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "DIFY_API_KEY" in lines[0]


def test_importing_the_wsgi_module_without_api_key_exits_3_with_one_line(
    environ_without_api_key: dict[str, str],
) -> None:
    result = run_entry_point([sys.executable, "-c", "import app"], environ_without_api_key)
    assert result.returncode == 3
    assert_one_line_naming_the_api_key(result.stderr)


def test_gunicorn_without_api_key_stops_at_once_with_one_line(
    environ_without_api_key: dict[str, str],
) -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    result = run_entry_point(
        [str(gunicorn), "app:app", "--config", "gunicorn.conf.py"], environ_without_api_key
    )
    assert result.returncode != 0
    assert_one_line_naming_the_api_key(result.stderr)


# --- placeholders and weak secrets (issue 11, item 1) ---------------------------------------


def test_a_copied_env_example_is_refused_until_each_placeholder_is_replaced() -> None:
    """`cp .env.example .env` must not start a server that accepts tokens signed with the
    example's published "secret": each placeholder is named in turn until it is replaced."""
    example = {k: v for k, v in dotenv_values(ROOT / ".env.example").items() if v is not None}
    for name, real_value in [
        ("DIFY_API_KEY", API_KEY),
        ("SUPABASE_JWT_SECRET", JWT_SECRET),
        ("SUPABASE_URL", SUPABASE_URL),
    ]:
        message = config_error(example)
        assert message.startswith(f"{name} is still the example's placeholder"), message
        example[name] = real_value
    assert load_settings(example).supabase_url == SUPABASE_URL


@pytest.mark.parametrize("secret", ["short-secret", "x" * 31, "é" * 15])
def test_a_jwt_secret_under_32_bytes_is_refused_by_name(secret: str) -> None:
    message = config_error(env(SUPABASE_JWT_SECRET=secret))
    assert "SUPABASE_JWT_SECRET is too short" in message
    assert secret not in message


def test_a_jwt_secret_of_exactly_32_bytes_is_accepted() -> None:
    assert load_settings(env(SUPABASE_JWT_SECRET="x" * 32)).supabase_jwt_secret == "x" * 32


def test_gunicorn_with_the_example_secret_stops_at_once_with_one_line(
    environ_without_api_key: dict[str, str],
) -> None:
    environ = {
        **environ_without_api_key,
        "DIFY_API_KEY": API_KEY,
        "SUPABASE_JWT_SECRET": PLACEHOLDERS["SUPABASE_JWT_SECRET"],
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    result = run_entry_point([str(gunicorn), "app:app", "--config", "gunicorn.conf.py"], environ)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "SUPABASE_JWT_SECRET is still the example's placeholder" in lines[0]


def test_a_library_warning_is_logged_as_one_json_line(
    environ_without_api_key: dict[str, str],
) -> None:
    """PyJWT's key-length warning (and any other) used to reach stderr as bare text."""
    environ = {**environ_without_api_key, "DIFY_API_KEY": API_KEY}
    script = "import app, warnings; warnings.warn('key too short', UserWarning)"
    result = run_entry_point([sys.executable, "-c", script], environ)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    entry = json.loads(lines[0])
    assert entry["logger"] == "py.warnings" and "key too short" in entry["message"]


# --- dev tokens (the local stand-in only) ---------------------------------------------------

DEV_SECRET = "a-dev-token-secret-made-for-one-local-run-only"
STANDIN_URL = "http://127.0.0.1:5001/v1"


def dev_env(**overrides: str | None) -> dict[str, str]:
    dev = {"DEV_TOKENS": "1", "DIFY_API_URL": STANDIN_URL, "DEV_TOKEN_SECRET": DEV_SECRET}
    return env(**{**dev, **overrides})


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:5001/v1", "http://localhost:5001/v1", "http://[::1]:5001/v1"]
)
def test_dev_tokens_are_accepted_against_a_dify_on_loopback(url: str) -> None:
    settings = load_settings(dev_env(DIFY_API_URL=url))
    assert settings.dev_tokens and settings.dev_token_secret == DEV_SECRET


def test_dev_tokens_against_a_dify_elsewhere_are_refused_by_name() -> None:
    message = config_error(dev_env(DIFY_API_URL="https://api.dify.ai/v1"))
    assert message.startswith("DEV_TOKENS is only for the local Dify stand-in")


@pytest.mark.parametrize(
    "url",
    [
        "http://api.dify.ai\\@localhost/v1",
        "http://api.dify.ai\\@127.0.0.1:5001/v1",
        "http://api.dify.ai\\\\@localhost/v1",
    ],
)
def test_a_url_that_urllib_and_requests_read_as_different_hosts_is_refused(url: str) -> None:
    """urllib sees localhost there, but requests (urllib3) connects to api.dify.ai."""
    assert config_error(dev_env(DIFY_API_URL=url)).startswith("DIFY_API_URL must be an http(s) URL")


@pytest.mark.parametrize(
    "url",
    [
        "http://api.dify.ai@localhost/v1",
        "http://api.dify.ai\\@localhost/v1",
        "http://user:pass@127.0.0.1:5001/v1",
        "http://localhost#@api.dify.ai/v1",
        "http://localhost?@api.dify.ai/v1",
        "http://api.dify.ai#\\@localhost/v1",
        "http://api.dify.ai%5C@localhost/v1",
        "http://api.dify.ai\t@localhost/v1",
        "http://localhost.api.dify.ai/v1",
        "http://127.0.0.1.nip.io/v1",
        "http://[::ffff:8.8.8.8]/v1",
    ],
)
def test_dev_tokens_are_allowed_only_where_requests_connects_to_loopback(url: str) -> None:
    """Whatever the URL, if the settings accept it with DEV_TOKENS, the HTTP client that calls
    Dify (requests, through urllib3's parser) connects to this machine."""
    from urllib3.util import parse_url

    try:
        settings = load_settings(dev_env(DIFY_API_URL=url))
    except ConfigError as exc:
        assert "DIFY_API_URL" in str(exc) or "DEV_TOKENS" in str(exc)
        return
    assert parse_url(settings.dify_api_url + "/chat-messages").host in (
        "127.0.0.1",
        "localhost",
        "[::1]",
    )


def test_dev_tokens_need_their_own_secret() -> None:
    message = config_error(dev_env(DEV_TOKEN_SECRET=None))
    assert message.startswith("DEV_TOKENS needs DEV_TOKEN_SECRET")


def test_a_dev_token_secret_under_32_bytes_is_refused() -> None:
    assert "DEV_TOKEN_SECRET" in config_error(dev_env(DEV_TOKEN_SECRET="x" * 31))


def test_the_supabase_secret_cannot_be_the_dev_token_secret() -> None:
    """A dev token signed with the project's secret would be a real Supabase session."""
    message = config_error(dev_env(DEV_TOKEN_SECRET=JWT_SECRET))
    assert message.startswith("DEV_TOKEN_SECRET must not be SUPABASE_JWT_SECRET")
    assert JWT_SECRET not in message


def test_with_dev_tokens_no_supabase_key_is_needed() -> None:
    settings = load_settings(dev_env(SUPABASE_JWT_SECRET=None))
    assert settings.supabase_jwt_secret is None and settings.supabase_url is None


def test_without_dev_tokens_the_dev_token_secret_is_not_used() -> None:
    assert load_settings(env(DEV_TOKEN_SECRET=DEV_SECRET)).dev_token_secret is None


def test_database_url_must_be_postgresql():
    with pytest.raises(ConfigError, match="DATABASE_URL must be a postgres:// or postgresql://"):
        load_settings(env(DATABASE_URL="mysql://u:p@h/d"))


def test_database_url_is_refused_while_it_is_the_examples_placeholder():
    with pytest.raises(ConfigError, match="DATABASE_URL is still the example's placeholder"):
        load_settings(env(DATABASE_URL=PLACEHOLDERS["DATABASE_URL"]))


def test_heroku_postgres_urls_are_accepted():
    settings = load_settings(env(DATABASE_URL="postgres://u:p@ec2.example.com:5432/d"))
    assert settings.database_url == "postgres://u:p@ec2.example.com:5432/d"


@pytest.mark.parametrize("name", ["DAILY_COST_BUDGET", "MONTHLY_COST_BUDGET"])
def test_cost_budgets_are_exact_amounts(name):
    settings = load_settings(env(**{name: "12.50"}))
    assert getattr(settings, name.lower()) == Decimal("12.50")


@pytest.mark.parametrize("value", ["-1", "lots", "NaN", "Infinity"])
def test_a_cost_budget_that_is_not_an_amount_is_refused_naming_it(value):
    with pytest.raises(ConfigError, match="DAILY_COST_BUDGET must be an amount"):
        load_settings(env(DAILY_COST_BUDGET=value))


def test_the_database_urls_password_is_not_in_the_settings_repr():
    settings = load_settings(env(DATABASE_URL="postgresql://u:hunter2secret@h:5432/d"))
    assert "hunter2secret" not in repr(settings)
