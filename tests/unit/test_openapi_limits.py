"""The limits /openapi.json publishes are the ones the routes enforce (issue 19): each route is
driven at the bounds the document gives, read from the document, so a limit changed on one side
only fails here. A value the document allows reaches Dify; one it refuses is a 400 that never
does."""

from __future__ import annotations

import re
from typing import Any

import pytest
from requests_mock import ANY

from tests.conftest import DIFY_URL
from tests.support import tokens

CONVERSATION = "3f8e5c1a-9b2d-4e6f-8a7b-1c2d3e4f5a6b"
MESSAGE = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
VARIABLES = f"/api/conversations/{CONVERSATION}/variables"
FEEDBACK = f"/api/messages/{MESSAGE}/feedbacks"
RENAME = f"/api/conversations/{CONVERSATION}/name"


@pytest.fixture
def document(client) -> dict[str, Any]:
    return client.get("/openapi.json").get_json()


@pytest.fixture
def dify(requests_mock):
    """Dify answers everything with a blocking chat answer's JSON, which every route relays."""
    answer = {"event": "message", "answer": "Hi", "metadata": {"usage": {"total_tokens": 1}}}
    return requests_mock.register_uri(ANY, re.compile(re.escape(DIFY_URL) + ".*"), json=answer)


def documented_path(document: dict, path: str) -> str:
    """The document's templated path for a concrete one (ids replaced by their parameter)."""
    for template in document["paths"]:
        segments = template.split("/")
        pattern = "/".join("[^/]+" if s.startswith("{") else re.escape(s) for s in segments)
        if re.fullmatch(pattern, path):
            return template
    raise AssertionError(f"{path} is not documented")


def query_schema(document: dict, path: str, name: str) -> dict[str, Any]:
    op = document["paths"][documented_path(document, path)]["get"]
    (parameter,) = [p for p in op["parameters"] if p["name"] == name and p["in"] == "query"]
    return parameter["schema"]


def body_schema(document: dict, path: str, method: str, name: str) -> dict[str, Any]:
    op = document["paths"][documented_path(document, path)][method]
    return op["requestBody"]["content"]["application/json"]["schema"]["properties"][name]


def branch(schema: dict[str, Any], kind: str) -> dict[str, Any]:
    """The `kind` branch of a schema that may be an anyOf (text or null, a number or empty)."""
    for candidate in schema.get("anyOf", [schema]):
        if candidate.get("type") == kind:
            return candidate
    raise AssertionError(f"no {kind} in {schema}")


def accepted(client, auth, dify, method: str, path: str, **kwargs) -> bool:
    """Whether the proxy passed the request on: a 2xx with Dify called, or a 400 without."""
    before = dify.call_count
    response = client.open(path, method=method, headers=auth, **kwargs)
    if response.status_code == 400:
        assert response.json["code"] == "invalid_param"
        assert dify.call_count == before
        return False
    assert response.status_code < 300, response.get_data(as_text=True)
    assert dify.call_count == before + 1
    return True


# --- numbers in the query -------------------------------------------------------------------

LIMITED = [("/api/conversations", {}), ("/api/messages", {"conversation_id": CONVERSATION})]
LIMITED.append((VARIABLES, {}))


@pytest.mark.parametrize(("path", "query"), LIMITED, ids=[p for p, _ in LIMITED])
def test_limit_is_taken_from_the_documented_minimum_to_maximum_and_no_further(
    client, auth, dify, document, path, query
):
    schema = query_schema(document, path, "limit")
    low, high = schema["minimum"], schema["maximum"]
    results = {
        value: accepted(client, auth, dify, "GET", path, query_string={**query, "limit": value})
        for value in (low - 1, low, high, high + 1)
    }
    assert results == {low - 1: False, low: True, high: True, high + 1: False}


# --- choices --------------------------------------------------------------------------------


def test_every_documented_sort_order_is_accepted_and_no_other(client, auth, dify, document):
    orders = query_schema(document, "/api/conversations", "sort_by")["enum"]
    for order in orders:
        assert accepted(client, auth, dify, "GET", "/api/conversations?sort_by=" + order)
    assert not accepted(client, auth, dify, "GET", "/api/conversations?sort_by=name")


def test_every_documented_rating_is_accepted_and_no_other(client, auth, dify, document):
    ratings = body_schema(document, FEEDBACK, "post", "rating")["enum"]
    assert None in ratings  # null withdraws a rating
    for rating in ratings:
        assert accepted(client, auth, dify, "POST", FEEDBACK, json={"rating": rating})
    assert not accepted(client, auth, dify, "POST", FEEDBACK, json={"rating": "love"})


def test_every_documented_response_mode_is_accepted_and_no_other(client, auth, dify, document):
    modes = body_schema(document, "/api/chat", "post", "response_mode")["enum"]
    for mode in modes:
        body = {"message": "hi", "response_mode": mode}
        assert accepted(client, auth, dify, "POST", "/api/chat", json=body)
    body = {"message": "hi", "response_mode": "fast"}
    assert not accepted(client, auth, dify, "POST", "/api/chat", json=body)


# --- text in bodies -------------------------------------------------------------------------

TEXTS = [  # (route, field, the rest of a valid body)
    ("/api/chat", "message", {"response_mode": "blocking"}),
    (RENAME, "name", {}),
    (FEEDBACK, "content", {"rating": "like"}),
    ("/api/text-to-audio", "text", {}),
    ("/api/text-to-audio", "voice", {"text": "hi"}),
]
TEXT_IDS = [f"{path.rsplit('/', 1)[-1]} {field}" for path, field, _ in TEXTS]


@pytest.mark.parametrize(("path", "field", "rest"), TEXTS, ids=TEXT_IDS)
def test_text_is_taken_up_to_the_documented_max_length_and_no_further(
    client, auth, dify, document, path, field, rest
):
    longest = branch(body_schema(document, path, "post", field), "string")["maxLength"]
    results = {
        n: accepted(client, auth, dify, "POST", path, json={**rest, field: "x" * n})
        for n in (longest, longest + 1)
    }
    assert results == {longest: True, longest + 1: False}


@pytest.mark.parametrize(("path", "field", "rest"), TEXTS, ids=TEXT_IDS)
def test_blank_text_is_refused_exactly_where_the_document_says_so(
    client, auth, dify, document, path, field, rest
):
    schema = branch(body_schema(document, path, "post", field), "string")
    documented_blank_ok = bool(re.search(schema.get("pattern", ""), "   "))
    body = {**rest, field: "   "}
    assert accepted(client, auth, dify, "POST", path, json=body) == documented_blank_ok


def test_feedback_content_is_documented_as_free_text_that_may_be_blank(document):
    """Dify's feedback `content` is optional free text; the route forwards even an empty one."""
    content = branch(body_schema(document, FEEDBACK, "post", "content"), "string")
    assert "pattern" not in content


# --- patterns -------------------------------------------------------------------------------

VARIABLE_NAMES = ["a", "city", "trip.city-2_b", "v" * 255, "v" * 256, "a b", "a'", "é", "a;b"]


@pytest.mark.parametrize("name", VARIABLE_NAMES, ids=[n[:12] for n in VARIABLE_NAMES])
def test_a_variable_name_is_accepted_exactly_when_the_documented_pattern_matches(
    client, auth, dify, document, name
):
    pattern = branch(query_schema(document, VARIABLES, "variable_name"), "string")["pattern"]
    query = {"variable_name": name}
    assert accepted(client, auth, dify, "GET", VARIABLES, query_string=query) == bool(
        re.search(pattern, name)
    )


def test_every_documented_as_attachment_value_is_accepted_and_no_other(
    app, client, auth, dify, document
):
    file_id = "72fa9618-8f89-4a37-9b33-7e1178a24a67"
    app.extensions["dify_proxy.owners"].bind("file", file_id, tokens.USER_ID)
    path = f"/api/files/{file_id}/preview"
    values = [
        v
        for branch in query_schema(document, path, "as_attachment")["anyOf"]
        for v in branch.get("enum", [branch.get("const")])
    ]
    for value in values:
        assert accepted(client, auth, dify, "GET", path, query_string={"as_attachment": value})
    assert not accepted(client, auth, dify, "GET", path, query_string={"as_attachment": "yes"})
