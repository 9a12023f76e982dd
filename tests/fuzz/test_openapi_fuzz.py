"""Schemathesis (its own command line, pinned) against /openapi.json on the running service:
real gunicorn, the stand-in as Dify, with a valid session, an invalid one and none.

Checked: no 5xx; every error is JSON in Dify's shape; responses match the document (status
codes, content types, schemas); requests the document calls invalid are refused; and without a
valid session nothing reaches the stand-in. `positive_data_acceptance` is left out on purpose:
some rules are Dify's alone (which audio types it takes) or cannot be said in the document
(`inputs` is a JSON object inside a query string), so Dify may still refuse a valid-looking
request. Budget: HYPOTHESIS_PROFILE (tests/conftest.py), `ci` by default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import tokens

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"ci": 8, "long": 300}
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "errors_in_difys_shape",
]
SESSIONS = {
    "valid": lambda: tokens.hs256(),
    "invalid": lambda: tokens.hs256(secret="another-projects-secret-0123456789abcdef"),
    "none": lambda: None,
}


def schemathesis_run(proxy, token: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        f"{proxy.url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "--phases", "coverage,fuzzing",
        "--max-examples", str(EXAMPLES.get(profile, EXAMPLES["ci"])),
        "--request-timeout", "30",
        "--report-dir", str(tmp_path),
        "--no-color",
    ]  # fmt: skip
    if token:
        command += ["--header", f"Authorization: Bearer {token}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz.schemathesis_hooks",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def failures(result: subprocess.CompletedProcess) -> str:
    """Schemathesis's report of what failed (with a curl to reproduce each), without the rest."""
    out = result.stdout
    start = out.find("FAILURES")
    return (out[start : start + 30000] if start >= 0 else out[-5000:]) + result.stderr[-3000:]


def test_with_a_valid_session(proxy, standin, tmp_path):
    result = schemathesis_run(proxy, SESSIONS["valid"](), tmp_path)
    assert result.returncode == 0, failures(result)


@pytest.mark.parametrize("session", ["invalid", "none"])
def test_without_a_valid_session_nothing_reaches_dify(proxy, standin, tmp_path, session):
    result = schemathesis_run(proxy, SESSIONS[session](), tmp_path)
    assert result.returncode == 0, failures(result)
    assert standin.calls() == []
