"""The fuzzing suite runs against the same real gunicorn and stand-in as the integration tests."""

from tests.integration.conftest import (  # noqa: F401 -- fixtures, shared by name
    _fresh_call_log,
    proxy,
    standin,
)
