"""The deploy drill: what a restart in the middle of the day does to the people using the proxy.

It starts the Dify stand-in and the proxy as the Procfile runs it (gunicorn.conf.py, two gevent
workers), opens answers, sends the master SIGTERM as a deploy or Heroku's daily restart does,
keeps asking new questions for a few seconds, and sorts every request by how it ended:

  whole              the answer arrived complete (message_end, then a clean end of the body)
  server_restarting  the stream ended with the proxy's final `server_restarting` error event
  refused_503        a 503 JSON answer before any streaming (Retry-After set)
  not_accepted       no response at all: the connection was refused or reset before a status
                     line (a router or client retries it; it never reached the app)
  silent_cut         anything else: a stream that stopped without a final event, or a bad status

The last must be 0. Run: bench/drill [--answers 300] [--short-share 0.67] [--new-for 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import jwt

ROOT = Path(__file__).resolve().parents[1]
KEY = "app-drill-key-5d1c0a77e3b94f28"
SECRET = "drill-secret-" + "x" * 40
SHORT = {"events": 40, "interval": 0.1}  # 4 s: finishes well inside the drain deadline
LONG = {"events": 400, "interval": 0.1}  # 40 s: outlives it


def token(n: int) -> str:
    now = int(time.time())
    claims = {
        "sub": f"00000000-0000-4000-8000-{n:012d}",
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_standin() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dify_proxy.standin", "--port", "0", "--api-key", KEY],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()[1]


def start_proxy(standin_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "DIFY_API_KEY": KEY + "-chat",  # the stand-in's chat app: its answers end with message_end
        "DIFY_API_URL": standin_url,
        "SUPABASE_JWT_SECRET": SECRET,
        "WEB_CONCURRENCY": "2",
        "RATE_LIMIT": "off",
        "MAX_STREAMS_PER_USER": "0",
        "LOG_LEVEL": "INFO",
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "app:app", "--config", "gunicorn.conf.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the proxy did not start; see " + str(log))


async def ask(client: httpx.AsyncClient, url: str, n: int, knobs: dict, started=None) -> str:
    """One question, read to its end; returns its outcome."""
    body = {"message": "drill", "inputs": {"_standin": knobs}}
    headers = {"Authorization": f"Bearer {token(n)}", "Accept": "text/event-stream"}
    got = b""
    status = None
    try:
        async with client.stream("POST", f"{url}/api/chat", json=body, headers=headers) as r:
            status = r.status_code
            if status == 503:
                await r.aread()
                ok = r.headers.get("Retry-After") and r.json().get("code") == "server_restarting"
                return "refused_503" if ok else "silent_cut"
            if status != 200:
                return "silent_cut"
            async for chunk in r.aiter_raw():
                got += chunk
                if started is not None and not started.done() and b"data:" in got:
                    started.set_result(None)
    except httpx.TransportError:
        # Before a status line the app never had the request; after it, the stream was cut.
        return "not_accepted" if status is None else "silent_cut"
    blocks = [b for b in got.split(b"\n\n") if b"data:" in b]
    last = blocks[-1].split(b"data: ", 1)[1].split(b"\n", 1)[0] if blocks else b"{}"
    event = json.loads(last)
    if event.get("event") == "message_end":
        return "whole"
    if event.get("code") == "server_restarting":
        return "server_restarting"
    return "silent_cut"


async def drill(
    url: str, proxy: subprocess.Popen, answers: int, short_share: float, new_for: float
) -> dict[str, Counter]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(60.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        n_short = int(answers * short_share)
        kinds = ["short"] * n_short + ["long"] * (answers - n_short)
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in kinds]
        open_tasks = [
            asyncio.create_task(ask(client, url, i, SHORT if k == "short" else LONG, started[i]))
            for i, k in enumerate(kinds)
        ]
        await asyncio.wait_for(asyncio.gather(*started), timeout=60)
        proxy.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        # New questions come from a thread of their own, so that reading 300 streams here
        # cannot slow down how fast they arrive.
        new = await asyncio.to_thread(ask_new_for, url, answers, new_for, sigterm_at)
        opened = await asyncio.gather(*open_tasks)
        ended_after = time.monotonic() - sigterm_at
    results = {
        "short answers open at SIGTERM": Counter(
            o for o, k in zip(opened, kinds, strict=True) if k == "short"
        ),
        "long answers open at SIGTERM": Counter(
            o for o, k in zip(opened, kinds, strict=True) if k == "long"
        ),
        f"new questions in the {new_for:g} s after SIGTERM": Counter(new),
    }
    print(f"last stream ended {ended_after:.1f} s after SIGTERM")
    return results


def ask_new_for(url: str, first_n: int, seconds: float, since: float) -> list[str]:
    """Five new questions every 0.1 s for `seconds`, each read to its end in its own task."""

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            tasks = []
            while time.monotonic() - since < seconds:
                for _ in range(5):
                    tasks.append(asyncio.create_task(ask(client, url, first_n + len(tasks), SHORT)))
                await asyncio.sleep(0.1)
            return list(await asyncio.gather(*tasks))

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=300)
    ap.add_argument("--short-share", type=float, default=2 / 3)
    ap.add_argument("--new-for", type=float, default=3.0)
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp(prefix="dify-proxy-drill-")) / "gunicorn.log"
    standin, standin_url = start_standin()
    proxy, url = start_proxy(standin_url, log)
    try:
        print(
            f"deploy drill: {args.answers} answers open ({SHORT['events']} events "
            f"{SHORT['interval']} s apart, or {LONG['events']} for the long ones), SIGTERM, "
            f"new questions for {args.new_for:g} s; proxy = gunicorn.conf.py, 2 gevent workers"
        )
        results = asyncio.run(drill(url, proxy, args.answers, args.short_share, args.new_for))
        proxy.wait(timeout=40)
    finally:
        if proxy.poll() is None:
            proxy.kill()
        standin.terminate()
    outcomes = ("whole", "server_restarting", "refused_503", "not_accepted", "silent_cut")
    print(f"\n{'':44}" + "".join(f"{o:>19}" for o in outcomes))
    for name, counts in results.items():
        print(f"{name:44}" + "".join(f"{counts.get(o, 0):>19,}" for o in outcomes))
    silent = sum(counts.get("silent_cut", 0) for counts in results.values())
    drained = [json.loads(x) for x in log.read_text().splitlines() if '"drained"' in x]
    print(f"\nworkers' drain log lines: {drained}")
    print(f"silent cuts: {silent}  ->  {'PASS' if silent == 0 else 'FAIL'}")
    print(f"gunicorn log: {log}")
    return 0 if silent == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
