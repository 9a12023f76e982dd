"""One list of variables: the code reads exactly the catalogue's names (with its defaults), and
the README table, .env.example and app.json are what the catalogue generates."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from dify_proxy import variables
from dify_proxy.settings import load_settings
from dify_proxy.variables import BY_NAME, VARIABLES

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "DIFY_API_KEY": "app-unit-test-key-0123456789abcdef",
    "SUPABASE_JWT_SECRET": "a-test-secret-that-is-longer-than-32-characters",
}
# The stand-in is a development tool with options of its own (STANDIN_API_KEY), not the proxy's
# configuration; variables.py only names variables.
NOT_CONFIGURATION = {"standin.py", "variables.py"}


class RecordingEnv(dict):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.read.add(name)
        return super().__contains__(name)


def names_read_by_settings() -> set[str]:
    environ = RecordingEnv(MINIMAL)
    load_settings(environ)
    return environ.read


def _is_os_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def environ_uses(path: Path) -> dict[str, str | None]:
    """Names used through os.environ / os.getenv in a file, each with its literal default."""
    found: dict[str, str | None] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            if isinstance(node.slice, ast.Constant):
                found.setdefault(node.slice.value, None)
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        on_environ = _is_os_environ(func.value) and func.attr in ("get", "setdefault", "update")
        is_getenv = func.attr == "getenv" and getattr(func.value, "id", None) == "os"
        if not (on_environ or is_getenv):
            continue
        for keyword in node.keywords:  # os.environ.update(NAME=...)
            found.setdefault(keyword.arg, None)
        if node.args and isinstance(node.args[0], ast.Constant):
            default = node.args[1] if len(node.args) > 1 else None
            literal = default.value if isinstance(default, ast.Constant) else None
            if found.get(node.args[0].value) is None:
                found[node.args[0].value] = literal
    return found


def code_files() -> list[Path]:
    modules = sorted((ROOT / "dify_proxy").glob("*.py"))
    files = [ROOT / "app.py", ROOT / "gunicorn.conf.py", *modules]
    return [path for path in files if path.name not in NOT_CONFIGURATION]


def names_used_through_os_environ() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for path in code_files():
        for name, default in environ_uses(path).items():
            if found.get(name) is None:
                found[name] = default
    return found


def test_every_variable_the_code_reads_is_in_the_catalogue_and_no_other():
    read = names_read_by_settings() | set(names_used_through_os_environ())

    assert read == {v.name for v in VARIABLES}


def test_the_catalogues_defaults_are_the_ones_the_settings_use():
    unset = load_settings(dict(MINIMAL))
    for name in sorted(names_read_by_settings() - set(MINIMAL)):
        default = BY_NAME[name].default
        if default is None:
            continue
        assert load_settings({**MINIMAL, name: default}) == unset, name


def test_the_catalogues_defaults_are_the_ones_the_server_uses():
    literal_defaults = {
        name: default
        for name, default in names_used_through_os_environ().items()
        if default  # "" is the same as unset
    }

    assert literal_defaults  # PORT, WORKER_CONNECTIONS, GEVENT_RESOLVER at least
    for name, default in literal_defaults.items():
        assert BY_NAME[name].default.casefold() == default.casefold(), name  # LOG_LEVEL: info


@pytest.mark.parametrize("path", ["README.md", ".env.example", "app.json"])
def test_the_document_is_what_the_catalogue_generates(path):
    expected = variables.generated(ROOT)[ROOT / path]

    assert (ROOT / path).read_text() == expected, (
        f"{path} differs from dify_proxy/variables.py: run python -m dify_proxy.variables"
    )


def test_readme_env_example_app_json_and_settings_list_the_same_variables():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index(variables.README_BEGIN) : readme.index(variables.README_END)]
    in_readme = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    env_example = (ROOT / ".env.example").read_text()
    in_env_example = set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", env_example, re.MULTILINE))
    in_app_json = set(json.loads((ROOT / "app.json").read_text())["env"])
    set_by_heroku_or_local_only = {
        "PORT",
        "REDIS_URL",
        "DATABASE_URL",
        "DEV_TOKENS",
        "DEV_TOKEN_SECRET",
    }
    read_by_code = names_read_by_settings() | set(names_used_through_os_environ())

    assert in_readme == in_env_example == read_by_code
    assert in_app_json == read_by_code - set_by_heroku_or_local_only


def test_app_json_requires_the_dify_key_and_generates_the_metrics_token():
    env = json.loads((ROOT / "app.json").read_text())["env"]

    assert [name for name, entry in env.items() if entry["required"]] == ["DIFY_API_KEY"]
    assert env["METRICS_TOKEN"]["generator"] == "secret"
    assert all(entry["description"] for entry in env.values())


def test_app_json_adds_heroku_redis_postgres_and_one_web_dyno_running_python():
    manifest = json.loads((ROOT / "app.json").read_text())

    assert [addon["plan"].split(":")[0] for addon in manifest["addons"]] == [
        "heroku-redis",
        "heroku-postgresql",  # the usage ledger (DATABASE_URL)
    ]
    assert manifest["formation"]["web"]["quantity"] == 1
    assert manifest["buildpacks"] == [{"url": "heroku/python"}]
    assert len(manifest["name"]) <= 30 and len(manifest["description"]) <= 140


def test_app_json_opens_the_readiness_check_after_a_deploy():
    manifest = json.loads((ROOT / "app.json").read_text())

    assert manifest["success_url"] == "/readyz"


def test_secrets_in_env_example_are_placeholders_never_real_looking_values():
    for variable in VARIABLES:
        if variable.secret and variable.in_env_example:
            assert "your-" in variable.example, variable.name
