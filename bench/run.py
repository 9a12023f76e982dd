"""Load benchmark: the proxy (gunicorn + gevent, as the Procfile runs it) against nginx as a bare
reverse proxy, both in front of the same local Dify stand-in, on this machine, in one run.

    .venv/bin/python bench/run.py [--mode burst|hold|single|healthz|firehose|resume|all]

(`bench/run` sets up the venv and nginx first.) Every mode starts a fresh stand-in, then the
proxy, measures it, stops it, then nginx, measures it, stops it. Load comes from
bench/loadgen.py processes (asyncio, raw sockets), so no measuring code shares a GIL with the
proxy. Results: text tables on stdout and the same figures as JSON in bench/results/.
This file is the entry and the run's outline; the pieces are the modules beside it (see
bench/__init__.py). Standard library only (plus `dify_proxy.devtokens.mint`, i.e. PyJWT,
for the user token).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from bench.modes import MODES  # noqa: E402
from bench.phases import Bench  # noqa: E402
from bench.processes import log, raise_fd_limit, stop_all  # noqa: E402
from bench.report import print_mode, print_summary  # noqa: E402
from bench.sampling import CORES  # noqa: E402
from bench.targets import GUNICORN_BACKLOG, NGINX_BACKLOG  # noqa: E402

TIME_LIMITS = {
    "burst": 180,
    "hold": 360,
    "single": 240,
    "healthz": 300,
    "firehose": 240,
    "resume": 240,
}


class ModeTimeout(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--mode", choices=(*MODES, "all"), default="all")
    ap.add_argument(
        "--streams", type=int, help="streams for burst (1000), hold (5000), healthz (1000)"
    )
    ap.add_argument(
        "--events",
        type=int,
        help="events per stream for burst/hold/healthz/resume (20 / 30 / 60 / 360)",
    )
    ap.add_argument(
        "--interval",
        type=float,
        help="seconds between events for burst/hold/healthz/resume (0.05 / 1.0 / 0.5 / 0.1)",
    )
    ap.add_argument(
        "--resumers",
        type=int,
        default=100,
        help="resume: clients resuming the one live answer (half of them never read)",
    )
    ap.add_argument(
        "--resume-at",
        type=float,
        default=0.75,
        help="resume: how far through the answer (0-1) the resumers come",
    )
    ap.add_argument(
        "--resume-on",
        choices=("same", "other"),
        help="resume: the asker's proxy instance or a second one sharing its Redis "
        "(default: other with REDIS_URL in --proxy-env, else same)",
    )
    ap.add_argument("--single-count", type=int, default=200)
    ap.add_argument("--probes", type=int, default=200, help="healthz probes")
    ap.add_argument("--firehose-events", type=int, default=20000)
    ap.add_argument("--firehose-repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=CORES, help="WEB_CONCURRENCY")
    ap.add_argument("--procs", type=int, default=CORES, help="load generator processes")
    ap.add_argument(
        "--connect-limit",
        type=int,
        default=0,
        help="max connects in progress per generator (0: none)",
    )
    ap.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the proxy (experiments; not the Procfile's)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="SECONDS",
        help="before each phase, wait up to this long for other work on the "
        "machine to stop (under 15%% busy)",
    )
    ap.add_argument("--baseline", choices=("nginx", "direct"), default="nginx")
    ap.add_argument("--nginx", default="nginx", help="nginx binary")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="run py-spy (if installed) on each gunicorn worker during the proxy "
        "phase; raw stacks go to DIR and a top list is printed",
    )
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--results", default=str(BENCH / "results"))
    ap.add_argument("--keep-tmp", action="store_true")
    return ap.parse_args(argv)


def environment(bench: Bench) -> dict[str, Any]:
    env: dict[str, Any] = {
        "cores": CORES,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "gunicorn_backlog": GUNICORN_BACKLOG,
        "nginx_backlog": NGINX_BACKLOG,
        "baseline": bench.baseline,
        "web_concurrency": bench.args.workers,
        "worker_connections": int(os.environ.get("WORKER_CONNECTIONS", "5000")),
        "loadgen_procs": bench.args.procs,
        "proxy_env_extra": bench.proxy_env,
    }
    for name in ("somaxconn",):
        with contextlib.suppress(OSError):
            env[name] = int(Path(f"/proc/sys/net/core/{name}").read_text())
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only: what was measured
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--",
                "dify_proxy",
                "app.py",
                "gunicorn.conf.py",
                "requirements.txt",
                "requirements-standin.txt",
            ],
            capture_output=True,
            text=True,
        )
        env["git_head"] = head.stdout.strip()
        env["app_files_changed_since_head"] = dirty.stdout.split("\n")[:50]
    if bench.nginx:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([bench.nginx, "-v"], capture_output=True, text=True, timeout=5)
            env["nginx"] = out.stderr.strip()
    for dist in (
        "gunicorn",
        "gevent",
        "greenlet",
        "flask",
        "werkzeug",
        "requests",
        "urllib3",
        "pyjwt",
        "aiohttp",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[dist] = importlib.metadata.version(dist)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    bench = Bench(args)
    modes = list(MODES) if args.mode == "all" else [args.mode]

    def on_alarm(_s: int, _f: Any) -> None:
        raise ModeTimeout("hard time limit reached")

    def on_term(signum: int, _f: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_alarm)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGINT too: a background job
        signal.signal(sig, on_term)  # inherits it ignored, and then Ctrl-C would do nothing
    env = environment(bench)
    print(
        f"dify-proxy load benchmark: {', '.join(modes)}; proxy = gunicorn app:app "
        f"--config gunicorn.conf.py, {args.workers} gevent workers (WEB_CONCURRENCY), "
        f"backlog {GUNICORN_BACKLOG} (gunicorn.conf.py); baseline = {bench.baseline}; "
        f"{args.procs} load generator processes; {CORES} cores"
    )
    if bench.proxy_env:
        print(f"NOTE: extra proxy environment (not the Procfile's): {bench.proxy_env}")
    if bench.baseline == "direct" and modes != ["resume"]:  # resume measures the proxy alone
        why = "--baseline direct" if args.baseline == "direct" else "nginx is not available"
        print(
            f"NOTE: {why}, so the baseline is the Dify stand-in itself (direct, no reverse "
            "proxy in between); its RSS and CPU are the stand-in's, and its healthz is the "
            "stand-in's GET /_standin/open."
        )
    results: dict[str, Any] = {}
    started = dt.datetime.now()
    try:
        for mode in modes:
            bench.current_mode = mode
            limit = TIME_LIMITS[mode] + 2 * math.ceil(args.wait_quiet)  # + waits for quiet
            log(f"mode {mode} (time limit {limit} s)")
            signal.alarm(limit)
            try:
                results[mode] = MODES[mode](bench)
                print_mode(mode, results[mode], bench.baseline)
            except (ModeTimeout, RuntimeError) as exc:
                results[mode] = {"error": str(exc)}
                print(f"\n== {mode}: FAILED: {exc}")
            except KeyboardInterrupt as exc:
                results[mode] = {"error": f"interrupted ({exc})"}
                raise
            finally:
                signal.alarm(0)
                stop_all()
            sys.stdout.flush()
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc}); stopping everything")
    finally:
        signal.alarm(0)
        stop_all()
        if not args.keep_tmp:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        else:
            log(f"kept {bench.tmp}")
    summary = print_summary(results, bench.baseline)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "argv": sys.argv,
                "environment": env,
                "results": results,
                "summary": summary,
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nresults: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if all(row["pass"] for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
