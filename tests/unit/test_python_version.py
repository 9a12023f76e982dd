"""Heroku's buildpack installs the Python named in .python-version; CI must test that one."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tests_run_on_the_python_version_heroku_installs():
    wanted = (ROOT / ".python-version").read_text().strip()

    assert f"{sys.version_info.major}.{sys.version_info.minor}" == wanted
