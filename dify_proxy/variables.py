"""Every environment variable the proxy reads, in one table: the README's variable table,
`.env.example` and `app.json`'s `env` are generated from it (`python -m dify_proxy.variables`),
and tests prove that the code reads exactly these names with these defaults.

Documents written by hand drift from the code one variable at a time (DEV_TOKENS was only in
the README, GEVENT_RESOLVER nowhere). `settings.py` keeps the typed parsing and the error
messages; this module only says what exists, what it means, and where it is shown.
Standard library only: it is imported by tools and tests, never by the running server.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variable:
    name: str
    group: str
    description: str  # one or two sentences; `code` allowed, shown everywhere
    default: str | None = None  # the value used when unset, as it would be written
    default_text: str | None = None  # the README's default column when not a literal
    required: bool = False
    secret: bool = False  # never logged; app.json may generate it
    example: str | None = None  # the value written in .env.example
    in_env_example: bool = False  # set (not commented out) in .env.example
    generator: str | None = None  # app.json: "secret" makes Heroku generate one
    # Set by someone else on Heroku: the platform (PORT) or an add-on (REDIS_URL); or only
    # meaningful locally (DEV_TOKENS). app.json leaves these out and says why here.
    not_in_app_json: str | None = None
    more: str = ""  # README only: markdown appended to the description


DIFY = "Dify"
AUTH = "Supabase sessions: at least one of SUPABASE_JWT_SECRET and SUPABASE_URL"
TIMEOUTS = "Timeouts and logs"
LIMITS = "Per-user limits (keyed by the session's sub)"
BROWSERS = "Browsers"
RESUME = "Resumable answers"
LEDGER = "Usage ledger"
ROUTES = "Other routes and operations"
SERVER = "Server (gunicorn.conf.py)"

VARIABLES: tuple[Variable, ...] = (
    Variable(
        "DIFY_API_KEY",
        DIFY,
        "The Dify app's API key (`app-...`, in Dify under the app's API Access); never logged,"
        " never sent to a browser. Without it `scripts/run` starts the local Dify stand-in.",
        required=True,
        secret=True,
        example="app-your-dify-app-key",
        in_env_example=True,
    ),
    Variable(
        "DIFY_API_URL",
        DIFY,
        "Dify's service API base URL: Dify Cloud, or `https://<your-host>/v1` when self-hosted.",
        default="https://api.dify.ai/v1",
        example="https://api.dify.ai/v1",
        in_env_example=True,
    ),
    Variable(
        "SUPABASE_JWT_SECRET",
        AUTH,
        "The project's legacy JWT secret: verifies HS256 access tokens. Set this or"
        " `SUPABASE_URL` (or both).",
        default_text="one of the two is required",
        secret=True,
        example="your-supabase-legacy-jwt-secret",
        in_env_example=True,
    ),
    Variable(
        "SUPABASE_URL",
        AUTH,
        "The project URL, `https://<project-ref>.supabase.co`: verifies ES256/RS256 tokens"
        " against the project's published signing keys (JWKS) and requires"
        " `iss` = `{SUPABASE_URL}/auth/v1`. Set this or `SUPABASE_JWT_SECRET` (or both).",
        default_text="one of the two is required",
        example="https://your-project-ref.supabase.co",
        in_env_example=True,
        more=" The keys come from `{SUPABASE_URL}/auth/v1/.well-known/jwks.json`, fetched once,"
        " cached 10 min, refetched at most every 30 s on an unknown `kid`.",
    ),
    Variable(
        "SUPABASE_JWT_AUDIENCE",
        AUTH,
        "The `aud` every access token must carry.",
        default="authenticated",
        example="authenticated",
        in_env_example=True,
    ),
    Variable(
        "DIFY_CONNECT_TIMEOUT",
        TIMEOUTS,
        "Seconds to connect to Dify.",
        default="5",
        example="5",
        in_env_example=True,
    ),
    Variable(
        "DIFY_READ_TIMEOUT",
        TIMEOUTS,
        "Longest silence accepted from Dify, in seconds (Dify pings every 10 s): before its"
        " headers a 504, mid-stream a final error event.",
        default="25",
        example="25",
        in_env_example=True,
    ),
    Variable(
        "HEARTBEAT_INTERVAL",
        TIMEOUTS,
        "Seconds between keep-alives to the browser while Dify is silent, in Dify's own"
        " `event: ping` form.",
        default="15",
        example="15",
        in_env_example=True,
    ),
    Variable(
        "LOG_LEVEL",
        TIMEOUTS,
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`.",
        default="INFO",
        example="INFO",
        in_env_example=True,
    ),
    Variable(
        "RATE_LIMIT",
        LIMITS,
        "Requests per user to `/api/chat`, e.g. `20/minute;300/day`; `off` turns it off.",
        default="20/minute",
        example="20/minute",
        more=" The notation is [Flask-Limiter's]"
        "(https://flask-limiter.readthedocs.io/en/stable/configuration.html"
        "#rate-limit-string-notation).",
    ),
    Variable(
        "REDIS_URL",
        LIMITS,
        "Shared store for the per-user limits, so they hold across workers and instances;"
        " without it each process counts on its own.",
        secret=True,
        example="redis://localhost:6379/0",
        not_in_app_json="the heroku-redis add-on sets it",
        more=" Heroku's Redis add-on sets it.",
    ),
    Variable(
        "MAX_STREAMS_PER_USER",
        LIMITS,
        "Answers one user may have streaming at once; `0` for no limit.",
        default="3",
        example="3",
    ),
    Variable(
        "STREAM_LEASE_SECONDS",
        LIMITS,
        "A stream's slot is a lease renewed while it runs; a killed worker's slots free"
        " themselves after this many seconds.",
        default="60",
        example="60",
    ),
    Variable(
        "DAILY_TOKEN_BUDGET",
        LIMITS,
        "Model tokens per user per UTC day, counted from Dify's usage reports (answers nobody"
        " reads included; see Resumable answers); `0` is off.",
        default="0",
        example="0",
    ),
    Variable(
        "PLAN_CLAIM",
        LIMITS,
        "Where a user's plan is in the verified access token: a dotted claim path. The plan is"
        " the lower-cased string found there; never `user_metadata`, which users can edit.",
        default="app_metadata.plan",
        example="app_metadata.plan",
        more=" A custom access token hook can put it there (see Plans).",
    ),
    Variable(
        "PLANS",
        LIMITS,
        "Each plan's own limits, as JSON: plan names to objects whose keys are the lower-case"
        " names of the variables they override (`rate_limit`, `max_streams_per_user`,"
        " `daily_token_budget`, `max_upload_bytes`, `daily_cost_budget`, `monthly_cost_budget`)."
        " A user without a plan, or with an unknown"
        " one, gets the variables' own values.",
        example='{"free": {"rate_limit": "10/minute", "max_streams_per_user": 1}}',
        more=" See Plans.",
    ),
    Variable(
        "DAILY_COST_BUDGET",
        LIMITS,
        "Money per user per UTC day, in the currency Dify reports, counted from the usage"
        " ledger plus a hold for each answer in flight (see Usage ledger); `0` is off.",
        default="0",
        example="0",
    ),
    Variable(
        "MONTHLY_COST_BUDGET",
        LIMITS,
        "Money per user per UTC month, counted like `DAILY_COST_BUDGET`; `0` is off.",
        default="0",
        example="0",
    ),
    Variable(
        "CORS_ORIGINS",
        BROWSERS,
        "Browser origins allowed to call `/api/*` from another origin, exact"
        " `scheme://host[:port]`, comma-separated; also the origins a cookie session is"
        " accepted from, besides the proxy's own.",
        example="https://app.example.com",
    ),
    Variable(
        "SUPABASE_AUTH_COOKIE",
        BROWSERS,
        "Name of the `@supabase/ssr` session cookie; with neither it nor `SUPABASE_URL` set,"
        " only `Authorization` headers count.",
        default_text="`sb-<project-ref>-auth-token`, from `SUPABASE_URL`",
        example="sb-your-project-ref-auth-token",
    ),
    Variable(
        "ENABLE_DEMO",
        BROWSERS,
        "`1` serves the demo chat page at `/demo` (`scripts/run` turns it on with the stand-in).",
        default="0",
        example="0",
    ),
    Variable(
        "DEV_TOKENS",
        BROWSERS,
        "`1` adds `POST /demo/dev-token`, a token for a fixed dev user; refused unless"
        " `DIFY_API_URL` is on loopback (the stand-in, where `scripts/run` turns it on).",
        default="0",
        example="0",
        not_in_app_json="only for the local stand-in; refused against a real Dify",
    ),
    Variable(
        "DEV_TOKEN_SECRET",
        BROWSERS,
        "With `DEV_TOKENS`, the secret dev tokens are signed with (32 bytes or more); it must"
        " not be `SUPABASE_JWT_SECRET`, so a dev token is never a real session. `scripts/run`"
        " makes a fresh one per run.",
        default_text="none (required with `DEV_TOKENS=1`)",
        secret=True,
        not_in_app_json="only for the local stand-in, with DEV_TOKENS",
    ),
    Variable(
        "RESUME_WINDOW",
        RESUME,
        "Seconds an answer's events are kept after it ends, so a client that lost its"
        " connection (or reloaded the page) can resume it with its last event id.",
        default="300",
        example="300",
    ),
    Variable(
        "RESUME_MAX_BYTES",
        RESUME,
        "Most bytes of one answer's events kept for resumes; a longer answer still streams"
        " live, but a resume that needs what was not kept gets a 204.",
        default="4194304",
        default_text="`4194304` (4 MB)",
        example="4194304",
    ),
    Variable(
        "RESUME_GRACE",
        RESUME,
        "Seconds Dify keeps being read after a client leaves mid-answer, so a reconnect gets"
        " the whole answer; then Dify is told to stop. `0` stops it at once.",
        default="20",
        example="20",
    ),
    Variable(
        "RESUME_SPOOL_DIR",
        RESUME,
        "Local directory where every worker of an instance records answers for resumes (with"
        " `REDIS_URL`, Redis also holds them, for other instances).",
        default_text="a fresh temporary directory per start",
        example="/tmp/dify-proxy-answers",
    ),
    Variable(
        "DATABASE_URL",
        LEDGER,
        "PostgreSQL for the usage ledger (`public.dify_usage`): Supabase's (direct, or its"
        " pooler, port 6543 included) or Heroku Postgres (`postgres://`, set by the add-on)."
        " Unset, the ledger is the local SQLite file below.",
        secret=True,
        example="postgresql://postgres:your-password@db.your-project-ref.supabase.co:5432/postgres",
        not_in_app_json="set by the heroku-postgresql add-on",
    ),
    Variable(
        "USAGE_SQLITE_PATH",
        LEDGER,
        "The usage ledger's SQLite file when `DATABASE_URL` is unset (made on first use).",
        default="instance/dify-usage.sqlite3",
        example="instance/dify-usage.sqlite3",
    ),
    Variable(
        "USAGE_OUTBOX_PATH",
        LEDGER,
        "Local SQLite file where usage rows wait while the ledger's database is away; shared"
        " by every worker of an instance, sent when the database is back.",
        default="instance/dify-usage-outbox.sqlite3",
        example="instance/dify-usage-outbox.sqlite3",
    ),
    Variable(
        "MAX_RESUMES_PER_USER",
        RESUME,
        "Resumes one user may have streaming at once (across instances with `REDIS_URL`); a"
        " resume of an answer replaces the user's earlier resumes of it, so a client that"
        " reconnects never counts twice. `0` for no limit.",
        default="5",
        example="5",
    ),
    Variable(
        "OWNERSHIP_TTL",
        RESUME,
        "Seconds the proxy remembers whose a task id or workflow run id is (a form token: at"
        " least until the form expires); after that only Dify's own user checks apply, and"
        " stop, run detail and events answer 404.",
        default="604800",
        default_text="`604800` (7 days)",
        example="604800",
    ),
    Variable(
        "APP_INFO_TTL",
        ROUTES,
        "Seconds each worker keeps Dify's `/parameters`, `/meta`, `/info` and `/site` answers;"
        " `0` turns this off.",
        default="60",
        example="60",
    ),
    Variable(
        "MAX_UPLOAD_BYTES",
        ROUTES,
        "Largest upload body, in bytes, for `/api/files/upload` and `/api/audio-to-text`.",
        default="15728640",
        default_text="`15728640` (15 MB)",
        example="15728640",
    ),
    Variable(
        "METRICS_TOKEN",
        ROUTES,
        "When set, `/metrics` needs `Authorization: Bearer <METRICS_TOKEN>`; unset, it is open.",
        secret=True,
        example="a-long-random-string",
        generator="secret",
    ),
    Variable(
        "PORT",
        SERVER,
        "The port gunicorn listens on (all interfaces).",
        default="8000",
        default_text="`8000`; Heroku sets it",
        example="8000",
        not_in_app_json="Heroku sets it",
    ),
    Variable(
        "WEB_CONCURRENCY",
        SERVER,
        "gunicorn worker processes. One gevent worker per core is best; Heroku's Python"
        " buildpack sets 2 to 17 by dyno size when it is unset (see Deploy).",
        default_text="the number of cores",
        example="2",
    ),
    Variable(
        "WORKER_CONNECTIONS",
        SERVER,
        "Open connections per worker; each open stream is one.",
        default="5000",
        example="5000",
    ),
    Variable(
        "GEVENT_RESOLVER",
        SERVER,
        "gevent's DNS resolver: `ares` resolves inside the event loop; `thread` is gevent's"
        " own default.",
        default="ares",
        example="ares",
    ),
    Variable(
        "PROMETHEUS_MULTIPROC_DIR",
        SERVER,
        "Directory where every worker writes its metrics for `/metrics` to sum; emptied at"
        " each start.",
        default_text="a fresh temporary directory per start",
        example="/tmp/dify-proxy-metrics",
    ),
)

BY_NAME = {variable.name: variable for variable in VARIABLES}


def plain(text: str) -> str:
    """Markdown-lite to plain text, for .env.example and app.json."""
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", text)
    return text.replace("`", "")


# --- README --------------------------------------------------------------------------------

README_BEGIN = (
    "<!-- variables: generated from dify_proxy/variables.py by"
    " `python -m dify_proxy.variables`; edit there -->"
)
README_END = "<!-- /variables -->"


def readme_table() -> str:
    rows = [README_BEGIN, "| variable | default | meaning |", "|---|---|---|"]
    for v in VARIABLES:
        if v.required:
            default = "required"
        elif v.default_text:
            default = v.default_text
        elif v.default is not None:
            default = f"`{v.default}`"
        else:
            default = ""
        meaning = (v.description + v.more).replace("|", "\\|")
        rows.append(f"| `{v.name}` | {default} | {meaning} |")
    rows.append(README_END)
    return "\n".join(rows) + "\n"


def with_readme_table(readme: str) -> str:
    start = readme.index(README_BEGIN)
    end = readme.index(README_END) + len(README_END) + 1
    return readme[:start] + readme_table() + readme[end:]


# --- .env.example --------------------------------------------------------------------------

ENV_EXAMPLE_HEADER = """\
# Copy to .env for local runs: scripts/run and honcho read it; real environment variables win.
# Generated from dify_proxy/variables.py by `python -m dify_proxy.variables`; edit there.
# On Heroku set these as config vars instead (see the README's Deploy section).
# Values containing "your-" are placeholders: while DIFY_API_KEY is one, scripts/run runs the
# local Dify stand-in instead (and says so); replace them, or delete the lines you do not need.
"""


def env_example() -> str:
    lines = [ENV_EXAMPLE_HEADER.rstrip("\n")]
    group = None
    for v in VARIABLES:
        if v.group != group:
            group = v.group
            lines += ["", f"# --- {group} ---"]
        note = plain(v.description)
        if v.default is not None and not v.required:
            note += f" Default: {v.default}."
        lines += textwrap.wrap(
            note, 98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
        )
        assignment = f"{v.name}={v.example or ''}"
        lines.append(assignment if v.in_env_example else f"# {assignment}")
    return "\n".join(lines) + "\n"


# --- app.json ------------------------------------------------------------------------------


def app_json_env() -> dict[str, dict[str, object]]:
    env: dict[str, dict[str, object]] = {}
    for v in VARIABLES:
        if v.not_in_app_json:
            continue
        entry: dict[str, object] = {"description": plain(v.description), "required": v.required}
        if v.generator:
            entry["generator"] = v.generator
        env[v.name] = entry
    return env


def with_app_json_env(app_json: str) -> str:
    manifest = json.loads(app_json)
    manifest["env"] = app_json_env()
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


# --- writing and checking ------------------------------------------------------------------


def generated(root: Path = ROOT) -> dict[Path, str]:
    """Each generated file's path and the text it should have."""
    return {
        root / "README.md": with_readme_table((root / "README.md").read_text()),
        root / ".env.example": env_example(),
        root / "app.json": with_app_json_env((root / "app.json").read_text()),
    }


def main(argv: list[str]) -> int:
    """`python -m dify_proxy.variables` rewrites the files; `--check` only says which differ."""
    stale = [path for path, text in generated().items() if path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.name} is out of date: run python -m dify_proxy.variables")
        return 1 if stale else 0
    for path, text in generated().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
