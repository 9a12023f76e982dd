"""Checks of our own for the Schemathesis runs (loaded through SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

import json

import schemathesis

from dify_proxy.openapi import GUNICORN_STATUSES


@schemathesis.check
def errors_in_difys_shape(ctx, response, case):
    """Every 4xx or 5xx is JSON `{code, message, status}` carrying the response's own status:
    front ends written for Dify show `message` from exactly that shape."""
    if response.status_code < 400:
        return None
    content_type = next(
        (v[0] for k, v in response.headers.items() if k.lower() == "content-type" and v), ""
    )
    if str(response.status_code) in GUNICORN_STATUSES and content_type.startswith("text/html"):
        return None  # gunicorn refused the request head before the app saw it (documented)
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} error is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"code", "message", "status"}:
        raise AssertionError(f"{response.status_code} error is not in Dify's shape: {body!r}")
    if body["status"] != response.status_code:
        raise AssertionError(f"status {body['status']} in a {response.status_code} response")
    return None
