"""A port of the streaming loop in the README of Dify's Python SDK, so the suite reads the
proxy's stream as code copied from that README does.

Source: github.com/langgenius/dify, sdks/python-client/README.md ("chat generate with
`streaming` response_mode"), at commit 1cd35c5289838a5765882a3ba8916344d18043bd. Dify is
distributed under the Dify Open Source License (Apache 2.0 with additional conditions); this is a
five-line usage example quoted for interoperability testing, with attribution.

The only change: the README prints `line.get('answer')`; the port yields the whole parsed event
so the tests can compare every field. Note that it JSON-parses every non-empty line that is not
a `data:` line too, so it raises on Dify's own `event: ping`, and `iter_lines(decode_unicode=True)`
splits on a raw U+2028 inside an answer (`str.splitlines`): it stops there even straight from
Dify. The suite checks that the proxy makes it stop at the same place, not earlier.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests


def read_chat_stream(chat_response: requests.Response) -> Iterator[dict[str, Any]]:
    for line in chat_response.iter_lines(decode_unicode=True):
        line = line.split("data:", 1)[-1]
        if line.strip():
            line = json.loads(line.strip())
            yield line
