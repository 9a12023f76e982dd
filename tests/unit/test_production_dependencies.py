"""Production installs requirements.txt only: the Dify stand-in's aiohttp (requirements-standin.txt)
stays out of it, and nothing the app imports needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def requirement_names(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line.split("==")[0].split("[")[0].lower() for line in lines if line}


def test_requirements_txt_does_not_install_the_standins_http_library() -> None:
    assert "aiohttp" in requirement_names(ROOT / "requirements-standin.txt")
    assert "aiohttp" not in requirement_names(ROOT / "requirements.txt")


def test_every_module_of_the_app_imports_without_aiohttp() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['aiohttp'] = None  # as if not installed\n"
        "import app, dify_proxy\n"
        "for module in pkgutil.iter_modules(dify_proxy.__path__):\n"
        "    if module.name != 'standin':\n"
        "        importlib.import_module('dify_proxy.' + module.name)\n"
    )
    env = {"DIFY_API_KEY": "app-test", "SUPABASE_JWT_SECRET": "s" * 40, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
