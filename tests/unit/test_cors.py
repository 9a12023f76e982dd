"""CORS from the CORS_ORIGINS allow-list, via flask-cors."""

from dataclasses import replace

import pytest

from dify_proxy import create_app

LISTED = "https://app.example.com"


@pytest.fixture
def app(settings):
    return create_app(replace(settings, cors_origins=(LISTED, "http://localhost:5173")))


def preflight(client, origin: str):
    return client.options(
        "/api/chat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_a_preflight_from_a_listed_origin_allows_auth_and_json(client):
    response = preflight(client, LISTED)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == LISTED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_a_preflight_from_an_unlisted_origin_gets_no_cors_headers(client):
    response = preflight(client, "https://evil.example")
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_listed_origin_is_echoed_never_a_wildcard_and_varies_by_origin(client, auth):
    response = client.post("/api/chat", json={}, headers={**auth, "Origin": LISTED})
    assert response.headers["Access-Control-Allow-Origin"] == LISTED
    assert "Origin" in response.headers["Vary"]


def test_errors_carry_cors_headers_so_the_page_can_read_them(client):
    response = client.post("/api/chat", json={}, headers={"Origin": LISTED})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == LISTED


def test_without_an_allow_list_there_are_no_cors_headers(settings, auth):
    client = create_app(settings).test_client()
    response = preflight(client, LISTED)
    assert "Access-Control-Allow-Origin" not in response.headers


def test_healthz_is_not_a_cors_route(client):
    response = client.get("/healthz", headers={"Origin": LISTED})
    assert "Access-Control-Allow-Origin" not in response.headers
