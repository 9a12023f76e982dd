"""Strict JSON for anything a client sends (bodies, the `inputs` query parameter, cookies).

Python's `json` accepts `NaN`, `Infinity` and `1e400` (which becomes infinity), none of which
`requests` will send on to Dify, and it recurses once per nesting level, so a deep enough
document raises `RecursionError` instead of `ValueError`. A lone surrogate (`"\\ud800"`) parses
too, but it cannot be encoded as UTF-8, which Dify's database stores. Everything here fails with
`ValueError` and a message a front-end developer can act on, before anything reaches Dify.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # a chat body is two or three levels deep; this leaves ample room


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large to be a number")
    return value


def loads(text: str | bytes) -> Any:
    """Parse standard JSON only; raises ValueError for anything else (see the module doc)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError(f"it is nested more than {MAX_DEPTH} levels deep") from None
    _check(value)
    return value


def _check(value: Any) -> None:
    """Depth and strings, without recursion (the value may be about 1,000 levels deep)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise ValueError(f"it is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("it holds a lone surrogate escape such as \\ud800") from None
