"""Plans: PLANS read and checked at start-up, the plan read from the verified token alone, and
each per-user limit (rate, streams, daily tokens, upload size) taken from the user's plan, with
429s that say which limit was hit and when it renews."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import pytest
from flask import Flask, g

from dify_proxy import create_app
from dify_proxy.auth import plan_in, require_session
from dify_proxy.limits import in_words
from dify_proxy.settings import PLAN_KEYS, ConfigError, Settings, load_settings
from dify_proxy.variables import BY_NAME
from tests.conftest import DIFY_URL
from tests.support import tokens
from tests.support.messages import is_a_sentence

MINIMAL = {"DIFY_API_KEY": "app-plans-test-key-0123456789", "SUPABASE_JWT_SECRET": tokens.SECRET}
EXAMPLE = {
    "free": {"rate_limit": "10/minute", "max_streams_per_user": 1, "daily_token_budget": 20000},
    "pro": {"rate_limit": "100/minute", "max_streams_per_user": 5},
}
CHAT = f"{DIFY_URL}/chat-messages"
UPLOAD = f"{DIFY_URL}/files/upload"


def plans(value: object) -> dict:
    return load_settings({**MINIMAL, "PLANS": json.dumps(value)}).plans


def plans_error(raw: str) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_settings({**MINIMAL, "PLANS": raw})
    return str(excinfo.value)


# --- PLANS ----------------------------------------------------------------------------------


def test_without_plans_there_are_none():
    assert load_settings(MINIMAL).plans == {}


def test_each_plans_values_are_read_as_their_variables_are():
    assert plans(EXAMPLE) == {
        "free": {"rate_limit": "10/minute", "max_streams_per_user": 1, "daily_token_budget": 20000},
        "pro": {"rate_limit": "100/minute", "max_streams_per_user": 5},
    }


def test_a_plan_can_turn_the_rate_limit_off_as_the_variable_can():
    assert plans({"pro": {"rate_limit": "off"}}) == {"pro": {"rate_limit": None}}


def test_a_plan_can_raise_the_upload_size():
    assert plans({"pro": {"max_upload_bytes": 104857600}}) == {
        "pro": {"max_upload_bytes": 104857600}
    }


def test_plan_names_are_lower_cased_as_the_claim_is():
    assert set(plans({"Free": {}, "PRO": {}})) == {"free", "pro"}


def test_a_count_written_as_a_string_is_read_as_the_variable_would_read_it():
    assert plans({"free": {"max_streams_per_user": "2"}}) == {"free": {"max_streams_per_user": 2}}


def test_an_unknown_key_is_named_with_its_plan_and_the_keys_a_plan_can_set():
    message = plans_error('{"free": {"max_streams": 1}}')
    assert message.startswith("PLANS: plan 'free', 'max_streams' is not a limit a plan can set")
    assert all(key in message for key in PLAN_KEYS)


@pytest.mark.parametrize("value", ["true", "null", "[1]", '{"n": 1}', '""'])
def test_a_value_of_the_wrong_type_is_named_with_its_plan_and_key(value):
    message = plans_error(f'{{"free": {{"max_streams_per_user": {value}}}}}')
    assert message.startswith("PLANS: plan 'free', 'max_streams_per_user' must be a number")


def test_a_bad_rate_is_named_with_its_plan_key_and_the_variables_grammar():
    message = plans_error('{"pro": {"rate_limit": "lots/minute"}}')
    assert message == (
        "PLANS: plan 'pro', 'rate_limit': RATE_LIMIT must look like 20/minute;300/day, or be off"
    )


@pytest.mark.parametrize("value", ["-1", "1.5", '"one"'])
def test_a_count_that_is_not_a_whole_number_is_named_with_its_plan_and_key(value):
    message = plans_error(f'{{"free": {{"daily_token_budget": {value}}}}}')
    assert message == (
        "PLANS: plan 'free', 'daily_token_budget': DAILY_TOKEN_BUDGET must be a whole number,"
        " 0 or more"
    )


def test_an_upload_size_of_zero_is_refused_as_the_variable_refuses_it():
    message = plans_error('{"free": {"max_upload_bytes": 0}}')
    assert message.startswith("PLANS: plan 'free', 'max_upload_bytes': MAX_UPLOAD_BYTES must be")


@pytest.mark.parametrize("raw", ["{free}", "[]", '"free"', "1"])
def test_plans_that_are_not_a_json_object_are_named(raw):
    assert plans_error(raw).startswith("PLANS must be a JSON object")


def test_a_plan_that_is_not_an_object_is_named():
    assert plans_error('{"free": "10/minute"}') == (
        "PLANS: plan 'free' must be a JSON object of limits"
    )


@pytest.mark.parametrize("raw", ['{"Free": {}, "free": {}}', '{" ": {}}'])
def test_a_plan_named_twice_or_not_at_all_is_refused(raw):
    assert plans_error(raw).startswith("PLANS: plan ")


def test_every_key_a_plan_can_set_is_a_setting_and_a_variable_and_documented():
    fields = {f.name for f in dataclasses.fields(Settings)}
    for key in PLAN_KEYS:
        assert key in fields and key.upper() in BY_NAME, key
        assert f"`{key}`" in BY_NAME["PLANS"].description, key


# --- the value for a user -------------------------------------------------------------------


@pytest.fixture
def with_plans() -> Settings:
    return load_settings({**MINIMAL, "RATE_LIMIT": "20/minute", "PLANS": json.dumps(EXAMPLE)})


def test_a_user_on_a_plan_gets_the_plans_value(with_plans):
    assert with_plans.limit("max_streams_per_user", "free") == 1
    assert with_plans.limit("max_streams_per_user", "pro") == 5


@pytest.mark.parametrize("plan", [None, "enterprise"])
def test_a_user_without_a_plan_or_with_an_unknown_one_gets_the_variables_value(with_plans, plan):
    assert with_plans.limit("rate_limit", plan) == "20/minute"
    assert with_plans.limit("max_streams_per_user", plan) == Settings.max_streams_per_user


def test_a_plan_that_does_not_set_a_limit_gets_the_variables_value(with_plans):
    assert with_plans.limit("daily_token_budget", "pro") == 0


# --- PLAN_CLAIM -----------------------------------------------------------------------------


def test_the_plan_claim_defaults_to_app_metadata_plan():
    assert load_settings(MINIMAL).plan_claim == "app_metadata.plan"


def test_the_plan_claim_can_be_a_top_level_claim_set_by_a_hook():
    assert load_settings({**MINIMAL, "PLAN_CLAIM": "plan"}).plan_claim == "plan"


@pytest.mark.parametrize("path", ["user_metadata.plan", "user_metadata"])
def test_a_plan_claim_in_user_metadata_is_refused_because_users_can_edit_it(path):
    with pytest.raises(ConfigError, match="^PLAN_CLAIM must not be in user_metadata"):
        load_settings({**MINIMAL, "PLAN_CLAIM": path})


@pytest.mark.parametrize("path", ["app_metadata..plan", ".plan", "plan.", "app_metadata. plan"])
def test_a_malformed_plan_claim_is_named(path):
    with pytest.raises(ConfigError, match="^PLAN_CLAIM must be a dotted claim path"):
        load_settings({**MINIMAL, "PLAN_CLAIM": path})


# --- the plan in the claims -----------------------------------------------------------------


def test_the_plan_is_found_at_a_nested_path():
    assert plan_in({"app_metadata": {"plan": "pro"}}, "app_metadata.plan") == "pro"


def test_the_plan_is_found_at_a_top_level_claim():
    assert plan_in({"plan": "pro"}, "plan") == "pro"


def test_the_plan_is_lower_cased_and_trimmed():
    assert plan_in({"plan": " Pro "}, "plan") == "pro"


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"app_metadata": {}},
        {"app_metadata": None},
        {"app_metadata": "plan"},
        {"app_metadata": ["plan"]},
        {"plan": "pro"},
    ],
    ids=["no app_metadata", "no plan", "null metadata", "string metadata", "list", "elsewhere"],
)
def test_a_missing_plan_is_none(claims):
    assert plan_in(claims, "app_metadata.plan") is None


@pytest.mark.parametrize("value", [1, True, None, ["pro"], {"name": "pro"}, "", "  "])
def test_a_plan_that_is_not_a_non_blank_string_is_none(value):
    assert plan_in({"app_metadata": {"plan": value}}, "app_metadata.plan") is None


# --- the plan on the session ----------------------------------------------------------------


def session_plan(app: Flask, headers: dict[str, str], client=None) -> object:
    """The g.plan a view under require_session sees."""
    seen = []

    @app.get("/test/plan")
    @require_session
    def view():
        seen.append(g.plan)
        return "ok"

    response = (client or app.test_client()).get("/test/plan", headers=headers)
    assert response.status_code == 200, response.get_data()
    return seen[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_bearer_session_carries_its_tokens_plan(settings):
    assert session_plan(create_app(settings), bearer(tokens.on_plan("Pro"))) == "pro"


def test_a_cookie_session_carries_its_tokens_plan(settings):
    cookie = "sb-plans-auth-token"
    app = create_app(dataclasses.replace(settings, supabase_auth_cookie=cookie))
    session = json.dumps({"access_token": tokens.on_plan("free"), "user": {"id": "x"}})
    client = app.test_client()
    client.set_cookie(cookie, session)
    assert session_plan(app, {"Origin": "http://localhost"}, client) == "free"


def test_a_plan_in_user_metadata_is_not_the_users_plan(settings):
    token = tokens.hs256(user_metadata={"plan": "pro"})
    assert session_plan(create_app(settings), bearer(token)) is None


def test_a_token_whose_signature_fails_gets_no_plan_but_a_401(settings):
    app = create_app(settings)
    forged = tokens.on_plan("pro", secret="another-secret-that-is-at-least-32-bytes-long")
    response = app.test_client().post("/api/chat", json={"message": "hi"}, headers=bearer(forged))
    assert response.status_code == 401


# --- each limit, per plan ----------------------------------------------------------------------


def app_with(settings: Settings, **variables: object) -> Flask:
    """An app whose variables are `variables` and whose plans are EXAMPLE's shape, smaller."""
    plans = {
        "free": {"rate_limit": "1/minute", "max_streams_per_user": 1, "daily_token_budget": 10},
        "pro": {"rate_limit": "3/minute", "max_streams_per_user": 3, "daily_token_budget": 30},
    }
    return create_app(dataclasses.replace(settings, plans=plans, **variables))


def ask(client, token: str, mode: str = "blocking"):
    response = client.post(
        "/api/chat", json={"message": "hi", "response_mode": mode}, headers=bearer(token)
    )
    response.get_data()
    return response


def statuses(client, token: str, times: int) -> list[int]:
    return [ask(client, token).status_code for _ in range(times)]


FREE = tokens.on_plan("free", sub="00000000-0000-4000-8000-000000000001")
PRO = tokens.on_plan("pro", sub="00000000-0000-4000-8000-000000000002")
NONE = tokens.hs256(sub="00000000-0000-4000-8000-000000000003")
UNKNOWN = tokens.on_plan("gold", sub="00000000-0000-4000-8000-000000000004")


@pytest.fixture
def dify(requests_mock):
    return requests_mock.post(CHAT, json={"answer": "Hi", "metadata": {}})


def test_each_plan_gets_its_own_request_rate(settings, dify):
    client = app_with(settings, rate_limit="2/minute").test_client()
    assert statuses(client, FREE, 2) == [200, 429]
    assert statuses(client, PRO, 4) == [200, 200, 200, 429]
    assert statuses(client, NONE, 3) == [200, 200, 429]
    assert statuses(client, UNKNOWN, 3) == [200, 200, 429]


def test_a_plans_rate_applies_even_when_rate_limit_is_off(settings, dify):
    client = app_with(settings, rate_limit=None).test_client()
    assert statuses(client, FREE, 2) == [200, 429]
    assert statuses(client, NONE, 5) == [200] * 5


def test_a_plan_can_have_no_rate_limit_while_others_do(settings, dify):
    app = create_app(
        dataclasses.replace(settings, rate_limit="1/minute", plans={"pro": {"rate_limit": None}})
    )
    client = app.test_client()
    assert statuses(client, PRO, 5) == [200] * 5
    assert statuses(client, NONE, 2) == [200, 429]


def test_each_plan_gets_its_own_stream_limit(settings, dify):
    app = app_with(settings, rate_limit=None, max_streams_per_user=2)
    quotas = app.extensions["dify_proxy.quotas"]
    client = app.test_client()
    for token, sub, slots in [
        (FREE, "00000000-0000-4000-8000-000000000001", 1),
        (PRO, "00000000-0000-4000-8000-000000000002", 3),
        (NONE, "00000000-0000-4000-8000-000000000003", 2),
    ]:
        leases = [quotas.acquire_stream(sub, 100) for _ in range(slots - 1)]
        assert ask(client, token).status_code == 200, sub  # the last free slot
        quotas.acquire_stream(sub, 100)
        assert ask(client, token).status_code == 429, sub
        assert len(leases) == slots - 1


def test_each_plan_gets_its_own_token_budget(settings, dify):
    app = app_with(settings, rate_limit=None, daily_token_budget=20)
    quotas = app.extensions["dify_proxy.quotas"]
    client = app.test_client()
    for token, sub, budget in [
        (FREE, "00000000-0000-4000-8000-000000000001", 10),
        (PRO, "00000000-0000-4000-8000-000000000002", 30),
        (NONE, "00000000-0000-4000-8000-000000000003", 20),
    ]:
        quotas.add_tokens(sub, budget - 1)
        assert ask(client, token).status_code == 200, sub
        quotas.add_tokens(sub, 1)
        assert ask(client, token).status_code == 429, sub


def test_tokens_are_counted_when_only_a_plan_has_a_budget(settings, requests_mock):
    requests_mock.post(CHAT, json={"answer": "Hi", "metadata": {"usage": {"total_tokens": 7}}})
    app = app_with(settings, rate_limit=None, daily_token_budget=0)
    ask(app.test_client(), NONE)
    assert (
        app.extensions["dify_proxy.quotas"].tokens_used("00000000-0000-4000-8000-000000000003") == 7
    )


def test_each_plan_gets_its_own_upload_size(settings, requests_mock):
    requests_mock.post(UPLOAD, json={"id": "f"})
    app = create_app(
        dataclasses.replace(
            settings,
            rate_limit=None,
            max_upload_bytes=1000,
            plans={"pro": {"max_upload_bytes": 5000}},
        )
    )
    client = app.test_client()

    def upload(token: str) -> int:
        body = {"file": (io.BytesIO(b"x" * 3000), "a.txt", "text/plain")}
        return client.post(
            "/api/files/upload",
            data=body,
            headers=bearer(token),
            content_type="multipart/form-data",
        ).status_code

    assert upload(PRO) == 200
    assert upload(NONE) == 413


# --- what a 429 says --------------------------------------------------------------------------


def test_the_rate_429_says_the_plans_limit_and_when_it_renews(settings, dify):
    client = app_with(settings, rate_limit=None).test_client()
    ask(client, FREE)
    response = ask(client, FREE)
    assert response.status_code == 429
    assert response.json["code"] == "too_many_requests"
    seconds = int(response.headers["Retry-After"])
    assert 1 <= seconds <= 60
    assert response.json["message"] == (
        "Request rate limit reached: 1 per minute on the free plan;"
        f" it renews in {in_words(seconds)}."
    )


def test_the_rate_429_of_a_user_without_a_plan_names_no_plan(settings, dify):
    client = app_with(settings, rate_limit="1 per 10 seconds").test_client()
    ask(client, NONE)
    message = ask(client, NONE).json["message"]
    assert re.fullmatch(
        r"Request rate limit reached: 1 per 10 seconds; it renews in \d+ seconds?\.", message
    )


def test_with_two_rates_the_429_tells_the_one_that_keeps_the_user_waiting(settings, dify):
    client = app_with(settings, rate_limit="5/minute;1/day").test_client()
    ask(client, NONE)
    response = ask(client, NONE)
    assert response.json["message"].startswith("Request rate limit reached: 1 per day;")
    assert int(response.headers["Retry-After"]) > 60


def test_the_stream_429_says_the_plans_limit_and_when_a_slot_frees(settings, dify):
    app = app_with(settings, rate_limit=None)
    app.extensions["dify_proxy.quotas"].acquire_stream("00000000-0000-4000-8000-000000000001", 1)
    response = ask(app.test_client(), FREE)
    assert response.json["code"] == "too_many_streams"
    assert response.json["message"] == (
        "Answer limit reached: 1 at a time on the free plan; a slot frees when one of your"
        " answers ends (or you stop one)."
    )
    assert response.headers["Retry-After"] == "5"


def test_the_token_429_says_the_plans_budget_and_that_it_renews_at_midnight_utc(settings, dify):
    app = app_with(settings, rate_limit=None)
    app.extensions["dify_proxy.quotas"].add_tokens("00000000-0000-4000-8000-000000000002", 30)
    response = ask(app.test_client(), PRO)
    assert response.json["code"] == "token_budget_exceeded"
    seconds = int(response.headers["Retry-After"])
    assert response.json["message"] == (
        "Daily token budget reached: 30 tokens a day on the pro plan;"
        f" it renews at 00:00 UTC, in {in_words(seconds)}."
    )


def test_every_limits_429_is_a_sentence_in_dify_error_shape(settings, dify):
    app = app_with(settings, rate_limit=None)
    quotas = app.extensions["dify_proxy.quotas"]
    client = app.test_client()
    ask(client, FREE)
    rate = ask(client, FREE)
    quotas.acquire_stream("00000000-0000-4000-8000-000000000002", 3)
    quotas.acquire_stream("00000000-0000-4000-8000-000000000002", 3)
    quotas.acquire_stream("00000000-0000-4000-8000-000000000002", 3)
    streams = ask(client, PRO)
    for response in (rate, streams):
        assert set(response.json) == {"code", "message", "status"}
        assert response.json["status"] == 429
        assert is_a_sentence(response.json["message"])


def test_a_rate_refusal_is_counted_as_rate(settings, dify):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("dify_proxy_rate_limited_total", {"limit": "rate"}) or 0
    client = app_with(settings, rate_limit=None).test_client()
    statuses(client, FREE, 2)
    assert REGISTRY.get_sample_value("dify_proxy_rate_limited_total", {"limit": "rate"}) == (
        before + 1
    )


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (1, "1 second"),
        (42, "42 seconds"),
        (89, "89 seconds"),
        (90, "2 minutes"),
        (3000, "50 minutes"),
        (5400, "1 hour 30 minutes"),
        (5460, "1 hour 31 minutes"),
        (7200, "2 hours"),
        (86400, "24 hours"),
    ],
)
def test_waits_are_said_in_words(seconds, words):
    assert in_words(seconds) == words
