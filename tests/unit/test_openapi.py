"""/openapi.json describes exactly the routes the app serves (issue 11)."""

from __future__ import annotations

import re
from dataclasses import replace

from dify_proxy import create_app

NOT_DOCUMENTED = ("static", "demo.")  # Flask's static files and the demo page


def served_operations(app) -> set[tuple[str, str]]:
    operations = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(NOT_DOCUMENTED):
            continue
        paths = [rule.rule]
        choice = re.search(r"<any\(([^)]*)\):\w+>", rule.rule)
        if choice:
            paths = [rule.rule.replace(choice[0], c.strip()) for c in choice[1].split(",")]
        for path in paths:
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", path)
            operations |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return operations


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


def test_the_document_lists_every_route_and_method_the_app_serves(client, app):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    assert documented_operations(document) == served_operations(app)


def test_path_parameters_are_declared_for_every_templated_path(client):
    document = client.get("/openapi.json").get_json()
    for path, item in document["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for operation in item.values():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, path


def test_the_document_needs_no_session(client):
    assert client.get("/openapi.json").status_code == 200


def test_the_demo_routes_stay_out_of_the_document(settings):
    app = create_app(replace(settings, enable_demo=True))
    document = app.test_client().get("/openapi.json").get_json()
    assert not any(path.startswith("/demo") for path in document["paths"])
    assert documented_operations(document) == served_operations(app)
