"""An app without RESUME_SPOOL_DIR records answers in a temporary directory of its own: it must
not outlive the app, nor the process (a test run builds hundreds of apps)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile

from dify_proxy import create_app
from tests.conftest import DIFY_KEY
from tests.support import tokens


def leftovers(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("dify-proxy-"))


def test_an_apps_own_spool_directory_is_removed_with_the_app(settings, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = create_app(settings)
    assert len(leftovers(tmp_path)) == 1
    del app
    gc.collect()
    assert leftovers(tmp_path) == []


def test_no_spool_directory_outlives_the_process(tmp_path):
    code = (
        "from dify_proxy import create_app\n"
        "apps = [create_app() for _ in range(3)]\n"
        "print(len(apps))\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "TMPDIR": str(tmp_path),
        "DIFY_API_KEY": DIFY_KEY,
        "SUPABASE_JWT_SECRET": tokens.SECRET,
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "3"
    assert leftovers(tmp_path) == []
